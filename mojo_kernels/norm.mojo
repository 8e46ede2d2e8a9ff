# RMSNorm, as Qwen3 computes it (transformers' Qwen3RMSNorm), plain and fused with the residual add.
#
# mili_rms_norm:      x [rows, hidden], weight [hidden] -> out [rows, hidden]
#     out[r, j] = dtype(x[r, j] * inv_rms[r]) * weight[j],  inv_rms[r] = 1 / sqrt(mean_j x[r, j]^2 + eps)
#     Per-head q/k norm is this op over q viewed as [tokens * heads, head_dim] (mili/model/ops.py).
# mili_add_rms_norm:  x, residual [rows, hidden], weight [hidden] -> (out, residual_out) [rows, hidden]
#     residual_out = dtype(x + residual);  out = rmsnorm(residual_out) * weight
#     (the "hidden_states = residual + hidden_states" then post-attention norm of a decoder layer)
#
# Sums of squares accumulate in float32; the normalised value is rounded to the input dtype before
# the weight multiply, exactly like the reference, so bfloat16 runs round the way transformers does.
# CPU: rows split into one contiguous range per core (one core for small inputs); each row is two SIMD passes.
# GPU: one thread block per row; a shared-memory tree reduction gives the sum of squares.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx
from std.algorithm import vectorize
from std.memory import stack_allocation, AddressSpace
from std.sys import simd_width_of
from std.math import sqrt
from .cpu_parallel import parallel_ranges, tasks_for
from .convert import narrow, widen, round_to
from .gpu_reduce import block_sum

comptime GPU_THREADS_PER_ROW = 256
comptime F32_WIDTH = simd_width_of[DType.float32]()


@always_inline
def inv_rms(sum_sq: Float32, hidden: Int, eps: Float32) -> Float32:
    return 1.0 / sqrt(sum_sq / Float32(hidden) + eps)


def sum_of_squares[dtype: DType](src: Pointer[Scalar[dtype], ...], base: Int, hidden: Int) -> Float32:
    # Four independent lane-wise accumulators hide the FMA latency; one horizontal add per row.
    comptime block = 4 * F32_WIDTH
    var a0 = SIMD[DType.float32, F32_WIDTH](0)
    var a1 = SIMD[DType.float32, F32_WIDTH](0)
    var a2 = SIMD[DType.float32, F32_WIDTH](0)
    var a3 = SIMD[DType.float32, F32_WIDTH](0)
    var j = 0
    while j + block <= hidden:
        var v0 = widen(src.unsafe_load[width=F32_WIDTH](base + j))
        var v1 = widen(src.unsafe_load[width=F32_WIDTH](base + j + F32_WIDTH))
        var v2 = widen(src.unsafe_load[width=F32_WIDTH](base + j + 2 * F32_WIDTH))
        var v3 = widen(src.unsafe_load[width=F32_WIDTH](base + j + 3 * F32_WIDTH))
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        j += block
    var tail: Float32 = 0
    while j < hidden:
        var v = widen(src.unsafe_load(base + j))
        tail += v * v
        j += 1
    return ((a0 + a1) + (a2 + a3)).reduce_add() + tail


def add_and_sum_of_squares[dtype: DType](
    sum_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    residual_ptr: Pointer[Scalar[dtype], ...],
    base: Int,
    hidden: Int,
) -> Float32:
    """Stores dtype(x + residual) and returns the float32 sum of squares of what it stored."""
    var lanes = SIMD[DType.float32, F32_WIDTH](0)
    var tail: Float32 = 0

    def accumulate[w: Int](j: Int) {mut lanes, mut tail, imm sum_ptr, imm x_ptr, imm residual_ptr, imm base}:
        var s = narrow[dtype](widen(x_ptr.unsafe_load[width=w](base + j))
                              + widen(residual_ptr.unsafe_load[width=w](base + j)))
        sum_ptr.unsafe_store(base + j, s)
        var v = widen(s)
        comptime if w == F32_WIDTH:
            lanes += rebind[SIMD[DType.float32, F32_WIDTH]](v * v)
        else:
            tail += (v * v).reduce_add()

    vectorize[F32_WIDTH](hidden, accumulate)
    return lanes.reduce_add() + tail


def scale_row[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    src: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    base: Int,
    hidden: Int,
    inv: Float32,
):
    def scale[w: Int](j: Int) {imm out_ptr, imm src, imm weight_ptr, imm base, imm inv}:
        var normed = round_to[dtype](widen(src.unsafe_load[width=w](base + j)) * inv)
        out_ptr.unsafe_store(base + j, narrow[dtype](normed * widen(weight_ptr.unsafe_load[width=w](j))))

    vectorize[F32_WIDTH, unroll_factor=4](hidden, scale)


def rms_norm_cpu[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    rows: Int,
    hidden: Int,
    eps: Float32,
    ctx: DeviceContext,
) raises:
    """All rows, one contiguous range of rows per core."""

    def do_rows(start: Int, end: Int) raises {imm out_ptr, imm x_ptr, imm weight_ptr, imm hidden, imm eps}:
        for r in range(start, end):
            var base = r * hidden
            var inv = inv_rms(sum_of_squares[dtype](x_ptr, base, hidden), hidden, eps)
            scale_row[dtype](out_ptr, x_ptr, weight_ptr, base, hidden, inv)

    parallel_ranges(rows, tasks_for(rows * hidden), do_rows, ctx)


