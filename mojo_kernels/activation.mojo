# SwiGLU, as Qwen3's MLP computes it between the fused gate/up projection and down_proj:
#
#   gate_up: [tokens, 2 * inter]   gate = gate_up[:, :inter], up = gate_up[:, inter:]
#   out:     [tokens, inter]       out = dtype(silu(gate)) * up,  silu(g) = g / (1 + exp(-g))
#
# silu is evaluated in float32 and rounded to the input dtype before the multiply, like
# transformers' act_fn(gate_proj(x)) * up_proj(x) in bfloat16.
#
# CPU: tokens x column chunks split across cores, SIMD over columns. GPU: one thread per output element.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, block_dim, grid_dim
from std.algorithm import vectorize
from std.sys import simd_width_of
from std.math import exp, ceildiv
from .cpu_parallel import parallel_ranges, tasks_for
from .convert import narrow, widen, round_to

comptime GPU_THREADS = 256


@always_inline
def silu_times_up[dtype: DType, w: Int](gate: SIMD[dtype, w], up: SIMD[dtype, w]) -> SIMD[dtype, w]:
    var g = widen(gate)
    var silu = round_to[dtype](g / (1 + exp(-g)))
    return narrow[dtype](silu * widen(up))


def swiglu_cpu[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    gate_up_ptr: Pointer[Scalar[dtype], ...],
    tokens: Int,
    inter: Int,
    ctx: DeviceContext,
) raises:
    """One task per token range, with few enough tasks that each has real work."""
    comptime width = simd_width_of[dtype]()
    var total = tokens * inter
    if total == 0:
        return

    def do_tokens(start: Int, end: Int) raises {imm out_ptr, imm gate_up_ptr, imm inter}:
        for t in range(start, end):
            var in_row = t * 2 * inter
            var out_row = t * inter

            def columns[w: Int](c: Int) {imm out_ptr, imm gate_up_ptr, imm in_row, imm out_row, imm inter}:
                var gate = gate_up_ptr.unsafe_load[width=w](in_row + c)
                var up = gate_up_ptr.unsafe_load[width=w](in_row + inter + c)
                out_ptr.unsafe_store(out_row + c, silu_times_up[dtype, w](gate, up))

            vectorize[width, unroll_factor=4](inter, columns)

    parallel_ranges(tokens, tasks_for(total), do_tokens, ctx)


def swiglu_gpu_kernel[dtype: DType](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    gate_up_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    tokens: Int32,
    inter: Int32,
):
    var n = Int(tokens) * Int(inter)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < n:
        var t = i // Int(inter)
        var c = i - t * Int(inter)
        var gate = gate_up_ptr.unsafe_load(t * 2 * Int(inter) + c)
        var up = gate_up_ptr.unsafe_load(t * 2 * Int(inter) + Int(inter) + c)
        out_ptr.unsafe_store(i, silu_times_up[dtype, 1](gate, up))
        i += stride


@extensibility.register("mili_swiglu")
struct SwiGLU:
    """Computes silu(gate) * up from the fused [tokens, 2 * inter] gate/up projection."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        gate_up: InputTensor[dtype=output.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = gate_up.dim_size(0)
        var inter = output.dim_size(1)
        if gate_up.dim_size(1) != 2 * inter:
            raise Error("mili_swiglu: gate_up has ", gate_up.dim_size(1), " columns, expected 2 * ", inter)
        comptime if target == "cpu":
            swiglu_cpu[output.dtype](output.unsafe_ptr(), gate_up.unsafe_ptr(), tokens, inter, ctx)
        elif target == "gpu":
            var n = tokens * inter
            if n == 0:
                return
            ctx.enqueue_function[swiglu_gpu_kernel[output.dtype]](
                output.unsafe_ptr(), gate_up.unsafe_ptr(), Int32(tokens), Int32(inter),
                grid_dim=min(ceildiv(n, GPU_THREADS), 65535), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_swiglu: unsupported target ", target)
