"""MILI's linear op (bf16 and int8 packed weights) against MAX's ops.matmul, torch's F.linear and numpy, and on GGUF
Q4_0 / Q4_K / Q6_K blocks against MAX's own quantized matmul (ops.qmatmul, MAX's kernels in
max/kernels/src/quantization), on Qwen3-0.6B's projection shapes, measured side by side in interleaved rounds
(medians).

    python -m benchmarks.linear [--repeats 10] [--quick] [--shapes qkv,lm_head] [--rows 1,16]
                                [--contenders MILI,torch] [--out benchmarks/results/linear.json]

Rows M = 1 (batch-1 decode), 16 (a decode batch) and 512 (a prefill chunk). Each round gives every contender a
burst of calls and drops the first of each burst (see time_in_bursts). For M = 1 and 16 every contender
reads its weights from DRAM: each call takes the next of enough weight copies to overflow the caches (a
decode step streams 1.2 GB of weights, none of it cached). Every figure is printed with achieved GB/s of
weight traffic (and % of the machine's read bandwidth) or GFLOP/s (and % of the float32 FMA rate), both
measured in the same run (benchmarks/machine.py). Activations are bfloat16 for MILI and the bf16 peers,
float32 for the float32 ones and for ops.qmatmul (its only input dtype); MILI's output is the activation dtype.
MILI's 4- and 6-bit ops quantize activations to int8 per 32 inputs, as MAX's and llama.cpp's do (Q8_K / Q8_0).
The Q4_0 blocks are gguf-py's quantization of the weights; gguf-py cannot quantize K-quants, so Q4_K and Q6_K are
random codes and sub-scales under float16 super-block scales (a kernel's speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize
from max.graph import DeviceRef, TensorType, ops
from max.graph.quantization import QuantizationEncoding

from benchmarks.kernels import graph
from benchmarks.machine import MachineLimits, measure
from mili.dtypes import numpy_to_buffer
from mili.gguf.weights import pack_parts, tensor_layout
from mili.model import packed_linear
from mili.model.packed_linear import PackedShape, WeightFormat, pack_weight

# (name, K, N): Qwen3-0.6B's fused q/k/v, o_proj, fused gate/up, down_proj and the LM head
SHAPES = (("qkv", 1024, 4096), ("o_proj", 2048, 1024), ("gate_up", 1024, 6144), ("down", 3072, 1024),
          ("lm_head", 1024, 151936))
ROWS = (1, 16, 512)
# GGUF block types both MILI's ops and MAX's ops.qmatmul run, by contender suffix
GGUF_TYPES = {"q4_0": GGMLQuantizationType.Q4_0, "q4_k": GGMLQuantizationType.Q4_K,
              "q6_k": GGMLQuantizationType.Q6_K}
K_QUANT_SCALE_FIELDS = {GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q6_K: (208,)}  # float16 d (dmin)
COLD_BYTES = 384 << 20  # weight copies per contender for DRAM-bound cases: well past any L3 here
CPU_REF = DeviceRef.CPU()
BURST = 6  # calls per contender per round; the first of each burst is not counted
SETTLE_S = 0.3  # quiet time before each burst: longer than OpenMP's default spin-wait (KMP_BLOCKTIME 200 ms)
MIN_SECONDS_PER_CASE = 2.0


def time_in_bursts(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median microseconds per call, in interleaved rounds where each contender makes a burst of BURST calls after
    SETTLE_S of quiet, and the first call of every burst is dropped. torch's OpenMP threads (and OpenBLAS's) keep
    spinning for up to 200 ms after a call, and on two cores that steals whatever runs next: single interleaved
    calls measured MILI's 8 MB GEMV at a quarter of its speed right after torch."""
    start = time.perf_counter()
    for fn in contenders.values():
        fn()
    per_round = (time.perf_counter() - start) * BURST
    rounds = max(repeats, min(50, int(MIN_SECONDS_PER_CASE / max(per_round, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            time.sleep(SETTLE_S)
            for call in range(BURST):
                began = time.perf_counter()
                fn()
                if call:
                    samples[name].append(time.perf_counter() - began)
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


@dataclass
class Result:
    shape: str
    rows: int
    contender: str
    us: float
    weight_bytes: int
    gb_s: float
    gflop_s: float
    share_of_limit: float  # GEMV: of read bandwidth; otherwise: of the float32 FMA rate


def gguf_blocks(tensor_type: GGMLQuantizationType, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """W [N, K] as GGUF blocks of `tensor_type`, uint8 [N, bytes per row]: gguf-py's quantization for Q4_0; for
    the K-quants (no quantizer in gguf-py) random codes and sub-scales with float16 super-block scales of 1e-3."""
    if tensor_type not in K_QUANT_SCALE_FIELDS:
        return quantize(w, tensor_type)
    block, size = GGML_QUANT_SIZES[tensor_type]
    blocks = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for at in K_QUANT_SCALE_FIELDS[tensor_type]:
        blocks[:, :, at:at + 2] = np.full(blocks.shape[:2] + (1,), 1e-3, np.float16).view(np.uint8)
    return blocks.reshape(w.shape[0], -1)


class _StoredTensor:
    """The fields of a gguf ReaderTensor that mili.gguf.weights.pack_parts reads."""

    def __init__(self, tensor_type: GGMLQuantizationType, data: np.ndarray, rows: int, cols: int) -> None:
        self.name, self.tensor_type, self.data, self.shape = tensor_type.name, tensor_type, data, (cols, rows)


@torch.no_grad()
def _torch_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w)


class Contenders:
    """Compiled graphs and weight copies for one (shape, rows); `calls()` gives each contender's timed call."""

    def __init__(self, session: InferenceSession, k: int, n: int, rows: int, copies_for: Callable[[int], int],
                 rng: np.random.Generator, keep: Callable[[str], bool]) -> None:
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        x = rng.standard_normal((rows, k)).astype(np.float32)
        self.weight_bytes: dict[str, int] = {}
        self._calls: dict[str, Callable[[], object]] = {}
        x_bf16 = numpy_to_buffer(x, DType.bfloat16)
        for fmt in (f for f in (WeightFormat.BF16, WeightFormat.INT8) if keep(f"MILI {f.value}")):
            packed = pack_weight(w, fmt)
            model = session.load(self._mili_graph(PackedShape(fmt, n, k), f"{fmt.value}_{k}_{n}"))
            arrays = [list(packed.buffers("w").values())]
            arrays += [[Buffer.from_numpy(a.copy()).view(b.dtype) for a, b in zip(packed.arrays, arrays[0], strict=True)]
                       for _ in range(copies_for(packed.shape.nbytes()) - 1)]
            self._add(f"MILI {fmt.value}", packed.shape.nbytes(), arrays,
                      lambda a, model=model: model.execute(x_bf16, *a))
        for suffix, tensor_type in GGUF_TYPES.items():
            if not (keep(f"MILI {suffix}") or keep(f"MAX {suffix}")):
                continue
            blocks = gguf_blocks(tensor_type, w, rng)
            if keep(f"MILI {suffix}"):
                layout = tensor_layout([tensor_type], n, k)
                packed = pack_parts([_StoredTensor(tensor_type, blocks, n, k)], layout)
                model = session.load(self._mili_graph(layout, f"{suffix}_{k}_{n}"))
                arrays = [[Buffer.from_numpy(a.copy()).view(dtype) for a, (_, dtype, _) in
                           zip(packed.arrays, layout.arrays(), strict=True)]
                          for _ in range(copies_for(layout.nbytes()))]
                self._add(f"MILI {suffix}", layout.nbytes(), arrays, lambda a, model=model: model.execute(x_bf16, *a))
            if keep(f"MAX {suffix}"):
                model = session.load(self._max_qmatmul_graph(tensor_type, k, n, blocks.shape[1]))
                arrays = [[Buffer.from_numpy(blocks.copy())] for _ in range(copies_for(blocks.nbytes))]
                self._add(f"MAX {suffix}", blocks.nbytes, arrays,
                          lambda a, model=model, xf=Buffer.from_numpy(x): model.execute(xf, *a))
        for dtype in (d for d in (DType.float32, DType.bfloat16) if keep(f"MAX {d.name}")):
            model = session.load(self._max_graph(dtype, k, n))
            nbytes = n * k * dtype.size_in_bytes
            # MAX folds the transpose of an [N, K] float32 weight; bf16 must be stored [K, N] (see qwen3.py)
            host = w if dtype == DType.float32 else np.ascontiguousarray(w.T)
            # a copy each: Buffer.from_numpy shares a float32 array's memory, so copies of `host` itself would
            # all be one buffer, warm in cache
            arrays = [[numpy_to_buffer(host.copy(), dtype)] for _ in range(copies_for(nbytes))]
            self._add(f"MAX {dtype.name}", nbytes, arrays,
                      lambda a, model=model, xb=numpy_to_buffer(x, dtype): model.execute(xb, *a))
        for dtype in (d for d in (torch.float32, torch.bfloat16) if keep(f"torch {str(d).removeprefix('torch.')}")):
            nbytes = n * k * dtype.itemsize
            weights = [torch.from_numpy(w).to(dtype, copy=True) for _ in range(copies_for(nbytes))]
            self._add(f"torch {str(dtype).removeprefix('torch.')}", nbytes, weights,
                      lambda wt, xt=torch.from_numpy(x).to(dtype): _torch_linear(xt, wt))
        if keep("numpy float32"):
            self._add("numpy float32", w.nbytes, [w.copy() for _ in range(copies_for(w.nbytes))], lambda wt: x @ wt.T)

    @staticmethod
    def _mili_graph(layout: PackedShape, name: str):
        k, n = layout.in_features, layout.out_features
        arrays = [TensorType(dtype, shape, CPU_REF) for _, dtype, shape in layout.arrays()]
        return graph(f"mili_linear_{name}", [TensorType(DType.bfloat16, ["m", k], CPU_REF), *arrays],
                     lambda x, *w: packed_linear.linear(x.tensor, [a.tensor for a in w], layout, n))

    @staticmethod
    def _max_qmatmul_graph(tensor_type: GGMLQuantizationType, k: int, n: int, row_bytes: int):
        encoding = QuantizationEncoding(tensor_type.name)
        return graph(f"max_qmatmul_{tensor_type.name}_{k}_{n}",
                     [TensorType(DType.float32, ["m", k], CPU_REF), TensorType(DType.uint8, [n, row_bytes], CPU_REF)],
                     lambda x, w: ops.qmatmul(encoding, None, x.tensor, w.tensor))

    @staticmethod
    def _max_graph(dtype: DType, k: int, n: int):
        shape = [n, k] if dtype == DType.float32 else [k, n]

        def body(x, w):
            weight = ops.transpose(w.tensor, 0, 1) if dtype == DType.float32 else w.tensor
            return ops.matmul(x.tensor, weight)
        return graph(f"max_matmul_{dtype.name}_{k}_{n}", [TensorType(dtype, ["m", k], CPU_REF),
                                                          TensorType(dtype, shape, CPU_REF)], body)

    def _add(self, name: str, nbytes: int, copies: list, run: Callable[[Any], object]) -> None:
        """Registers a contender whose calls run `run` on its weight copies in turn."""
        turns = itertools.cycle(copies)
        self._calls[name] = lambda: run(next(turns))
        self.weight_bytes[name] = nbytes

    def calls(self) -> dict[str, Callable[[], object]]:
        return self._calls


@dataclass(frozen=True)
class Selection:
    """Which cases run: shape names, row counts, and contenders by name prefix (None: all)."""

    shapes: tuple[str, ...]
    rows: tuple[int, ...] = ROWS
    contenders: tuple[str, ...] | None = None

    def keep(self, contender: str) -> bool:
        return self.contenders is None or contender.startswith(self.contenders) or contender == "MILI bf16"


def run(limits: MachineLimits, repeats: int, selection: Selection) -> list[Result]:
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    torch.set_num_threads(limits.cores)
    results: list[Result] = []
    for name, k, n in (s for s in SHAPES if s[0] in selection.shapes):
        for rows in selection.rows:
            if name == "lm_head" and rows == 512:
                continue  # prefill computes logits for the last token of each sequence only
            cold = rows < 512

            def copies_for(nbytes: int) -> int:
                return max(1, -(-COLD_BYTES // nbytes)) if cold else 1
            print(f"{name} K={k} N={n} M={rows}: preparing and compiling...", flush=True)
            contenders = Contenders(session, k, n, rows, copies_for, rng, selection.keep)
            times = time_in_bursts(contenders.calls(), repeats)
            flops = 2 * rows * n * k
            for contender, us in times.items():
                nbytes = contenders.weight_bytes[contender]
                gb_s, gflop_s = nbytes / us / 1e3, flops / us / 1e3
                share = gb_s / limits.read_gb_s if rows == 1 else gflop_s / limits.sgemm_gflop_s
                results.append(Result(name, rows, contender, us, nbytes, gb_s, gflop_s, share))
                print(f"    {contender:15s} {us:10.1f} us  {gb_s:6.1f} GB/s  {gflop_s:7.1f} GFLOP/s  "
                      f"({share:.0%} of the {'read bandwidth' if rows == 1 else 'FMA rate'})", flush=True)
    return results


def print_table(results: list[Result]) -> None:
    print(f"\n{'shape':8s} {'M':>4s} {'contender':15s} {'us':>10s} {'GB/s':>7s} {'GFLOP/s':>8s} {'of limit':>8s} "
          f"{'MILI bf16 speedup':>17s}")
    for r in results:
        mili = next(x for x in results if x.shape == r.shape and x.rows == r.rows and x.contender == "MILI bf16")
        print(f"{r.shape:8s} {r.rows:4d} {r.contender:15s} {r.us:10.1f} {r.gb_s:7.1f} {r.gflop_s:8.1f} "
              f"{r.share_of_limit:8.0%} {r.us / mili.us:16.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="at least this many timed rounds per case")
    parser.add_argument("--quick", action="store_true", help="three shapes only (a smoke run)")
    parser.add_argument("--shapes", help=f"comma-separated shape names (default all: {','.join(s[0] for s in SHAPES)})")
    parser.add_argument("--rows", help="comma-separated row counts M (default 1,16,512)")
    parser.add_argument("--contenders", help="comma-separated contender name prefixes, e.g. MILI,torch "
                                             "(default all; MILI bf16 always runs: the table's speedups are against it)")
    parser.add_argument("--out", default="benchmarks/results/linear.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    names = [s[0] for s in SHAPES]
    shapes = tuple(args.shapes.split(",")) if args.shapes else tuple(names[:2] + names[-1:] if args.quick else names)
    if unknown := set(shapes) - set(names):
        parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {names}")
    try:
        rows = tuple(int(r) for r in args.rows.split(",")) if args.rows else ROWS
    except ValueError:
        parser.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if any(r < 1 for r in rows):
        parser.error("--rows: every row count must be at least 1")
    contenders = tuple(args.contenders.split(",")) if args.contenders else None
    limits = measure()
    results = run(limits, args.repeats, Selection(shapes, rows, contenders))
    after = limits.best_of(measure())
    for r in results:  # shares against the better measurement of each limit
        r.share_of_limit *= (limits.read_gb_s / after.read_gb_s if r.rows == 1
                             else limits.sgemm_gflop_s / after.sgemm_gflop_s)
    limits = after
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": limits.as_dict(), "repeats": args.repeats,
                               "note": "medians of interleaved rounds; share_of_limit: GB/s of read bandwidth "
                                       "for M=1, else GFLOP/s of the float32 FMA rate",
                               "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