def add_rms_norm_cpu[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    sum_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    residual_ptr: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    rows: Int,
    hidden: Int,
    eps: Float32,
    ctx: DeviceContext,
) raises:
    def do_rows(start: Int, end: Int) raises {imm out_ptr, imm sum_ptr, imm x_ptr, imm residual_ptr, imm weight_ptr, imm hidden, imm eps}:
        for r in range(start, end):
            var base = r * hidden
            var sum_sq = add_and_sum_of_squares[dtype](sum_ptr, x_ptr, residual_ptr, base, hidden)
            scale_row[dtype](out_ptr, sum_ptr, weight_ptr, base, hidden, inv_rms(sum_sq, hidden, eps))

    parallel_ranges(rows, tasks_for(rows * hidden), do_rows, ctx)


def rms_norm_gpu_kernel[dtype: DType, add_residual: Bool](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    sum_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    x_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    residual_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    weight_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    hidden_i32: Int32,
    eps: Float32,
):
    """One block per row. With add_residual, sum_ptr receives dtype(x + residual) and is normalised;
    without, x is normalised and sum_ptr/residual_ptr are unused."""
    var hidden = Int(hidden_i32)
    var base = Int(block_idx.x) * hidden
    var tid = Int(thread_idx.x)
    var partial = stack_allocation[GPU_THREADS_PER_ROW, Float32, address_space=AddressSpace.SHARED]()

    var sum_sq: Float32 = 0
    var j = tid
    while j < hidden:
        var v: Float32
        comptime if add_residual:
            var s = narrow[dtype](widen(x_ptr.unsafe_load(base + j)) + widen(residual_ptr.unsafe_load(base + j)))
            sum_ptr.unsafe_store(base + j, s)  # each thread re-reads only what it wrote itself
            v = s.cast[DType.float32]()
        else:
            v = x_ptr.unsafe_load(base + j).cast[DType.float32]()
        sum_sq += v * v
        j += GPU_THREADS_PER_ROW
    var inv = inv_rms(block_sum[GPU_THREADS_PER_ROW](partial, tid, sum_sq), hidden, eps)

    j = tid
    while j < hidden:
        var v: Float32
        comptime if add_residual:
            v = sum_ptr.unsafe_load(base + j).cast[DType.float32]()
        else:
            v = x_ptr.unsafe_load(base + j).cast[DType.float32]()
        var normed = round_to[dtype](v * inv)
        out_ptr.unsafe_store(base + j, narrow[dtype](normed * widen(weight_ptr.unsafe_load(j))))
        j += GPU_THREADS_PER_ROW


@extensibility.register("mili_rms_norm")
struct RMSNorm[eps: Float32]:
    """Computes rmsnorm(x) * weight over the last axis of a [rows, hidden] tensor."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        weight: InputTensor[dtype=output.dtype, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var hidden = x.dim_size(1)
        if weight.dim_size(0) != hidden:
            raise Error("mili_rms_norm: weight has ", weight.dim_size(0), " elements, rows have ", hidden)
        comptime if target == "cpu":
            rms_norm_cpu[output.dtype](output.unsafe_ptr(), x.unsafe_ptr(), weight.unsafe_ptr(), rows, hidden,
                                       Self.eps, ctx)
        elif target == "gpu":
            if rows == 0:
                return
            ctx.enqueue_function[rms_norm_gpu_kernel[output.dtype, False]](
                output.unsafe_ptr(), output.unsafe_ptr(), x.unsafe_ptr(), x.unsafe_ptr(), weight.unsafe_ptr(),
                Int32(hidden), Self.eps, grid_dim=rows, block_dim=GPU_THREADS_PER_ROW,
            )
        else:
            raise Error("mili_rms_norm: unsupported target ", target)


@extensibility.register("mili_add_rms_norm")
struct AddRMSNorm[eps: Float32]:
    """Computes residual_out = x + residual and out = rmsnorm(residual_out) * weight in one pass."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        residual_out: OutputTensor[dtype=output.dtype, rank=2, ...],
        x: InputTensor[dtype=output.dtype, rank=2, ...],
        residual: InputTensor[dtype=output.dtype, rank=2, ...],
        weight: InputTensor[dtype=output.dtype, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var rows = x.dim_size(0)
        var hidden = x.dim_size(1)
        if weight.dim_size(0) != hidden or residual.dim_size(1) != hidden or residual.dim_size(0) != rows:
            raise Error("mili_add_rms_norm: x, residual [rows, hidden] and weight [hidden] disagree")
        comptime if target == "cpu":
            add_rms_norm_cpu[output.dtype](output.unsafe_ptr(), residual_out.unsafe_ptr(), x.unsafe_ptr(),
                                           residual.unsafe_ptr(), weight.unsafe_ptr(), rows, hidden, Self.eps, ctx)
        elif target == "gpu":
            if rows == 0:
                return
            ctx.enqueue_function[rms_norm_gpu_kernel[output.dtype, True]](
                output.unsafe_ptr(), residual_out.unsafe_ptr(), x.unsafe_ptr(), residual.unsafe_ptr(),
                weight.unsafe_ptr(), Int32(hidden), Self.eps, grid_dim=rows, block_dim=GPU_THREADS_PER_ROW,
            )
        else:
            raise Error("mili_add_rms_norm: unsupported target ", target)
