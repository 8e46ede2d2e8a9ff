"""Prompt logprobs on the fake model (tests/engine_fakes.py), against the model's own distribution computed here
from the true token lists: prompts chunked over several steps, a prefix already in the cache (it must be computed
again for its rows), n > 1, and pools so small that sequences are preempted part-way through their prompts.
Seeds are printed; replay with MILI_TEST_SEED=<seed>.
"""

from __future__ import annotations

import numpy as np
import pytest

from mili.engine.config import EngineConfig
from mili.engine.engine import Engine
from mili.engine.sampler import log_softmax_rows
from mili.engine.sampling_params import SamplingParams
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, context_logits


def expected(prompt: list[int], top_n: int) -> list[tuple[int, float, int, list[int]]]:
    """(token, logprob, rank, top token ids) of each prompt token after the first, from the true contexts."""
    rows = []
    for i in range(1, len(prompt)):
        logprobs = log_softmax_rows(context_logits(np.array(prompt[:i]))[None])[0]
        token = prompt[i]
        rows.append((token, float(logprobs[token]), int((logprobs > logprobs[token]).sum()) + 1,
                     list(np.argsort(-logprobs, kind="stable")[:top_n])))
    return rows


@pytest.mark.parametrize("num_blocks, budget", [(256, 512), (256, 7), (12, 9)])
def test_prompt_logprobs_are_the_models_own(seed, num_blocks, budget):
    rng = np.random.default_rng(seed)
    engine = Engine(FakeRunner(num_blocks, 4, max_positions=num_blocks * 4), FakeTokenizer(),
                    EngineConfig(max_num_seqs=4, max_num_batched_tokens=budget))
    shared = rng.integers(0, VOCAB - 1, 13).tolist()
    requests = {}
    for i in range(6):
        prompt = shared + rng.integers(0, VOCAB - 1, int(rng.integers(1, 12))).tolist() if i % 2 else \
            rng.integers(0, VOCAB - 1, int(rng.integers(2, 30))).tolist()
        top_n = int(rng.integers(0, 4))
        params = SamplingParams(max_tokens=int(rng.integers(8, 24)), n=int(rng.integers(1, 3)), seed=i,
                                prompt_logprobs=top_n, ignore_eos=True)
        requests[f"r{i}"] = (prompt, top_n)
        engine.add_request(f"r{i}", prompt, params)
    engine.add_request("plain", shared, SamplingParams(max_tokens=3))  # caches the shared prefix early
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["plain"].prompt_logprobs is None
    compared = 0
    for request_id, (prompt, top_n) in requests.items():
        scored = finals[request_id].prompt_logprobs
        assert scored is not None and len(scored) == len(prompt) and scored[0] is None
        for got, (token, logprob, rank, top) in zip(scored[1:], expected(prompt, top_n), strict=True):
            assert (got.token, got.rank) == (token, rank)
            assert got.logprob == pytest.approx(logprob, abs=1e-6)
            assert [t for t, _ in got.top_logprobs] == top
            compared += 1
    assert compared == sum(len(p) - 1 for p, _ in requests.values())
    if num_blocks == 12:  # the tiny pool preempts: a preempted prompt resumes its scoring where it stopped
        assert engine.scheduler.num_preemptions > 0
    engine.check_blocks()
