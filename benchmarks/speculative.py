"""Speculative decoding on the Qwen3-0.6B-shaped checkpoint with a 2-layer draft of it (its embeddings, first two
layers and final norm): what a verify step costs, and what speculation does to decode speed.

    python -m benchmarks.speculative [--model DIR --draft-model DIR] [--dtype bfloat16] [--quantization int8]
                                     [--rounds 3] [--tokens 64] [--k 4]

1. Verify-step cost: one sequence at context 512, a step of k + 1 = 1, 2, 3, 5, 9 tokens with logits at every
   row, against a plain decode step (k + 1 = 1), interleaved rounds, medians.
2. Batch-1 decode tokens/s with speculation off, n-gram lookup and the draft model, on two workloads:
   "repeating" (a code-editing-like prompt the greedy output repeats) and "no-match" (seeded sampling at
   temperature 1: text that repeats nothing), with acceptance rate and mean accepted length beside each figure.
3. 16 concurrent requests: output tokens/s with speculation off and on (above --speculative-max-batch it turns
   itself off, which is what this checks costs nothing).
Every tokens/s comes with the weight traffic it implies (GB/s: decode steps x weight bytes) and its share of the
machine's read bandwidth, measured in the same run. Medians of interleaved rounds; the first run of each engine
(warm-up) is excluded.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import measure
from benchmarks.model import prefill_once, weight_bytes
from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.config import EngineConfig
from mili.engine.draft_proposer import DraftProposer
from mili.engine.engine import Engine
from mili.engine.model_runner import ModelRunner
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import SpeculativeConfig
from mili.tokenizer import Tokenizer

VERIFY_ROWS = (1, 2, 3, 5, 9)
CODE = '''def moving_average(values, window):
    """Mean of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    totals = []
    running = 0.0
    for i, value in enumerate(values):
        running += value
        if i >= window:
            running -= values[i - window]
        if i >= window - 1:
            totals.append(running / window)
    return totals
