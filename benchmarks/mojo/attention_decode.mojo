# MILI's CPU paged attention at batch-1 decode, called as a plain function outside any MAX graph: one new token of
# Qwen3-0.6B's shape (16 query / 8 KV heads, head_dim 128, blocks of 16, bfloat16 cache) against a context of
# CONTEXT tokens, layer after layer over 28 layers' caches (2.4 MB a layer at 576 tokens, 66 MB in all against a
# 32 MB L3), as a decode step reads them; then one layer repeated (its K/V warm in L2/L3). Prints the median
# microseconds a layer and the GB/s of the K/V bytes it reads. Inputs are fixed patterns.
# Run: mojo run -I . benchmarks/mojo/attention_decode.mojo [context] [passes] [layers]
from max.gpu.host import DeviceContext
from mojo_kernels.attention import BatchShape, paged_attention_cpu
from mojo_kernels.kv_cache import CacheLayout
from std.sys import argv
from std.time import perf_counter_ns

comptime D = 128
comptime BS = 16
comptime HEADS = 16
comptime KV_HEADS = 8


def median(mut samples: List[Float64]) -> Float64:
    sort(samples)
    return samples[len(samples) // 2]


def main() raises:
    var args = argv()
    var context = Int(args[1]) if len(args) > 1 else 576
    var passes = Int(args[2]) if len(args) > 2 else 15
    var layers = Int(args[3]) if len(args) > 3 else 28
    var ctx = DeviceContext(api="cpu")
    var num_blocks = (context + BS - 1) // BS
    var cache = List[BFloat16](length=layers * 2 * num_blocks * KV_HEADS * BS * D, fill=0)
    for i in range(len(cache)):
        cache[i] = BFloat16(Float32((i * 7) % 11) * 0.125 - 0.5)
    var query_start: List[Int32] = [0, 1]
    var context_lens: List[Int32] = [Int32(context)]
    var block_tables = List[Int32](length=num_blocks, fill=0)
    for j in range(num_blocks):
        block_tables[j] = Int32(j)
    var q = List[BFloat16](length=HEADS * D, fill=0)
    for i in range(len(q)):
        q[i] = BFloat16(Float32(i % 13) * 0.02 - 0.1)
    var out = List[BFloat16](length=len(q), fill=0)
    var batch = BatchShape(1, num_blocks, HEADS, HEADS // KV_HEADS)
    var kv_bytes = Float64(2 * context * KV_HEADS * D * 2)

    var chain = List[Float64]()
    for _ in range(passes):
        var start = perf_counter_ns()
        for layer in range(layers):
            paged_attention_cpu[DType.bfloat16, D, BS](
                out.unsafe_ptr(), q.unsafe_ptr(), cache.unsafe_ptr(), CacheLayout(num_blocks, KV_HEADS, BS, D, layer),
                query_start.unsafe_ptr(), context_lens.unsafe_ptr(), block_tables.unsafe_ptr(), batch, 1, ctx)
        chain.append(Float64(perf_counter_ns() - start) / 1e3 / Float64(layers))
    var cold = median(chain)
    print("decode attention, context", context, ": layer after layer", cold, "us a layer,", kv_bytes / cold / 1e3,
          "GB/s")
    var warm = List[Float64]()
    for _ in range(passes * 10):
        var start = perf_counter_ns()
        paged_attention_cpu[DType.bfloat16, D, BS](
            out.unsafe_ptr(), q.unsafe_ptr(), cache.unsafe_ptr(), CacheLayout(num_blocks, KV_HEADS, BS, D, 0),
            query_start.unsafe_ptr(), context_lens.unsafe_ptr(), block_tables.unsafe_ptr(), batch, 1, ctx)
        warm.append(Float64(perf_counter_ns() - start) / 1e3)
    var hot = median(warm)
    print("decode attention, context", context, ": one layer repeated", hot, "us,", kv_bytes / hot / 1e3, "GB/s")
