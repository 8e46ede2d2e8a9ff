"""Structured output's cost: the grammar engines' mask fill on Qwen3's vocabulary, and MILI's decode speed with and
without a JSON schema.

    python -m benchmarks.structured [--model DIR] [--dtype bfloat16] [--rounds 3] [--tokens 128]
    make bench-structured

1. Grammar engines, side by side in one run (benchmarks/peers/runners/grammar_worker.py): llguidance (MILI's, in
   MILI's venv) and xgrammar (in the vLLM peer's venv, which ships it; skipped with the reason where that peer is
   not set up). Per workload (a nested JSON schema, any JSON object, a regex) and batch (1, 16): median, mean
   and p90 microseconds to fill the masks of one step, and what a new request's matcher costs (first compile of
   the grammar, and once it is cached).
2. MILI's engine, batch 1 and 16: decode tokens/s of requests under a JSON schema (an array of objects with
   enums, bounded strings and integers, longer than --tokens, so every request generates exactly --tokens)
   against the same requests unconstrained (EOS ignored), both seeded sampling at temperature 1. Rounds
   interleave the two; medians. Each tokens/s comes with the weight traffic it implies (GB/s: decode steps x
   weight bytes) and its share of the machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.machine import measure
from benchmarks.model import weight_bytes
from benchmarks.peers.home import PeerHome
from benchmarks.report import markdown_table
from mili.checkpoints import qwen3_tokenizer_dir
from mili.engine.engine import Engine
from mili.engine.sampling_params import SamplingParams
from mili.engine.structured_output import StructuredOutput

WORKER = Path(__file__).resolve().parent / "peers" / "runners" / "grammar_worker.py"
SCHEMA = {"type": "array", "minItems": 40, "maxItems": 40, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "colour", "tags"],
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                   "name": {"type": "string", "minLength": 3, "maxLength": 12},
                   "colour": {"enum": ["red", "green", "blue", "dark grey"]},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1,
                            "maxItems": 3}}}}


@dataclass
class DecodeRow:
    batch: int
    constrained: bool
    tokens: int
    seconds: float
    tok_s: float
    steps: int
    gb_s: float
    read_bw_pct: float


def grammar_engines(vocab_size: int) -> tuple[list[dict], dict[str, str]]:
    """Each engine's worker output (rows tagged with the engine), and why an engine did not run."""
    pythons = {"llguidance": Path(sys.executable), "xgrammar": PeerHome("vllm").python}
    results, skipped = [], {}
    for engine, python in pythons.items():
        if not python.exists():
            skipped[engine] = f"no {python} (set up the vLLM peer: make bench-peers-setup BENCH_ARGS='--only vllm')"
            continue
        print(f"grammar engine {engine} ({python}) ...", flush=True)
        done = subprocess.run([str(python), str(WORKER), "--engine", engine, "--tokenizer", str(qwen3_tokenizer_dir()),
                               "--vocab-size", str(vocab_size)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            skipped[engine] = f"the worker failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}"
            continue
        report = json.loads(done.stdout)
        results += [{"engine": f"{engine} {report['version']}", **row} for row in report["rows"]]
    return results, skipped


def decode_run(engine: Engine, batch: int, tokens: int, constrained: bool, seed: int) -> tuple[float, int, int]:
    """(seconds, generated tokens, engine steps) for `batch` requests generating `tokens` each."""
    structured = StructuredOutput.json_schema(SCHEMA) if constrained else None
    for i in range(batch):
        engine.add_request(f"{constrained}-{seed}-{i}", f"Request {i}: a list of items as JSON.",
                           SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed + i, ignore_eos=not constrained,
                                          structured_output=structured))
    generated = steps = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.finished:
                generated += out.outputs[0].num_tokens
    return time.perf_counter() - start, generated, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen3 checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    parser.add_argument("--dtype", help="run dtype (default: the checkpoint's)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per figure (default 3)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens each request generates (default 128)")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--out", default="structured", help="results/NAME.json (default structured)")
    args = parser.parse_args(argv)
    if args.model is None:
        from mili.checkpoints import cached_checkpoint
        model_dir = str(cached_checkpoint("qwen3-0.6b"))
    else:
        model_dir = args.model
    batches = [int(b) for b in args.batches.split(",")]
    limits = measure()
    print(limits.describe(), flush=True)

    grammar_rows, skipped = grammar_engines(151936)
    print("\n" + markdown_table(
        ["engine", "workload", "batch", "mask us (median)", "mean", "p90", "first matcher ms", "cached matcher ms"],
        [[r["engine"], r["workload"], str(r["batch"]), f"{r['mask_us_median']:.1f}", f"{r['mask_us_mean']:.1f}",
          f"{r['mask_us_p90']:.1f}", f"{r['first_matcher_ms']:.2f}", f"{r['later_matcher_ms']:.3f}"]
         for r in grammar_rows]))
    for engine, why in skipped.items():
        print(f"{engine}: not measured: {why}")

    engine = Engine.from_pretrained(model_dir, dtype=args.dtype, max_num_seqs=max(batches), kv_cache_bytes=1 << 30)
    step_bytes = weight_bytes(engine.runner)
    decode_run(engine, 2, 8, True, 0)  # warm-up: compiles the schema, touches every path once
    decode_run(engine, 2, 8, False, 0)
    samples: dict[tuple[int, bool], list[tuple[float, int, int]]] = {}
    for round_index in range(args.rounds):
        for batch in batches:
            for constrained in (False, True):
                samples.setdefault((batch, constrained), []).append(
                    decode_run(engine, batch, args.tokens, constrained, 1000 * round_index))
    limits = limits.best_of(measure())
    rows = []
    for (batch, constrained), runs in samples.items():
        seconds = statistics.median(r[0] for r in runs)
        tokens, steps = runs[0][1], runs[0][2]
        gb_s = steps * step_bytes / seconds / 1e9
        rows.append(DecodeRow(batch, constrained, tokens, seconds, tokens / seconds, steps, gb_s,
                              100 * gb_s / limits.read_gb_s))
    print("\n" + markdown_table(
        ["batch", "JSON schema", "tokens", "seconds (median)", "tok/s", "steps", "weight GB/s", "% of read bw",
         "vs unconstrained"],
        [[str(r.batch), "yes" if r.constrained else "no", str(r.tokens), f"{r.seconds:.2f}", f"{r.tok_s:.1f}",
          str(r.steps), f"{r.gb_s:.1f}", f"{r.read_bw_pct:.0f}%",
          f"{r.tok_s / next(u.tok_s for u in rows if u.batch == r.batch and not u.constrained):.3f}x"]
         for r in rows]))
    out = Path(__file__).resolve().parent / "results" / f"{args.out}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": limits.as_dict(), "model": model_dir, "dtype": str(engine.runner.dtype),
                               "grammar_engines": grammar_rows, "skipped": skipped,
                               "decode": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
