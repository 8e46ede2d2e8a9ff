"""Engine benchmarks: offline throughput at several concurrencies, and TTFT with a shared prefix.

    python -m benchmarks.throughput [--model DIR] [--prompt 32] [--new 32] [--concurrency 1,16,64]

Throughput: N requests (random prompts of --prompt tokens, --new greedy tokens each, EOS ignored) submitted
at once to one engine; concurrency 1 runs requests one after another. Reports output tokens/s and total
tokens/s. TTFT: a request whose prompt is a 1,000-token prefix plus a short suffix, first on a cold prefix
cache, then again with a different suffix (the prefix now cached). Without --model it uses the random
Qwen3-0.6B-shaped checkpoint (written on first use; needs the test extras).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mili.engine.engine import Engine
from mili.engine.sampling_params import SamplingParams


@dataclass
class ThroughputRow:
    concurrency: int
    requests: int
    seconds: float
    output_tok_s: float
    total_tok_s: float


def run_batch(engine: Engine, prompts: list[list[int]], params: SamplingParams, concurrency: int) -> float:
    start = time.perf_counter()
    pending = list(enumerate(prompts))
    in_flight = 0
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(f"req-{time.monotonic_ns()}-{i}", prompt, params)
            in_flight += 1
        for out in engine.step():
            in_flight -= out.finished
    return time.perf_counter() - start


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    engine.add_request(f"ttft-{time.monotonic_ns()}", prompt, SamplingParams.greedy(max_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                return time.perf_counter() - start, out.metrics.cached_tokens
    raise RuntimeError("the request never finished")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen3 checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    parser.add_argument("--dtype", default=None, help="run dtype (default: the device's default)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per request (default 32)")
    parser.add_argument("--new", type=int, default=32, help="generated tokens per request (default 32)")
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated request counts in flight")
    parser.add_argument("--sequential-requests", type=int, default=4,
                        help="requests timed one after another for concurrency 1 (default 4)")
    parser.add_argument("--out", default="results/throughput.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.model is None:
        from mili.checkpoints import cached_checkpoint
        model_dir = str(cached_checkpoint("qwen3-0.6b"))
    else:
        model_dir = args.model
    levels = [int(c) for c in args.concurrency.split(",")]
    largest = max(levels)
    engine = Engine.from_pretrained(model_dir, dtype=args.dtype, max_num_seqs=largest,
                                    max_num_batched_tokens=max(512, largest), kv_cache_bytes=2 << 30)
    rng = np.random.default_rng(0)
    params = SamplingParams.greedy(max_tokens=args.new, ignore_eos=True)
    run_batch(engine, [rng.integers(0, 151_000, args.prompt).tolist()], params, 1)  # warm-up

    rows = []
    for level in levels:
        count = args.sequential_requests if level == 1 else level
        prompts = [rng.integers(0, 151_000, args.prompt).tolist() for _ in range(count)]
        seconds = run_batch(engine, prompts, params, level)
        rows.append(ThroughputRow(level, count, seconds, count * args.new / seconds,
                                  count * (args.prompt + args.new) / seconds))
        print(f"concurrency {level:3d}: {count} requests in {seconds:.1f} s, "
              f"{rows[-1].output_tok_s:.1f} output tok/s", flush=True)

    prefix = rng.integers(0, 151_000, 1000).tolist()
    cold, cold_cached = ttft(engine, prefix + rng.integers(0, 151_000, 16).tolist())
    warm, warm_cached = ttft(engine, prefix + rng.integers(0, 151_000, 16).tolist())
    print(f"TTFT, 1,016-token prompt: {cold * 1e3:.0f} ms cold ({cold_cached} cached), "
          f"{warm * 1e3:.0f} ms with the 1,000-token prefix cached ({warm_cached} cached tokens)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": model_dir, "dtype": str(engine.runner.dtype), "prompt_tokens": args.prompt,
        "new_tokens": args.new, "throughput": [asdict(r) for r in rows],
        "ttft_ms": {"cold": cold * 1e3, "prefix_cached": warm * 1e3, "cached_tokens": warm_cached},
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
