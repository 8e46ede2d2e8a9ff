"""The engine end to end on a random test checkpoint: exact tokens under batching, caching, preemption,
aborts and sampling, and zero leaked blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mili.engine.config import ContextTooLong, EngineConfig
from mili.engine.engine import Engine, RequestError
from mili.engine.outputs import RequestOutput
from mili.engine.sampling_params import SamplingParams
from mili.tokenizer import Tokenizer
from tests.integration.conftest import ModelPair, model_pair
from tests.integration.helpers import run_all

CHECKPOINT = "tiny-tied-gqa2-d64"


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    return model_pair(CHECKPOINT)


def new_engine(pair: ModelPair, num_blocks: int | None = None, **config) -> Engine:
    config.setdefault("debug_checks", True)
    return Engine(pair.runner, Tokenizer.from_pretrained(pair.path), EngineConfig(**config), num_blocks=num_blocks)


def prompts(rng: np.random.Generator, count: int, low: int = 4, high: int = 70) -> list[list[int]]:
    return [rng.integers(0, 151_000, int(rng.integers(low, high))).tolist() for _ in range(count)]


def tokens_alone(pair: ModelPair, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = new_engine(pair)
    engine.add_request("alone", prompt, params)
    return run_all(engine)["alone"].outputs[0].token_ids


GREEDY = SamplingParams.greedy(max_tokens=24, ignore_eos=True)


def test_greedy_matches_transformers_generate(pair: ModelPair, rng):
    engine = new_engine(pair)
    batch = prompts(rng, 4)
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, GREEDY)
    done = run_all(engine)
    compared = 0
    for i, p in enumerate(batch):
        with torch.no_grad():
            out = pair.reference.generate(torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        theirs = out.sequences[0, len(p):].tolist()
        ours = done[str(i)].outputs[0].token_ids
        for step, logits in enumerate(out.logits):
            top2 = torch.topk(logits[0], 2).values
            if float(top2[0] - top2[1]) < 1e-4 * float(logits[0].abs().max()):
                break  # a near-tie: past it both continuations are right
            assert ours[step] == theirs[step], f"prompt {i} token {step}: {ours} vs {theirs}"
            compared += 1
    assert compared >= 4 * 24 // 2, f"only {compared} of 96 tokens were away from near-ties"


def test_cache_hit_gives_exactly_the_tokens_of_a_miss(pair: ModelPair, rng):
    shared = prompts(rng, 1, 100, 101)[0]
    engine = new_engine(pair)
    engine.add_request("miss", shared + [7, 8, 9], GREEDY)
    miss = run_all(engine)["miss"]
    engine.add_request("hit", shared + [7, 8, 9], GREEDY)
    hit = run_all(engine)["hit"]
    assert miss.metrics.cached_tokens == 0 and hit.metrics.cached_tokens == 96  # whole blocks, never all
    assert hit.outputs[0].token_ids == miss.outputs[0].token_ids
    off = new_engine(pair, enable_prefix_cache=False)
    off.add_request("a", shared, GREEDY)
    run_all(off)
    off.add_request("b", shared, GREEDY)
    assert run_all(off)["b"].metrics.cached_tokens == 0


def test_a_request_gets_the_same_tokens_alone_or_among_16_others(pair: ModelPair, rng):
    batch = prompts(rng, 17)
    engine = new_engine(pair, max_num_seqs=17, max_num_batched_tokens=96)  # forces chunked prefills
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, GREEDY)
    together = run_all(engine)
    for i in (0, 9, 16):
        assert together[str(i)].outputs[0].token_ids == tokens_alone(pair, batch[i], GREEDY), i


def test_seeded_sampling_is_reproducible_in_any_company(pair: ModelPair, rng):
    prompt = prompts(rng, 1)[0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=42, max_tokens=16, ignore_eos=True)
    first = tokens_alone(pair, prompt, seeded)
    engine = new_engine(pair)
    for i, p in enumerate(prompts(rng, 5)):
        engine.add_request(f"other{i}", p, SamplingParams(temperature=1.0, max_tokens=16))
    engine.add_request("seeded", prompt, seeded)
    assert run_all(engine)["seeded"].outputs[0].token_ids == first
    assert tokens_alone(pair, prompt, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=43,
                                                     max_tokens=16, ignore_eos=True)) != first


def test_n_siblings_share_the_prompt_and_differ(pair: ModelPair, rng):
    engine = new_engine(pair)
    engine.add_request("n", prompts(rng, 1, 40, 41)[0], SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=12,
                                                                  ignore_eos=True))
    out = run_all(engine)["n"]
    assert [len(c.token_ids) for c in out.outputs] == [12, 12, 12]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_100_requests_with_10_aborts_finish_exactly_and_leak_nothing(pair: ModelPair, rng):
    engine = new_engine(pair, max_num_seqs=32, max_num_batched_tokens=256)
    lengths = {f"r{i}": int(rng.integers(1, 30)) for i in range(100)}
    for (rid, n), p in zip(lengths.items(), prompts(rng, 100, 2, 40)):
        engine.add_request(rid, p, SamplingParams(temperature=0.8, max_tokens=n, ignore_eos=True))
    to_abort = set(rng.choice(sorted(lengths), 10, replace=False))
    finished: dict[str, RequestOutput] = {}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.check_blocks()
        steps += 1
        if steps == 5:
            for rid in to_abort:
                assert engine.abort(rid) or rid in finished
    engine.check_blocks()
    for rid, n in lengths.items():
        if rid not in to_abort:
            assert len(finished[rid].outputs[0].token_ids) == n
            assert finished[rid].outputs[0].finish_reason == "length"
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_small_pool_preempts_and_still_gives_the_right_tokens(pair: ModelPair, rng):
    batch = prompts(rng, 6, 30, 60)
    params = SamplingParams.greedy(max_tokens=40, ignore_eos=True)
    engine = new_engine(pair, num_blocks=16, max_num_seqs=6)  # 256 tokens of KV for ~6 x 85
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, params)
    done = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(batch):
        assert done[str(i)].outputs[0].token_ids == tokens_alone(pair, p, params), i


def test_stop_strings_end_the_text_even_across_tokens(pair: ModelPair, rng):
    tokenizer = Tokenizer.from_pretrained(pair.path)
    for prompt in prompts(rng, 20):  # the first whose greedy text has a token of 2+ characters past the third
        free = tokens_alone(pair, prompt, GREEDY)
        text = tokenizer.decode(free)
        pieces = [tokenizer.decode(free[:i]) for i in range(len(free) + 1)]
        start = next((i for i in range(3, len(free) - 1) if len(pieces[i + 1]) - len(pieces[i]) >= 2), None)
        if start is not None:
            break
    assert start is not None, "no prompt gave a multi-character token to build the stop string from"
    # a stop string that starts inside one token's text and ends inside a later one
    stop = text[len(pieces[start + 1]) - 1:len(pieces[start + 2]) + 1]
    assume_position = text.find(stop)
    engine = new_engine(pair)
    engine.add_request("s", prompt, SamplingParams.greedy(max_tokens=24, ignore_eos=True, stop=(stop,)))
    streamed = ""
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.outputs[0].delta
            final = out
    assert final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].text == text[:assume_position] == streamed
    assert stop not in streamed


def test_requests_that_cannot_run_are_refused_up_front(pair: ModelPair):
    engine = new_engine(pair, num_blocks=4)  # 64 tokens of KV: the context is capped there
    assert engine.max_model_len == 64
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(RequestError, match="context is 64 tokens"):
        engine.add_request("b", list(range(100)), GREEDY)
    engine.add_request("d", [1, 2], GREEDY)
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("d", [1, 2], GREEDY)
    assert engine.abort("d") and not engine.abort("d")
    with pytest.raises(ContextTooLong, match="--kv-cache-memory"):
        new_engine(pair, num_blocks=4, max_model_len=65)


def test_a_request_longer_than_the_pool_finishes_with_length_instead_of_hanging(pair: ModelPair, rng):
    """The reproduced hang: one request whose prompt + output outgrew the whole KV pool preempted itself and
    blocked the queue forever. Now its context is capped at what the pool holds."""
    engine = new_engine(pair, num_blocks=8)  # 128 tokens
    engine.add_request("long", prompts(rng, 1, 20, 21)[0], SamplingParams.greedy(max_tokens=3500, ignore_eos=True))
    engine.add_request("next", [5, 6, 7], GREEDY)
    done = run_all(engine)
    assert done["long"].outputs[0].finish_reason == "length" and len(done["long"].outputs[0].token_ids) == 108
    assert len(done["next"].outputs[0].token_ids) == 24


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(pair: ModelPair, monkeypatch):
    engine = new_engine(pair)
    engine.add_request("doomed", [5, 6, 7], GREEDY)
    real_run = pair.runner.run
    monkeypatch.setattr(pair.runner, "run", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort" and "boom" in out.error
    monkeypatch.setattr(pair.runner, "run", real_run)
    engine.add_request("fine", [5, 6, 7], GREEDY)
    assert len(run_all(engine)["fine"].outputs[0].token_ids) == 24


def test_a_hostile_sampling_request_fails_nothing_and_the_engine_goes_on(pair: ModelPair, monkeypatch):
    """The reproduced crash: temperature 1e-308 with min_p raised in the sampler, outside the guarded model
    call, and killed the engine. Now it samples greedily; and a sampler that does raise fails only the
    requests of its step."""
    engine = new_engine(pair)
    engine.add_request("tiny-t", [5, 6, 7], SamplingParams(temperature=1e-308, min_p=0.1, max_tokens=8))
    assert run_all(engine)["tiny-t"].outputs[0].token_ids == tokens_alone(pair, [5, 6, 7],
                                                                          SamplingParams.greedy(max_tokens=8))
    engine.add_request("doomed", [5, 6, 7], GREEDY)
    monkeypatch.setattr(engine.sampler, "sample",
                        lambda *args, **kwargs: (_ for _ in ()).throw(FloatingPointError("nan")))
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort" and "nan" in out.error
    monkeypatch.undo()
    engine.add_request("fine", [5, 6, 7], GREEDY)
    assert len(run_all(engine)["fine"].outputs[0].token_ids) == 24


def test_streamed_deltas_add_up_to_the_whole_completion(pair: ModelPair, rng):
    """Every token and logprob reaches the reader exactly once, in order, also while a stop-string prefix
    holds the text back; the deltas join to the final text."""
    tokenizer = Tokenizer.from_pretrained(pair.path)
    prompt = prompts(rng, 1)[0]
    free = tokens_alone(pair, prompt, GREEDY)
    text = tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 3] + "never"  # its prefix is seen, the whole never comes
    params = SamplingParams.greedy(max_tokens=24, ignore_eos=True, stop=(stop,), logprobs=2)
    engine = new_engine(pair)
    engine.add_request("s", prompt, params)
    text_parts, tokens, logprobs = [], [], []
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            c = out.outputs[0]
            text_parts.append(c.delta)
            tokens += c.delta_token_ids
            logprobs += c.delta_logprobs
            final = out
    c = final.outputs[0]
    assert len(tokens) == 24 and tokens == c.token_ids == free
    assert [s.token for s in logprobs] == tokens and logprobs == c.logprobs
    assert "".join(text_parts) == c.text == text