'''
EDIT_PROMPT = f"Rename `running` to `window_sum` in this function and return it whole:\n{CODE}\nHere it is:\n{CODE[:60]}"


def verify_costs(runner: ModelRunner, rounds: int, context: int = 512) -> dict[int, float]:
    blocks = list(range(runner.num_blocks))
    prefill_once(runner, np.random.default_rng(0).integers(0, 150_000, context), blocks)
    times: dict[int, list[float]] = {rows: [] for rows in VERIFY_ROWS}
    for _ in range(rounds):
        for rows in VERIFY_ROWS:
            for _ in range(6):
                batch = Batch.from_chunks([SequenceChunk([1] * rows, context, blocks, LogitRows.ALL)], runner.block_size)
                start = time.perf_counter()
                runner.run(batch)
                times[rows].append(time.perf_counter() - start)
    return {rows: statistics.median(t) for rows, t in times.items()}


@dataclass
class Run:
    tokens_per_s: float
    steps: int
    tokens: int
    stats: dict[str, float | int] | None


def timed_run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> Run:
    before = engine.speculation.as_dict()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, params)
    while engine.num_waiting or any(s.num_output_tokens == 0 for s in engine.scheduler.running):
        engine.step()  # prefills are not what this measures
    start, tokens, steps = time.perf_counter(), 0, 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens += sum(len(c.delta_token_ids) for c in out.outputs)
        steps += 1
    elapsed = time.perf_counter() - start
    after = engine.speculation.as_dict()
    stats = None
    if engine.proposer is not None:
        run = {key: after[key] - before[key] for key in ("proposed_tokens", "accepted_tokens", "emitted_tokens",
                                                         "verify_steps")}
        stats = {"acceptance_rate": run["accepted_tokens"] / max(1, run["proposed_tokens"]),
                 "mean_accepted_length": run["emitted_tokens"] / max(1, run["verify_steps"])}
    return Run(tokens / elapsed, steps, tokens, stats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="target checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    parser.add_argument("--draft-model", help="draft checkpoint folder (default: the target's first 2 layers)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--quantization", choices=("none", "int8"), default="none")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--k", type=int, default=4, help="speculative tokens per step (default 4)")
    args = parser.parse_args(argv)
    from mili.checkpoints import cached_checkpoint, cached_layer_draft  # writes checkpoints on first use
    model_dir = Path(args.model) if args.model else cached_checkpoint("qwen3-0.6b")
    draft_dir = Path(args.draft_model) if args.draft_model else cached_layer_draft("qwen3-0.6b", 2)
    quantization = None if args.quantization == "none" else args.quantization

    print("loading the target and the draft model...", flush=True)
    target = ModelRunner.from_pretrained(model_dir, dtype=args.dtype, quantization=quantization, num_blocks=256)
    draft = ModelRunner.from_pretrained(draft_dir, dtype=args.dtype, quantization=quantization, num_blocks=256)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    limits = measure()

    print("1. verify-step cost (context 512)...", flush=True)
    costs = verify_costs(target, args.rounds)

    def engine(method: str | None, max_num_seqs: int = 16) -> Engine:
        spec = None if method is None else SpeculativeConfig(method, args.k, draft_model=str(draft_dir) if
                                                              method == "draft" else None)
        proposer = DraftProposer(draft, args.k) if method == "draft" else None
        return Engine(target, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, speculative=spec), proposer=proposer)

    engines = {name: engine(None if name == "off" else name) for name in ("off", "ngram", "draft")}
    rng = np.random.default_rng(0)
    workloads = {
        "repeating": ([tokenizer.encode(EDIT_PROMPT)], SamplingParams.greedy(max_tokens=args.tokens, ignore_eos=True)),
        "no-match": ([rng.integers(0, 150_000, 200).tolist()],
                     SamplingParams(max_tokens=args.tokens, temperature=1.0, seed=7, ignore_eos=True)),
        "16 concurrent": ([rng.integers(0, 150_000, int(n)).tolist() for n in rng.integers(64, 256, 16)],
                          SamplingParams.greedy(max_tokens=args.tokens, ignore_eos=True)),
    }
    results: dict[tuple[str, str], list[Run]] = {}
    print("2-3. decode with speculation off / ngram / draft...", flush=True)
    for round_index in range(args.rounds + 1):  # round 0 warms every engine up and is not counted
        for workload, (prompts, params) in workloads.items():
            for name, eng in engines.items():
                if workload == "16 concurrent" and name == "draft":
                    continue
                run = timed_run(eng, prompts, params)
                if round_index:
                    results.setdefault((workload, name), []).append(run)
        print(f"round {round_index}/{args.rounds} done{' (warm-up)' if not round_index else ''}", flush=True)
    limits = limits.best_of(measure())

    step_bytes = weight_bytes(target)
    print(f"\n{limits.describe()}")
    print(f"target {model_dir.name} ({target.dtype.name}, {target.weight_format.value} weights, "
          f"{step_bytes / 1e9:.2f} GB a step), draft {draft_dir.name} ({draft.config.num_hidden_layers} layers), "
          f"k = {args.k}")
    print("\nverify step (one sequence, context 512): time vs a decode step")
    for rows, seconds in costs.items():
        print(f"  {rows} token{'s' if rows > 1 else ' '} {seconds * 1e3:7.1f} ms  {seconds / costs[1]:5.2f}x")
    print(f"\n{'workload':14s} {'speculation':11s} {'tok/s':>7s} {'vs off':>7s} {'steps/s':>7s} {'GB/s':>6s} "
          f"{'of read bw':>10s} {'accept':>7s} {'mean len':>8s}")
    for workload in workloads:
        base = statistics.median(r.tokens_per_s for r in results[(workload, "off")])
        for name in engines:
            runs = results.get((workload, name))
            if not runs:
                continue
            rate = statistics.median(r.tokens_per_s for r in runs)
            steps_per_s = statistics.median(r.steps / (r.tokens / r.tokens_per_s) for r in runs)
            gb_s = steps_per_s * step_bytes / 1e9
            stats = runs[-1].stats
            accept = f"{statistics.median(r.stats['acceptance_rate'] for r in runs):7.2f}" if stats else f"{'-':>7s}"
            length = (f"{statistics.median(r.stats['mean_accepted_length'] for r in runs):8.2f}" if stats
                      else f"{'-':>8s}")
            print(f"{workload:14s} {name:11s} {rate:7.2f} {rate / base:6.2f}x {steps_per_s:7.2f} {gb_s:6.1f} "
                  f"{gb_s / limits.read_gb_s:10.0%} {accept} {length}")


if __name__ == "__main__":
    main()
