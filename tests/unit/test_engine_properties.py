"""Randomised property test of the engine's host side (scheduler, prefix cache, block pool, outputs) on a
fake model that checks the KV bookkeeping for real (tests/engine_fakes.py).

Thousands of random workloads on tiny pools: long outputs, prompts sharing prefixes, chunked prefills,
many preemptions, aborts mid-way, n > 1, salts, the prefix cache on and off. For each one:
- progress: whenever requests are in the engine, every step computes something or finishes something;
- it drains: every request finishes, within a bound on the number of steps;
- the block bookkeeping holds after every step, and nothing leaks once all is done;
- every greedy completion is exactly the reference's tokens, up to its finish, with the right reason.

The seed is printed; replay a failure with MILI_TEST_SEED=<seed> (and MILI_TEST_WORKLOADS=<n>).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mili.engine.config import EngineConfig
from mili.engine.engine import Engine
from mili.engine.outputs import RequestOutput
from mili.engine.sampling_params import SamplingParams
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, reference_next_token

EOS = VOCAB - 1


@dataclass
class Planned:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    salt: str | None
    arrives_at_step: int
    abort_at_step: int | None


def reference(prompt: list[int], params: SamplingParams, context_limit: int) -> tuple[list[int], str]:
    """Greedy tokens and finish reason from the true token list (no cache involved)."""
    context, out = list(prompt), []
    while True:
        token = reference_next_token(context)
        out.append(token)
        context.append(token)
        if token == EOS and not params.ignore_eos:
            return out, "stop"
        if len(out) >= params.max_tokens or len(context) >= context_limit:
            return out, "length"


def random_workload(rng: np.random.Generator) -> tuple[Engine, list[Planned]]:
    block_size = int(rng.choice([1, 2, 4]))
    num_blocks = int(rng.integers(3, 24))
    config = EngineConfig(max_num_seqs=int(rng.integers(1, 9)), max_num_batched_tokens=int(rng.integers(1, 40)),
                          enable_prefix_cache=bool(rng.random() < 0.8))
    # half the time the model's context is longer than the whole cache (as for real models and small caches)
    max_positions = num_blocks * block_size * int(rng.choice([1, 8]))
    engine = Engine(FakeRunner(num_blocks, block_size, max_positions=max_positions), FakeTokenizer(), config)
    capacity = num_blocks * block_size  # tokens the whole KV cache holds
    prefixes = [rng.integers(0, VOCAB - 1, int(rng.integers(1, capacity))).tolist() for _ in range(2)]
    planned = []
    for i in range(int(rng.integers(1, 10))):
        length = int(rng.integers(1, capacity))
        shared = prefixes[int(rng.integers(2))][:int(rng.integers(0, length + 1))]
        prompt = (shared + rng.integers(0, VOCAB - 1, length).tolist())[:length]
        sampled = rng.random() < 0.3
        params = SamplingParams(
            n=int(rng.choice([1, 1, 1, 2, 3])), max_tokens=int(rng.integers(1, 2 * capacity)),
            temperature=0.8 if sampled else 0.0, top_k=int(rng.integers(0, 8)), seed=int(rng.integers(1 << 30)),
            ignore_eos=bool(rng.random() < 0.7))
        planned.append(Planned(f"r{i}", prompt, params, "salt" if rng.random() < 0.1 else None,
                               int(rng.integers(0, 6)), int(rng.integers(1, 30)) if rng.random() < 0.15 else None))
    return engine, planned


def run_workload(engine: Engine, planned: list[Planned], max_steps: int = 5000) -> dict[str, RequestOutput]:
    runner = engine.runner
    finished: dict[str, RequestOutput] = {}
    aborted: set[str] = set()
    step = 0
    while step <= max(p.arrives_at_step for p in planned) or engine.has_unfinished():
        for p in planned:
            if p.arrives_at_step == step:
                engine.add_request(p.request_id, p.prompt, p.params, salt=p.salt)
            if p.abort_at_step == step and p.request_id not in finished and engine.abort(p.request_id):
                aborted.add(p.request_id)
        had_work, model_steps = engine.has_unfinished(), runner.steps
        outputs = engine.step()
        for out in outputs:
            assert out.request_id not in finished, f"{out.request_id} produced output after it finished"
            if out.finished:
                finished[out.request_id] = out
        if had_work:
            assert runner.steps > model_steps or any(o.finished for o in outputs), \
                f"step {step}: requests are waiting or running, but nothing was computed or finished"
        engine.check_blocks()
        step += 1
        assert step < max_steps, f"the engine did not drain in {max_steps} steps"
    assert set(finished) | aborted == {p.request_id for p in planned}
    engine.cache.clear()
    assert engine.pool.num_free == engine.pool.num_blocks, "KV blocks leaked"
    return finished


def check_outputs(engine: Engine, planned: list[Planned], finished: dict[str, RequestOutput]) -> int:
    """Greedy completions equal the reference; returns how many tokens were compared."""
    compared = 0
    for p in planned:
        out = finished.get(p.request_id)
        if out is None:
            continue  # aborted before it finished
        assert len(out.outputs) == p.params.n
        for completion in out.outputs:
            if p.params.is_greedy:
                expected, reason = reference(p.prompt, p.params, engine.max_model_len)
                assert (completion.token_ids, completion.finish_reason) == (expected, reason), p
                compared += len(expected)
            else:
                assert 1 <= len(completion.token_ids) <= p.params.max_tokens
    return compared


def test_random_workloads_drain_exactly_without_leaks():
    seed = int(os.environ.get("MILI_TEST_SEED", np.random.SeedSequence().entropy % (1 << 32)))
    workloads = int(os.environ.get("MILI_TEST_WORKLOADS", 1000))
    print(f"engine property test: seed {seed}, {workloads} workloads (replay: MILI_TEST_SEED={seed})")
    rng = np.random.default_rng(seed)
    compared = preemptions = 0
    for index in range(workloads):
        engine, planned = random_workload(rng)
        try:
            finished = run_workload(engine, planned)
            compared += check_outputs(engine, planned, finished)
        except AssertionError as exc:
            raise AssertionError(f"workload {index} of seed {seed}: {exc}") from exc
        preemptions += engine.scheduler.num_preemptions
    print(f"compared {compared} greedy tokens; {preemptions} preemptions")
    assert compared > 10 * workloads and preemptions > workloads  # the workloads really were tight
