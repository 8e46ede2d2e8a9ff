# Rotary position embedding, Qwen3 style (rotate-half / NeoX layout), at each token's own position.
#
#   x:         [tokens, heads, head_dim]    q or k, float32 or bfloat16
#   positions: [tokens] int32               ragged batch: any position per token
#   table:     [max_positions, head_dim]    float32, cos(pos * inv_freq) in [:, :half], sin in [:, half:]
#              (built once on the host, see mili/model/rope.py)
#   out[t, h, i]        = x1 * cos - x2 * sin      with x1 = x[t, h, i], x2 = x[t, h, i + half]
#   out[t, h, i + half] = x2 * cos + x1 * sin      for i < half = head_dim / 2
#
# cos and sin are rounded to the input dtype first, as transformers does (`cos.to(x.dtype)`).
# CPU: token ranges across cores, SIMD over i. GPU: one thread per (token, head, i) pair.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, block_dim, grid_dim
from std.algorithm import vectorize
from std.sys import simd_width_of
from std.math import ceildiv
from .cpu_parallel import parallel_ranges, tasks_for
from .convert import narrow, widen, round_to

comptime GPU_THREADS = 256


@always_inline
def rotate_head[dtype: DType, head_dim: Int](
    out_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    base: Int,
    table_ptr: Pointer[Float32, ...],
    table_row: Int,
):
    """Rotates one head vector x[base : base + head_dim] into out at the same offset."""
    comptime half = head_dim // 2
    comptime width = min(simd_width_of[DType.float32](), half)

    def pairs[w: Int](i: Int) {imm out_ptr, imm x_ptr, imm base, imm table_ptr, imm table_row}:
        var cos = round_to[dtype](table_ptr.unsafe_load[width=w](table_row + i))
        var sin = round_to[dtype](table_ptr.unsafe_load[width=w](table_row + half + i))
        var x1 = widen(x_ptr.unsafe_load[width=w](base + i))
        var x2 = widen(x_ptr.unsafe_load[width=w](base + half + i))
        out_ptr.unsafe_store(base + i, narrow[dtype](x1 * cos - x2 * sin))
        out_ptr.unsafe_store(base + half + i, narrow[dtype](x2 * cos + x1 * sin))

    vectorize[width](half, pairs)


def check_positions(positions_ptr: Pointer[Int32, ...], tokens: Int, max_positions: Int) raises:
    for t in range(tokens):
        var pos = Int(positions_ptr.unsafe_load(t))
        if pos < 0 or pos >= max_positions:
            raise Error("position ", pos, " of token ", t, " is outside the RoPE table (", max_positions,
                        " positions)")


def rope_cpu[dtype: DType, head_dim: Int](
    out_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    positions_ptr: Pointer[Int32, ...],
    table_ptr: Pointer[Float32, ...],
    tokens: Int,
    heads: Int,
    max_positions: Int,
    ctx: DeviceContext,
) raises:
    check_positions(positions_ptr, tokens, max_positions)

    def do_tokens(start: Int, end: Int) raises {imm out_ptr, imm x_ptr, imm positions_ptr, imm table_ptr, imm heads}:
        for t in range(start, end):
            var table_row = Int(positions_ptr.unsafe_load(t)) * head_dim
            for h in range(heads):
                rotate_head[dtype, head_dim](out_ptr, x_ptr, (t * heads + h) * head_dim, table_ptr, table_row)

    parallel_ranges(tokens, tasks_for(tokens * heads * head_dim), do_tokens, ctx)


def rope_gpu_kernel[dtype: DType, head_dim: Int](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    x_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    positions_ptr: Pointer[Int32, ImmutAnyOrigin],
    table_ptr: Pointer[Float32, ImmutAnyOrigin],
    tokens: Int32,
    heads: Int32,
):
    comptime half = head_dim // 2
    var n = Int(tokens) * Int(heads) * half
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < n:
        var head_index = i // half  # token * heads + head
        var j = i - head_index * half
        var t = head_index // Int(heads)
        var table_row = Int(positions_ptr.unsafe_load(t)) * head_dim
        var cos = table_ptr.unsafe_load(table_row + j).cast[dtype]().cast[DType.float32]()
        var sin = table_ptr.unsafe_load(table_row + half + j).cast[dtype]().cast[DType.float32]()
        var base = head_index * head_dim
        var x1 = x_ptr.unsafe_load(base + j).cast[DType.float32]()
        var x2 = x_ptr.unsafe_load(base + half + j).cast[DType.float32]()
        out_ptr.unsafe_store(base + j, (x1 * cos - x2 * sin).cast[dtype]())
        out_ptr.unsafe_store(base + half + j, (x2 * cos + x1 * sin).cast[dtype]())
        i += stride


@extensibility.register("mili_rope")
struct RoPE[head_dim: Int]:
    """Rotates every head of x by its token's position (rotate-half layout)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=3, ...],
        x: InputTensor[dtype=output.dtype, rank=3, ...],
        positions: InputTensor[dtype=DType.int32, rank=1, ...],
        table: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime assert Self.head_dim % 2 == 0, "head_dim must be even"
        var tokens = x.dim_size(0)
        var heads = x.dim_size(1)
        if x.dim_size(2) != Self.head_dim or table.dim_size(1) != Self.head_dim:
            raise Error("mili_rope: x and table must have head_dim = ", Self.head_dim, " columns")
        if positions.dim_size(0) != tokens:
            raise Error("mili_rope: ", positions.dim_size(0), " positions for ", tokens, " tokens")
        comptime if target == "cpu":
            rope_cpu[output.dtype, Self.head_dim](output.unsafe_ptr(), x.unsafe_ptr(), positions.unsafe_ptr(),
                                                  table.unsafe_ptr(), tokens, heads, table.dim_size(0), ctx)
        elif target == "gpu":
            var n = tokens * heads * (Self.head_dim // 2)
            if n == 0:
                return
            ctx.enqueue_function[rope_gpu_kernel[output.dtype, Self.head_dim]](
                output.unsafe_ptr(), x.unsafe_ptr(), positions.unsafe_ptr(), table.unsafe_ptr(),
                Int32(tokens), Int32(heads),
                grid_dim=min(ceildiv(n, GPU_THREADS), 65535), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_rope: unsupported target ", target)
