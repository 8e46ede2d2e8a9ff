# Instantiates MILI's CPU paged attention for every head size and block size the graph may ask for, in both run
# dtypes, for `mojo build --target-cpu X --emit asm` checks of the instruction sets this machine lacks
# (tests/kernels/test_cpu_isa.py): its register blocking depends on the SIMD width, so a shape that compiles
# with AVX2's 8 floats can fail with AVX-512's 16. Run natively it also checks each instance on a ragged batch
# (a 5-token chunk over 37 keys, a decode over 70) whose V rows are all ones: every output is then 1 whatever
# the scores, up to rounding.
from max.gpu.host import DeviceContext
from mojo_kernels.attention import BatchShape, paged_attention_cpu
from mojo_kernels.kv_cache import CacheLayout


def worst_error[dtype: DType, head_dim: Int, block_size: Int]() raises -> Float32:
    """Largest |output - 1| over the batch, for V = 1 and arbitrary Q and K."""
    comptime NUM_HEADS = 4
    comptime KV_HEADS = 2
    comptime NUM_BLOCKS = 12
    comptime MAX_BLOCKS = 6
    var ctx = DeviceContext(api="cpu")
    var layout = CacheLayout(NUM_BLOCKS, KV_HEADS, block_size, head_dim, 0)
    var cache = List[Scalar[dtype]](length=2 * NUM_BLOCKS * KV_HEADS * block_size * head_dim, fill=1)
    for block in range(NUM_BLOCKS):  # K varies so that the scores do; V stays 1
        for head in range(KV_HEADS):
            for i in range(layout.block_elems()):
                cache[layout.k_block(block, head) + i] = Scalar[dtype](Float32((i * 7 + block * 3 + head) % 11) / 8)
    var query_start: List[Int32] = [0, 5, 6]
    var context_lens: List[Int32] = [37, 70]
    var block_tables = List[Int32](length=2 * MAX_BLOCKS, fill=0)
    for j in range(MAX_BLOCKS):
        block_tables[j] = Int32(j)
        block_tables[MAX_BLOCKS + j] = Int32(NUM_BLOCKS - 1 - j)
    var tokens = 6
    var q = List[Scalar[dtype]](length=tokens * NUM_HEADS * head_dim, fill=0)
    for i in range(len(q)):
        q[i] = Scalar[dtype](Float32(i % 13) / 4 - 1)
    var out = List[Scalar[dtype]](length=len(q), fill=Scalar[dtype](-1000))  # poisoned
    var batch = BatchShape(2, MAX_BLOCKS, NUM_HEADS, NUM_HEADS // KV_HEADS)
    paged_attention_cpu[dtype, head_dim, block_size](
        out.unsafe_ptr(), q.unsafe_ptr(), cache.unsafe_ptr(), layout, query_start.unsafe_ptr(),
        context_lens.unsafe_ptr(), block_tables.unsafe_ptr(), batch, tokens, ctx)
    var worst: Float32 = 0
    for i in range(len(out)):
        worst = max(worst, abs(Float32(out[i]) - 1))
    return worst


def check[dtype: DType, head_dim: Int, block_size: Int]() raises:
    var error = worst_error[dtype, head_dim, block_size]()
    var bound: Float32 = 1e-5 if dtype == DType.float32 else 1e-2
    if error > bound:
        raise Error(dtype, " head_dim=", head_dim, " block_size=", block_size, ": output off 1 by ", error)


def main() raises:
    comptime for head_dim in [64, 128]:
        comptime for block_size in [16, 32]:
            check[DType.float32, head_dim, block_size]()
            check[DType.bfloat16, head_dim, block_size]()
    print("attention paths agree")
