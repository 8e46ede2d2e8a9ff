"""Speculative decoding on a real (random-weight) Qwen3: with it on, every greedy request gives exactly the tokens
and logprobs it gives with it off, for both proposers and k = 1..8, in mixed batches with requests that opt out,
with prefix-cache hits, preemption forced by a small pool, n > 1 and stop strings. Verification reads logits of
k + 1 rows of one sequence: the kernels make each row bit-identical to a decode of it alone, which is what lets
the outputs match exactly (tests/integration/test_model_runner.py checks rows against batches too)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from mili.checkpoints import cached_checkpoint, cached_layer_draft
from mili.engine.config import EngineConfig
from mili.engine.draft_proposer import DraftProposer
from mili.engine.engine import Engine
from mili.engine.model_runner import ModelRunner
from mili.engine.outputs import RequestOutput
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import SpeculativeConfig
from mili.tokenizer import Tokenizer
from tests.integration import helpers

CHECKPOINT = "tiny-tied-gqa4-d128"
NUM_BLOCKS = 96
BLOCK_SIZE = 16


@functools.cache
def runner(path: str) -> ModelRunner:
    return ModelRunner.from_pretrained(path, dtype="float32", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)


@functools.cache
def target_runner() -> ModelRunner:
    # a runner of its own (the other integration tests' runner has its own KV cache users)
    return runner(str(cached_checkpoint(CHECKPOINT)))


@functools.cache
def draft_runner(kind: str) -> ModelRunner:
    """A runner with a KV cache of the draft's own: the target itself (every greedy guess right: the same graph,
    so a cached compile), or its first two layers (some guesses right, some wrong)."""
    path = cached_checkpoint(CHECKPOINT) if kind == "self" else cached_layer_draft(CHECKPOINT, 2)
    return ModelRunner.from_pretrained(path, dtype="float32", num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)


def make_engine(spec: SpeculativeConfig | None, proposer=None, num_blocks: int | None = None,
                prefix_cache: bool = True) -> Engine:
    config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=128, enable_prefix_cache=prefix_cache,
                          debug_checks=True, speculative=spec)
    return Engine(target_runner(), Tokenizer.from_pretrained(cached_checkpoint(CHECKPOINT)), config,
                  num_blocks=num_blocks, proposer=proposer)


def run_all(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict[str, RequestOutput]:
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt, params)
    finished = helpers.run_all(engine)
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks, "KV blocks leaked"
    return finished


def workload(rng: np.random.Generator) -> list[tuple[str, list[int], SamplingParams]]:
    """Prompts that repeat themselves (n-gram lookup finds them), shared prefixes (cache hits), mixed options."""
    shared = rng.integers(0, 151_000, 40).tolist()
    requests = []
    for i in range(8):
        motif = rng.integers(0, 151_000, int(rng.integers(3, 9))).tolist()
        prompt = (shared if i % 2 else []) + motif * int(rng.integers(2, 6)) + rng.integers(0, 151_000, 3).tolist()
        params = SamplingParams.greedy(
            max_tokens=int(rng.integers(8, 40)), ignore_eos=True, n=2 if i == 3 else 1,
            logprobs=2 if i % 3 == 0 else None, speculative=i != 5, stop=("ab",) if i == 6 else ())
        requests.append((f"r{i}", prompt, params))
    requests.append(("again", requests[1][1], requests[1][2]))  # the same prompt again: a prefix-cache hit
    return requests


def compare(expected: dict[str, RequestOutput], got: dict[str, RequestOutput]) -> int:
    compared = 0
    for request_id, want in expected.items():
        have = got[request_id]
        assert len(have.outputs) == len(want.outputs)
        for a, b in zip(want.outputs, have.outputs):
            assert b.token_ids == a.token_ids, request_id
            assert (b.finish_reason, b.text, b.logprobs) == (a.finish_reason, a.text, a.logprobs), request_id
            compared += len(a.token_ids)
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["ngram", "draft-self", "draft-2-layers"])
@pytest.mark.parametrize("small_pool", [False, True])
def test_greedy_tokens_are_identical_with_speculation(proposer, small_pool, rng):
    requests = workload(rng)
    # 8 blocks (128 tokens) hold the longest request (at most 83 prompt + 39 output tokens) but few of the 9 at
    # once. 12 blocks did not force preemption: a draft of the target itself with k = 6 finished seed 38763509's
    # requests too fast to need any (at 8 blocks: 5-10 preemptions in each of 13 seeds, k = 5 and k = 7).
    num_blocks = 8 if small_pool else None
    expected = run_all(make_engine(None, num_blocks=num_blocks), requests)
    compared = proposed = accepted = 0
    ks = [int(rng.integers(2, 8))] if small_pool else [1, 8]  # k = 1..8 over the two cases
    for k in ks:
        if proposer == "ngram":
            spec, draft = SpeculativeConfig("ngram", k, ngram_min=1, max_batch_size=16), None
        else:
            spec = SpeculativeConfig("draft", k, draft_model=proposer, max_batch_size=16)
            draft = DraftProposer(draft_runner(proposer.removeprefix("draft-")), k)
        engine = make_engine(spec, draft, num_blocks=num_blocks)
        got = run_all(engine, requests)
        compared += compare(expected, got)
        proposed += engine.speculation.proposed
        accepted += engine.speculation.accepted
        assert engine.speculation.proposer_failures == 0
        if draft is not None:
            draft.keep_only(set())
            assert draft.pool.num_free == draft.pool.num_blocks, "draft KV blocks leaked"
        if small_pool:
            assert engine.scheduler.num_preemptions > 0
    print(f"{proposer}: compared {compared} tokens; accepted {accepted} of {proposed} guesses")
    # every request ignores EOS, so each output without a stop string runs to max_tokens
    guaranteed = sum(params.max_tokens * params.n for _, _, params in requests if not params.stop)
    assert compared >= guaranteed * len(ks) > 0 and proposed > 0
    if proposer == "draft-2-layers":
        # the rejection path on the real model; n-gram guesses may all be right when the random model loops (the
        # fake-model tests in tests/unit/test_speculative.py reject n-gram-style guesses on purpose). Two layers of a
        # random model may also guess nothing right (seed 1148548033: 0 of 163), so acceptance is not required here.
        assert accepted < proposed
    else:
        assert accepted > 0  # a model drafting for itself guesses right; n-gram guesses here always hit some


@pytest.mark.slow
def test_aborting_a_speculating_request_is_clean(rng):
    spec = SpeculativeConfig("ngram", 6, ngram_min=1, max_batch_size=16)
    engine = make_engine(spec)
    motif = rng.integers(0, 151_000, 5).tolist()
    for i in range(4):
        engine.add_request(f"r{i}", motif * 6, SamplingParams.greedy(max_tokens=200, ignore_eos=True))
    steps = 0
    while engine.speculation.verify_steps < 3 or steps < 4:
        engine.step()
        steps += 1
    assert engine.abort("r1") and engine.abort("r2")
    engine.check_blocks()
    while engine.has_unfinished():
        engine.step()
        engine.check_blocks()
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks
