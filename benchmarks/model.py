"""Whole-model speed of MILI's Qwen3 graph per run dtype: prefill tokens/s and batch-1 decode tokens/s.

    python -m benchmarks.model [--model DIR] [--dtypes float32,bfloat16] [--prompt 512] [--decode 32]

Without --model it uses the random-weight Qwen3-0.6B-shaped checkpoint (`make checkpoint-0.6b` writes it
once). The dtypes are timed in interleaved rounds, so both see the same machine conditions. Decode is
reported with the weight bytes it streams per token (GB/s), the number that bounds batch-1 decode.
Start-up (weights + compile or compile-cache load) is reported per dtype as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.model_runner import ModelRunner
from mili.model.qwen3 import graph_weight_shapes


@dataclass
class ModelRow:
    dtype: str
    startup_weights_s: float
    startup_compile_s: float
    prefill_tokens: int
    prefill_ms: float
    prefill_tok_s: float
    decode_ms: float
    decode_tok_s: float
    decode_weight_gb_s: float


def weight_bytes(runner: ModelRunner) -> int:
    """Bytes of weights one decode step reads (the tied embedding is read once, by the LM head)."""
    shapes = graph_weight_shapes(runner.config)
    if not runner.config.tie_word_embeddings:
        del shapes["embed_tokens"]  # only the step's one row is gathered
    return sum(int(np.prod(s)) for s in shapes.values()) * runner.dtype.size_in_bytes


def prefill_once(runner: ModelRunner, prompt: np.ndarray, blocks: list[int]) -> float:
    start = time.perf_counter()
    runner.run(Batch.from_chunks([SequenceChunk(prompt, 0, blocks, LogitRows.LAST)], runner.block_size))
    return time.perf_counter() - start


def decode_steps(runner: ModelRunner, prompt_len: int, steps: int, blocks: list[int]) -> list[float]:
    times = []
    token = 0
    for i in range(steps):
        start = time.perf_counter()
        logits = runner.run(Batch.from_chunks([SequenceChunk([token], prompt_len + i, blocks)], runner.block_size))
        times.append(time.perf_counter() - start)
        token = int(np.argmax(logits[0]))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen3 checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated run dtypes to compare")
    parser.add_argument("--prompt", type=int, default=512, help="prefill length in tokens (default 512)")
    parser.add_argument("--decode", type=int, default=32, help="decode steps per round (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--out", default="results/model.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    for name in ("prompt", "decode", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.model is None:
        from mili.checkpoints import cached_checkpoint  # writes the checkpoint on first use (needs transformers)
        model_dir = cached_checkpoint("qwen3-0.6b")
    else:
        model_dir = Path(args.model)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    block_size = 16
    num_blocks = -(-(args.prompt + args.decode) // block_size) + 1
    runners = {d: ModelRunner.from_pretrained(model_dir, dtype=d, num_blocks=num_blocks) for d in dtypes}

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 151_000, args.prompt)
    blocks = list(range(num_blocks))
    prefill: dict[str, list[float]] = {d: [] for d in dtypes}
    decode: dict[str, list[float]] = {d: [] for d in dtypes}
    for d, runner in runners.items():  # warm-up: first executions allocate and fault in pages
        prefill_once(runner, prompt, blocks)
        decode_steps(runner, args.prompt, 2, blocks)
    for round_index in range(args.repeats):
        for d, runner in runners.items():
            prefill[d].append(prefill_once(runner, prompt, blocks))
            decode[d].extend(decode_steps(runner, args.prompt, args.decode, blocks))
        print(f"round {round_index + 1}/{args.repeats} done", flush=True)

    rows = []
    for d, runner in runners.items():
        prefill_s, step_s = statistics.median(prefill[d]), statistics.median(decode[d])
        rows.append(ModelRow(
            dtype=d, startup_weights_s=runner.startup.weights_s, startup_compile_s=runner.startup.compile_s,
            prefill_tokens=args.prompt, prefill_ms=prefill_s * 1e3, prefill_tok_s=args.prompt / prefill_s,
            decode_ms=step_s * 1e3, decode_tok_s=1 / step_s, decode_weight_gb_s=weight_bytes(runner) / step_s / 1e9,
        ))
    print(f"\n{'dtype':9s} {'weights s':>9s} {'compile s':>9s} {'prefill ms':>10s} {'prefill tok/s':>13s} "
          f"{'decode ms':>9s} {'decode tok/s':>12s} {'weights GB/s':>12s}")
    for r in rows:
        print(f"{r.dtype:9s} {r.startup_weights_s:9.1f} {r.startup_compile_s:9.1f} {r.prefill_ms:10.1f} "
              f"{r.prefill_tok_s:13.1f} {r.decode_ms:9.1f} {r.decode_tok_s:12.2f} {r.decode_weight_gb_s:12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir), "repeats": args.repeats,
                               "note": "medians over interleaved rounds; decode at batch 1 after the prefill",
                               "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
