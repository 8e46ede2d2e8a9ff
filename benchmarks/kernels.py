"""Kernel benchmarks: each MILI op against MAX's own equivalent and numpy, measured side by side.

For every case both graphs are compiled once, then timed in interleaved rounds (the machine is shared
and noisy, so the two always see the same conditions); we report medians, achieved GB/s, and the
ratio MAX time / MILI time (> 1 means MILI is faster).

    python benchmarks/kernels.py [--repeats 50] [--out results/kernels.json]

Ops covered so far: RMSNorm (vs max.graph.ops.rms_norm) at Qwen3-0.6B's hidden size.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef, Graph, TensorType, TensorValue, ops

from mili.dtypes import numpy_to_buffer
from mili.kernels import kernel_package
from mili.model import ops as mili_ops

HIDDEN = 1024  # Qwen3-0.6B
TOKENS = (1, 16, 512, 2048)
EPS = 1e-6


@dataclass
class Row:
    op: str
    dtype: str
    shape: str
    mili_us: float
    max_us: float
    numpy_us: float
    mili_gb_s: float
    ratio_vs_max: float  # MAX time / MILI time: > 1 means MILI is faster
    ratio_vs_numpy: float


def _graph(name: str, dtype: DType, body: Callable[[TensorValue, TensorValue], TensorValue]) -> Graph:
    device = DeviceRef.CPU()
    types = [TensorType(dtype, ["tokens", HIDDEN], device), TensorType(dtype, [HIDDEN], device)]
    with Graph(name, input_types=types, custom_extensions=[kernel_package()]) as graph:
        x, weight = (v.tensor for v in graph.inputs)
        graph.output(body(x, weight))
    return graph


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _time_interleaved(callables: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median microseconds of each callable, timed in alternating order after a warm-up."""
    for fn in callables.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in callables}
    for _ in range(repeats):
        for name, fn in callables.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: _median_us(s) for name, s in samples.items()}


def _numpy_rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


def bench_rms_norm(session: InferenceSession, repeats: int) -> list[Row]:
    rows = []
    for dtype in (DType.float32, DType.bfloat16):
        print(f"  compiling RMSNorm graphs ({dtype})...", flush=True)
        ours = session.load(_graph("mili_rms_norm", dtype, lambda x, w: mili_ops.rms_norm(x, w, EPS)))
        theirs = session.load(_graph("max_rms_norm", dtype, lambda x, w: ops.rms_norm(x, w, EPS)))
        rng = np.random.default_rng()
        for tokens in TOKENS:
            x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
            w = rng.standard_normal(HIDDEN).astype(np.float32)
            inputs = [numpy_to_buffer(x, dtype), numpy_to_buffer(w, dtype)]
            times = _time_interleaved({
                "mili": lambda: ours.execute(*inputs),
                "max": lambda: theirs.execute(*inputs),
                "numpy": lambda: _numpy_rms_norm(x, w),
            }, repeats)
            bytes_moved = (2 * tokens * HIDDEN + HIDDEN) * dtype.size_in_bytes  # read x and w, write out
            rows.append(Row(
                op="rms_norm", dtype=str(dtype).removeprefix("DType."), shape=f"{tokens}x{HIDDEN}",
                mili_us=times["mili"], max_us=times["max"], numpy_us=times["numpy"],
                mili_gb_s=bytes_moved / (times["mili"] * 1e-6) / 1e9,
                ratio_vs_max=times["max"] / times["mili"], ratio_vs_numpy=times["numpy"] / times["mili"],
            ))
            print(f"    {rows[-1].dtype:9s} {rows[-1].shape:>10s}  mili {times['mili']:9.1f} us  "
                  f"max {times['max']:9.1f} us  x{rows[-1].ratio_vs_max:.2f}", flush=True)
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"{'op':10s} {'dtype':9s} {'shape':>10s} {'MILI us':>10s} {'MAX us':>10s} {'numpy us':>10s} " \
             f"{'MILI GB/s':>10s} {'vs MAX':>7s} {'vs numpy':>9s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.op:10s} {r.dtype:9s} {r.shape:>10s} {r.mili_us:10.1f} {r.max_us:10.1f} {r.numpy_us:10.1f} "
              f"{r.mili_gb_s:10.2f} {r.ratio_vs_max:6.2f}x {r.ratio_vs_numpy:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds per case (default 50)")
    parser.add_argument("--out", default="results/kernels.json", help="where to write the JSON results")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    session = InferenceSession(devices=[CPU()])
    print("RMSNorm: MILI vs max.graph.ops.rms_norm vs numpy", flush=True)
    rows = bench_rms_norm(session, args.repeats)
    print()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "repeats": args.repeats,
        "note": "medians of interleaved rounds; ratio = other time / MILI time (> 1: MILI faster)",
        "rows": [asdict(r) for r in rows],
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
