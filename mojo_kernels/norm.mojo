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
# CPU: rows split into one contiguous range per core; each row is two SIMD passes.
# GPU: one thread block per row; a shared-memory tree reduction gives the sum of squares.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx
from std.algorithm import vectorize
from std.memory import stack_allocation, AddressSpace
from std.sys import simd_width_of, num_physical_cores
from std.math import sqrt
from .cpu_parallel import parallel_ranges
from .gpu_reduce import block_sum

comptime GPU_THREADS_PER_ROW = 256
comptime F32_WIDTH = simd_width_of[DType.float32]()


@always_inline
def inv_rms(sum_sq: Float32, hidden: Int, eps: Float32) -> Float32:
    return 1.0 / sqrt(sum_sq / Float32(hidden) + eps)


def sum_of_squares[dtype: DType](src: Pointer[Scalar[dtype], ...], base: Int, hidden: Int) -> Float32:
    var lanes = SIMD[DType.float32, F32_WIDTH](0)  # lane-wise partial sums: one horizontal add per row
    var tail: Float32 = 0

    def accumulate[w: Int](j: Int) {mut lanes, mut tail, imm src, imm base}:
        var v = src.unsafe_load[width=w](base + j).cast[DType.float32]()
        comptime if w == F32_WIDTH:
            lanes += rebind[SIMD[DType.float32, F32_WIDTH]](v * v)
        else:
            tail += (v * v).reduce_add()

    vectorize[F32_WIDTH](hidden, accumulate)
    return lanes.reduce_add() + tail


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
        var s = (x_ptr.unsafe_load[width=w](base + j).cast[DType.float32]()
                 + residual_ptr.unsafe_load[width=w](base + j).cast[DType.float32]()).cast[dtype]()
        sum_ptr.unsafe_store(base + j, s)
        var v = s.cast[DType.float32]()
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
        var normed = (src.unsafe_load[width=w](base + j).cast[DType.float32]() * inv).cast[dtype]()
        var weight = weight_ptr.unsafe_load[width=w](j).cast[DType.float32]()
        out_ptr.unsafe_store(base + j, (normed.cast[DType.float32]() * weight).cast[dtype]())

    vectorize[F32_WIDTH](hidden, scale)


def rms_norm_cpu[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    rows: Int,
    hidden: Int,
    eps: Float32,
) raises:
    """All rows, one contiguous range of rows per core."""

    def do_rows(start: Int, end: Int) raises {imm out_ptr, imm x_ptr, imm weight_ptr, imm hidden, imm eps}:
        for r in range(start, end):
            var base = r * hidden
            var inv = inv_rms(sum_of_squares[dtype](x_ptr, base, hidden), hidden, eps)
            scale_row[dtype](out_ptr, x_ptr, weight_ptr, base, hidden, inv)

    parallel_ranges(rows, num_physical_cores(), do_rows)


def add_rms_norm_cpu[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    sum_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    residual_ptr: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    rows: Int,
    hidden: Int,
    eps: Float32,
) raises:
    def do_rows(start: Int, end: Int) raises {imm out_ptr, imm sum_ptr, imm x_ptr, imm residual_ptr, imm weight_ptr, imm hidden, imm eps}:
        for r in range(start, end):
            var base = r * hidden
            var sum_sq = add_and_sum_of_squares[dtype](sum_ptr, x_ptr, residual_ptr, base, hidden)
            scale_row[dtype](out_ptr, sum_ptr, weight_ptr, base, hidden, inv_rms(sum_sq, hidden, eps))

    parallel_ranges(rows, num_physical_cores(), do_rows)


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
            var s = (x_ptr.unsafe_load(base + j).cast[DType.float32]()
                     + residual_ptr.unsafe_load(base + j).cast[DType.float32]()).cast[dtype]()
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
        var normed = (v * inv).cast[dtype]().cast[DType.float32]()
        out_ptr.unsafe_store(base + j, (normed * weight_ptr.unsafe_load(j).cast[DType.float32]()).cast[dtype]())
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
                                       Self.eps)
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
                                           residual.unsafe_ptr(), weight.unsafe_ptr(), rows, hidden, Self.eps)
        elif target == "gpu":
            if rows == 0:
                return
            ctx.enqueue_function[rms_norm_gpu_kernel[output.dtype, True]](
                output.unsafe_ptr(), residual_out.unsafe_ptr(), x.unsafe_ptr(), residual.unsafe_ptr(),
                weight.unsafe_ptr(), Int32(hidden), Self.eps, grid_dim=rows, block_dim=GPU_THREADS_PER_ROW,
            )
        else:
            raise Error("mili_add_rms_norm: unsupported target ", target)
