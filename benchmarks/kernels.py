"""Kernel benchmarks: each MILI op against MAX's own equivalent and numpy, measured side by side.

For every case the graphs are compiled once, then timed in interleaved rounds (the machine is shared and
noisy, so all contenders see the same conditions); we report medians, achieved GB/s (GFLOP/s for
attention), and ratios: other's time / MILI's time (> 1 means MILI is faster). Shapes are Qwen3-0.6B's
(hidden 1024, 16 query / 8 KV heads, head_dim 128, intermediate 3072, KV block 16).

    python -m benchmarks.kernels [--repeats 30] [--quick] [--ops attention] [--dtypes bfloat16] [--out FILE]

Every graph time includes MAX's per-execute overhead (~20-30 us here), the same for both sides.
Attention and the KV store run against MAX's paged-cache ops (`flash_attention_ragged`,
`kv_cache_store_paged_ragged`, set up in benchmarks/max_paged.py) on the same shapes and page tables;
decode attention is also reported as a share of the machine's measured read bandwidth, since it must
stream all of K and V.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import BufferType, DeviceRef, Graph, TensorType, TensorValue, ops
from max.nn.kernels import rope_ragged_with_position_ids

from benchmarks import max_paged
from mili.dtypes import numpy_to_buffer
from mili.kernels import kernel_package
from mili.model import ops as mili_ops
from mili.model.kv_layout import KVCacheShape
from mili.model.rope import rope_table

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 1024, 3072, 16, 8, 128, 16
TOKENS = (1, 16, 512, 2048)
DECODE_CONTEXTS = (512, 4096, 16384)
PREFILL_TOKENS = (512, 2048)
EPS, THETA, MAX_POSITIONS = 1e-6, 1_000_000.0, 40960
CPU_REF = DeviceRef.CPU()
MIN_SECONDS_PER_CASE, MAX_ROUNDS = 1.0, 5000
OPS = ("norms", "swiglu", "rope", "attention")


@dataclass
class Row:
    op: str
    dtype: str
    shape: str
    mili_us: float
    max_us: float | None
    numpy_us: float | None
    mili_gb_s: float
    mili_gflop_s: float | None
    vs_max: float | None  # MAX time / MILI time: > 1 means MILI is faster
    vs_numpy: float | None


def time_once(fn: Callable[[], object], samples: list[float]) -> None:
    start = time.perf_counter()
    fn()
    samples.append(time.perf_counter() - start)


def time_interleaved(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median microseconds of each callable, timed in alternating order after one warm-up call each.

    At least `repeats` rounds, and as many more as fit in MIN_SECONDS_PER_CASE (capped at MAX_ROUNDS):
    a 30 us op needs thousands of rounds before its median stops moving by +-10% on this shared machine.
    Round r runs the contenders in the r-th of all their orders, so each one follows every other one
    equally often: what ran just before matters (numpy's large temporaries, freed just before, slowed
    whichever graph ran next by up to 2x), and a mere rotation of one order keeps who-follows-whom."""
    start = time.perf_counter()
    for fn in contenders.values():
        fn()
    round_seconds = time.perf_counter() - start
    rounds = max(repeats, min(MAX_ROUNDS, int(MIN_SECONDS_PER_CASE / max(round_seconds, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    orders = list(itertools.permutations(contenders))
    for round_index in range(max(rounds, len(orders))):
        for name in orders[round_index % len(orders)]:
            time_once(contenders[name], samples[name])
    return {name: statistics.median(s) * 1e6 for name, s in samples.items()}


def graph(name: str, input_types: Sequence, body: Callable[..., Sequence[TensorValue] | TensorValue | None]) -> Graph:
    with Graph(name, input_types=list(input_types), custom_extensions=[kernel_package()]) as g:
        outputs = body(*g.inputs)
        if outputs is None:
            g.output()
        else:
            g.output(*(outputs if isinstance(outputs, (list, tuple)) else [outputs]))
    return g


def measure_bandwidth_gb_s(repeats: int) -> float:
    """Read bandwidth of this machine: two threads summing halves of a 512 MB array (numpy releases the GIL)."""
    data = np.ones(128 << 20, np.float32)
    halves = np.array_split(data, 2)

    def read_all() -> None:
        threads = [threading.Thread(target=np.sum, args=(h,)) for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    seconds = time_interleaved({"read": read_all}, max(3, repeats // 5))["read"] / 1e6
    return data.nbytes / seconds / 1e9


class Bench:
    def __init__(self, repeats: int, quick: bool) -> None:
        self.session = InferenceSession(devices=[CPU()])
        self.repeats = repeats
        self.quick = quick
        self.rows: list[Row] = []

    def record(self, op: str, dtype: DType, shape: str, times: dict[str, float], nbytes: int,
               flops: float | None = None) -> None:
        mili = times["mili"]
        row = Row(
            op=op, dtype=dtype.name, shape=shape, mili_us=mili,
            max_us=times.get("max"), numpy_us=times.get("numpy"), mili_gb_s=nbytes / (mili * 1e-6) / 1e9,
            mili_gflop_s=None if flops is None else flops / (mili * 1e-6) / 1e9,
            vs_max=times["max"] / mili if "max" in times else None,
            vs_numpy=times["numpy"] / mili if "numpy" in times else None,
        )
        self.rows.append(row)
        extra = f"  vs MAX x{row.vs_max:.2f}" if row.vs_max else ""
        print(f"    {op:14s} {row.dtype:9s} {shape:>16s}  MILI {mili:9.1f} us  {row.mili_gb_s:6.1f} GB/s{extra}",
              flush=True)

    def tokens(self) -> Sequence[int]:
        return TOKENS[:2] if self.quick else TOKENS

    # ------------------------------------------------------------------ elementwise ops

    def norms(self, dtype: DType) -> None:
        x_t, w_t = TensorType(dtype, ["t", HIDDEN], CPU_REF), TensorType(dtype, [HIDDEN], CPU_REF)
        ours = self.session.load(graph("mili_norm", [x_t, w_t], lambda x, w: mili_ops.rms_norm(x.tensor, w.tensor, EPS)))
        theirs = self.session.load(graph("max_norm", [x_t, w_t], lambda x, w: ops.rms_norm(x.tensor, w.tensor, EPS)))
        ours_add = self.session.load(graph("mili_add_norm", [x_t, x_t, w_t], lambda x, r, w: list(
            mili_ops.add_rms_norm(x.tensor, r.tensor, w.tensor, EPS))))

        def max_add_norm(x, r, w):
            summed = x.tensor + r.tensor
            return [ops.rms_norm(summed, w.tensor, EPS), summed]

        theirs_add = self.session.load(graph("max_add_norm", [x_t, x_t, w_t], max_add_norm))
        rng = np.random.default_rng()
        for tokens in self.tokens():
            x, r = rng.standard_normal((2, tokens, HIDDEN)).astype(np.float32)
            w = rng.standard_normal(HIDDEN).astype(np.float32)
            xb, rb, wb = (numpy_to_buffer(a, dtype) for a in (x, r, w))
            size = dtype.size_in_bytes
            times = time_interleaved({
                "mili": lambda: ours.execute(xb, wb), "max": lambda: theirs.execute(xb, wb),
                "numpy": lambda: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w,
            }, self.repeats)
            self.record("rms_norm", dtype, f"{tokens}x{HIDDEN}", times, (2 * tokens + 1) * HIDDEN * size)
            times = time_interleaved({
                "mili": lambda: ours_add.execute(xb, rb, wb), "max": lambda: theirs_add.execute(xb, rb, wb),
            }, self.repeats)
            self.record("add_rms_norm", dtype, f"{tokens}x{HIDDEN}", times, (4 * tokens + 1) * HIDDEN * size)

    def swiglu(self, dtype: DType) -> None:
        gu_t = TensorType(dtype, ["t", 2 * INTER], CPU_REF)
        ours = self.session.load(graph("mili_swiglu", [gu_t], lambda gu: mili_ops.swiglu(gu.tensor)))

        def max_swiglu(gu):
            gate, up = ops.split(gu.tensor, [INTER, INTER], axis=1)
            return ops.silu(gate) * up

        theirs = self.session.load(graph("max_swiglu", [gu_t], max_swiglu))
        rng = np.random.default_rng()
        for tokens in self.tokens():
            gu = rng.standard_normal((tokens, 2 * INTER)).astype(np.float32)
            gub = numpy_to_buffer(gu, dtype)
            g, u = gu[:, :INTER], gu[:, INTER:]
            times = time_interleaved({
                "mili": lambda: ours.execute(gub), "max": lambda: theirs.execute(gub),
                "numpy": lambda: g / (1 + np.exp(-g)) * u,
            }, self.repeats)
            self.record("swiglu", dtype, f"{tokens}x{2 * INTER}", times, 3 * tokens * INTER * dtype.size_in_bytes)

    def rope(self, dtype: DType) -> None:
        x_t = TensorType(dtype, ["t", HEADS, HEAD_DIM], CPU_REF)
        ours = self.session.load(graph(
            "mili_rope", [x_t, TensorType(DType.int32, ["t"], CPU_REF),
                          TensorType(DType.float32, [MAX_POSITIONS, HEAD_DIM], CPU_REF)],
            lambda x, p, tab: mili_ops.rope(x.tensor, p.tensor, tab.tensor)))
        theirs = self.session.load(graph(
            "max_rope", [x_t, TensorType(DType.uint32, ["t"], CPU_REF),
                         TensorType(dtype, [MAX_POSITIONS, HEAD_DIM], CPU_REF)],
            lambda x, p, tab: rope_ragged_with_position_ids(x.tensor, tab.tensor, p.tensor, interleaved=False)))
        table = rope_table(HEAD_DIM, THETA, MAX_POSITIONS)
        table_b, table_max = Buffer.from_numpy(table), numpy_to_buffer(table, dtype)
        rng = np.random.default_rng()
        for tokens in self.tokens():
            x = rng.standard_normal((tokens, HEADS, HEAD_DIM)).astype(np.float32)
            pos = rng.integers(0, 4096, tokens)
            xb = numpy_to_buffer(x, dtype)
            pos32, posu = Buffer.from_numpy(pos.astype(np.int32)), Buffer.from_numpy(pos.astype(np.uint32))
            times = time_interleaved({
                "mili": lambda: ours.execute(xb, pos32, table_b), "max": lambda: theirs.execute(xb, posu, table_max),
            }, self.repeats)
            self.record("rope", dtype, f"{tokens}x{HEADS}x{HEAD_DIM}", times,
                        2 * tokens * HEADS * HEAD_DIM * dtype.size_in_bytes)

    # ------------------------------------------------------------------ cache ops

    def cache_graphs(self, dtype: DType, num_blocks: int):
        cache_t = BufferType(dtype, [1, 2, num_blocks, KV_HEADS, BLOCK * HEAD_DIM], CPU_REF)
        i32 = DType.int32
        store = self.session.load(graph(
            "mili_kv_store", [cache_t, TensorType(dtype, ["t", KV_HEADS, HEAD_DIM], CPU_REF),
                              TensorType(dtype, ["t", KV_HEADS, HEAD_DIM], CPU_REF), TensorType(i32, ["t"], CPU_REF),
                              TensorType(i32, [1], CPU_REF)],
            lambda c, k, v, s, layer: mili_ops.kv_store(c.buffer, k.tensor, v.tensor, s.tensor, layer.tensor, BLOCK)))
        attend = self.session.load(graph(
            "mili_attention", [cache_t, TensorType(dtype, ["t", HEADS, HEAD_DIM], CPU_REF), TensorType(i32, [1], CPU_REF),
                               TensorType(i32, ["b1"], CPU_REF), TensorType(i32, ["b"], CPU_REF),
                               TensorType(i32, ["b", "mb"], CPU_REF)],
            lambda c, q, layer, qs, cl, bt: mili_ops.paged_attention(c.buffer, q.tensor, layer.tensor, qs.tensor,
                                                                     cl.tensor, bt.tensor, BLOCK)))
        return store, attend

    def attention(self, dtype: DType, bandwidth: float) -> None:
        """KV store, decode and prefill attention, each against MAX's paged-cache op on the same shapes.
        Both caches hold the same random values; each sequence's pages are a random permutation."""
        contexts = DECODE_CONTEXTS[:2] if self.quick else DECODE_CONTEXTS
        prefills = PREFILL_TOKENS[:1] if self.quick else PREFILL_TOKENS
        num_blocks = max(max(contexts), max(prefills)) // BLOCK + 1
        store, attend = self.cache_graphs(dtype, num_blocks)
        theirs = max_paged.build_models(self.session, dtype, HEADS, KV_HEADS, HEAD_DIM, BLOCK)
        shape = KVCacheShape(1, num_blocks, KV_HEADS, BLOCK, HEAD_DIM)
        rng = np.random.default_rng()
        cache = numpy_to_buffer(rng.standard_normal(shape.shape).astype(np.float32), dtype)
        their_blocks = max_paged.random_blocks(rng, num_blocks, theirs, dtype)
        layer = Buffer.from_numpy(np.zeros(1, np.int32))
        size = dtype.size_in_bytes
        pages = rng.permutation(num_blocks)
        table = Buffer.from_numpy(pages.astype(np.int32)[None, :])
        for tokens in self.tokens():  # a prefill's K/V: positions 0..tokens-1 through the page table
            k = numpy_to_buffer(rng.standard_normal((tokens, KV_HEADS, HEAD_DIM)).astype(np.float32), dtype)
            positions = np.arange(tokens)
            slots = Buffer.from_numpy((pages[positions // BLOCK] * BLOCK + positions % BLOCK).astype(np.int32))
            their_args = [k, k, max_paged.row_offsets(tokens), *max_paged.cache_inputs(their_blocks, pages, 0, tokens)]
            times = time_interleaved({"mili": lambda: store.execute(cache, k, k, slots, layer),
                                      "max": lambda: theirs.store.execute(*their_args)}, self.repeats)
            self.record("kv_store", dtype, f"{tokens}x{KV_HEADS}x{HEAD_DIM}", times, 4 * tokens * KV_HEADS * HEAD_DIM * size)
        for context in contexts:
            q = rng.standard_normal((1, HEADS, HEAD_DIM)).astype(np.float32)
            qb = numpy_to_buffer(q, dtype)
            args = [cache, qb, layer, Buffer.from_numpy(np.array([0, 1], np.int32)),
                    Buffer.from_numpy(np.array([context], np.int32)), table]
            their_args = [qb, max_paged.row_offsets(1), *max_paged.cache_inputs(their_blocks, pages, context - 1, 1)]
            k_np = rng.standard_normal((context, KV_HEADS, HEAD_DIM)).astype(np.float32)
            q_np = q[0].reshape(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)

            def numpy_decode() -> np.ndarray:  # contiguous K/V: numpy's best case
                scores = np.einsum("hgd,thd->hgt", q_np, k_np)
                p = np.exp(scores - scores.max(-1, keepdims=True))
                return np.einsum("hgt,thd->hgd", p / p.sum(-1, keepdims=True), k_np)

            times = time_interleaved({"mili": lambda: attend.execute(*args),
                                      "max": lambda: theirs.attention.execute(*their_args),
                                      "numpy": numpy_decode}, self.repeats)
            nbytes = 2 * context * KV_HEADS * HEAD_DIM * size
            self.record("attn_decode", dtype, f"ctx {context}", times, nbytes, 4 * context * HEADS * HEAD_DIM)
            print(f"      decode at ctx {context}: {self.rows[-1].mili_gb_s / bandwidth:.0%} of measured bandwidth "
                  f"({bandwidth:.1f} GB/s)", flush=True)
        for tokens in prefills:
            q = numpy_to_buffer(rng.standard_normal((tokens, HEADS, HEAD_DIM)).astype(np.float32), dtype)
            args = [cache, q, layer, Buffer.from_numpy(np.array([0, tokens], np.int32)),
                    Buffer.from_numpy(np.array([tokens], np.int32)), table]
            their_args = [q, max_paged.row_offsets(tokens), *max_paged.cache_inputs(their_blocks, pages, 0, tokens)]
            times = time_interleaved({"mili": lambda: attend.execute(*args),
                                      "max": lambda: theirs.attention.execute(*their_args)}, max(3, self.repeats // 5))
            flops = 2 * 2 * HEADS * HEAD_DIM * tokens * (tokens + 1) / 2
            self.record("attn_prefill", dtype, f"{tokens} tokens", times, 2 * tokens * KV_HEADS * HEAD_DIM * size, flops)


def print_table(rows: list[Row]) -> None:
    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    header = (f"{'op':14s} {'dtype':9s} {'shape':>16s} {'MILI us':>10s} {'MAX us':>10s} {'numpy us':>10s} "
              f"{'GB/s':>7s} {'GFLOP/s':>8s} {'vs MAX':>7s} {'vs numpy':>8s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.op:14s} {r.dtype:9s} {r.shape:>16s} {r.mili_us:10.1f} {fmt(r.max_us, '10.1f'):>10s} "
              f"{fmt(r.numpy_us, '10.1f'):>10s} {r.mili_gb_s:7.1f} {fmt(r.mili_gflop_s, '8.1f'):>8s} "
              f"{fmt(r.vs_max, '6.2f'):>6s}x {fmt(r.vs_numpy, '7.2f'):>7s}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="at least this many timed rounds per case (default 30); fast cases run more, filling 1 s each")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--out", default="results/kernels.json", help="where to write the JSON results")
    parser.add_argument("--ops", default=",".join(OPS),
                        help=f"comma-separated ops to time (default all: {','.join(OPS)})")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated dtypes (default float32,bfloat16)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    ops_wanted = [op for op in args.ops.split(",") if op]
    if not ops_wanted or any(op not in OPS for op in ops_wanted):
        parser.error(f"--ops takes a comma-separated list of {', '.join(OPS)}; got {args.ops!r}")
    known_dtypes = {"float32": DType.float32, "bfloat16": DType.bfloat16}
    dtype_names = args.dtypes.split(",")
    if any(name not in known_dtypes for name in dtype_names):
        parser.error(f"--dtypes takes a comma-separated list of float32, bfloat16; got {args.dtypes!r}")

    bench = Bench(args.repeats, args.quick)
    print("measuring memory bandwidth...", flush=True)
    bandwidth = measure_bandwidth_gb_s(args.repeats)
    print(f"  {bandwidth:.1f} GB/s read (2 threads)", flush=True)
    for dtype in (known_dtypes[name] for name in dtype_names):
        print(f"{dtype.name}: compiling and timing (graph compiles take tens of seconds the first time)", flush=True)
        for op in ops_wanted:
            if op == "attention":
                bench.attention(dtype, bandwidth)
            else:
                getattr(bench, op)(dtype)
    print()
    print_table(bench.rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "read_bandwidth_gb_s": bandwidth},
        "repeats": args.repeats,
        "note": "medians of interleaved rounds; vs_* = other time / MILI time (> 1: MILI faster)",
        "rows": [asdict(r) for r in bench.rows],
    }, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
