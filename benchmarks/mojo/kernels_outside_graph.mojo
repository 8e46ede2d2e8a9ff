# MILI's two prefill-heavy CPU kernels called as plain functions, outside any MAX graph: the bf16 linear op at
# Qwen3-0.6B's gate/up shape (M 512, K 1,024, N 6,144) and bf16 paged attention over a 2,048-token prefill
# (16 query / 8 KV heads, head_dim 128, blocks of 16). Prints the median time and GFLOP/s of 9 runs after 2
# warm-ups, to compare with the same kernels inside a graph (`python -m benchmarks.linear --rows 512 --shapes
# gate_up`, `python -m benchmarks.kernels --ops attention --dtypes bfloat16`): on a Zen 5 they ran ~25% faster
# here (benchmarks/NOTES.md, 2026-11-24). Inputs are fixed patterns; speed does not depend on the values.
# Run: mojo run -I . benchmarks/mojo/kernels_outside_graph.mojo
from max.gpu.host import DeviceContext
from mojo_kernels.attention import BatchShape, paged_attention_cpu
from mojo_kernels.kv_cache import CacheLayout
from mojo_kernels.linear_cpu import linear_bf16_cpu
from mojo_kernels.linear_layout import LinearShape, bf16_panel_stride
from std.time import perf_counter_ns

comptime WARM_UPS = 2
comptime RUNS = 9


def median_ms(mut samples: List[Float64]) -> Float64:
    sort(samples)
    return samples[len(samples) // 2]


def pattern(i: Int, period: Int, scale: Float32) -> BFloat16:
    return BFloat16(Float32(i % period) * scale - 0.5)


def time_linear(ctx: DeviceContext) raises:
    comptime M = 512
    comptime K = 1024
    comptime N = 6144
    var x = List[BFloat16](length=M * K, fill=0)
    for i in range(len(x)):
        x[i] = pattern(i * 7, 11, 0.125)
    var w = List[BFloat16](length=(N // 16) * bf16_panel_stride(K), fill=0)
    for i in range(len(w)):
        w[i] = pattern(i * 5, 13, 0.0625)
    var out = List[BFloat16](length=M * N, fill=0)
    var samples = List[Float64]()
    for run in range(WARM_UPS + RUNS):
        var start = perf_counter_ns()
        linear_bf16_cpu[DType.bfloat16, DType.bfloat16](out.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(),
                                                        LinearShape(M, K, N), ctx)
        if run >= WARM_UPS:
            samples.append(Float64(perf_counter_ns() - start) / 1e6)
    var ms = median_ms(samples)
    print("linear bf16 M=512 K=1024 N=6144:", ms, "ms,", 2.0 * Float64(M * K * N) / ms / 1e6, "GFLOP/s")


def time_attention(ctx: DeviceContext) raises:
    comptime D = 128
    comptime BS = 16
    comptime HEADS = 16
    comptime KV_HEADS = 8
    comptime TOKENS = 2048
    var num_blocks = TOKENS // BS
    var layout = CacheLayout(num_blocks, KV_HEADS, BS, D, 0)
    var cache = List[BFloat16](length=2 * num_blocks * KV_HEADS * BS * D, fill=0)
    for i in range(len(cache)):
        cache[i] = pattern(i * 7, 11, 0.125)
    var query_start: List[Int32] = [0, Int32(TOKENS)]
    var context_lens: List[Int32] = [Int32(TOKENS)]
    var block_tables = List[Int32](length=num_blocks, fill=0)
    for j in range(num_blocks):
        block_tables[j] = Int32(j)
    var q = List[BFloat16](length=TOKENS * HEADS * D, fill=0)
    for i in range(len(q)):
        q[i] = pattern(i, 13, 0.25)
    var out = List[BFloat16](length=len(q), fill=0)
    var batch = BatchShape(1, num_blocks, HEADS, HEADS // KV_HEADS)
    var samples = List[Float64]()
    for run in range(WARM_UPS + RUNS):
        var start = perf_counter_ns()
        paged_attention_cpu[DType.bfloat16, D, BS](
            out.unsafe_ptr(), q.unsafe_ptr(), cache.unsafe_ptr(), layout, query_start.unsafe_ptr(),
            context_lens.unsafe_ptr(), block_tables.unsafe_ptr(), batch, TOKENS, ctx)
        if run >= WARM_UPS:
            samples.append(Float64(perf_counter_ns() - start) / 1e6)
    var ms = median_ms(samples)
    var flops = 2.0 * 2 * HEADS * D * Float64(TOKENS) * Float64(TOKENS + 1) / 2
    print("attention bf16 prefill of 2048 tokens:", ms, "ms,", flops / ms / 1e6, "GFLOP/s")


def main() raises:
    var ctx = DeviceContext(api="cpu")
    time_linear(ctx)
    time_attention(ctx)
