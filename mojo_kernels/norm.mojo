# RMSNorm, as Qwen3 computes it (transformers' Qwen3RMSNorm):
#
#   x:      [rows, hidden]   float32 or bfloat16
#   weight: [hidden]         same dtype as x
#   out:    [rows, hidden]   out[r, j] = dtype(x[r, j] * inv_rms[r]) * weight[j]
#   inv_rms[r] = 1 / sqrt(mean_j(x[r, j]^2) + eps), accumulated in float32.
#
# The normalised value is rounded to the input dtype *before* the weight multiply, exactly
# like the reference, so bfloat16 runs round the same way transformers does.
#
# CPU: rows are split into one contiguous range per core; each row is two SIMD passes.
# GPU: one thread block per row; a shared-memory tree reduction gives the sum of squares.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, barrier
from max.algorithm import sync_parallelize
from std.algorithm import vectorize
from std.memory import stack_allocation, AddressSpace
from std.sys import simd_width_of, num_physical_cores
from std.math import sqrt, ceildiv

comptime GPU_THREADS_PER_ROW = 256


def rms_norm_row[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    row: Int,
    hidden: Int,
    eps: Float32,
):
    """Normalises one row on the CPU: a SIMD sum of squares, then a SIMD scale pass."""
    comptime width = simd_width_of[DType.float32]()
    var base = row * hidden
    var sum_sq = SIMD[DType.float32, width](0)
    var sum_tail: Float32 = 0

    def accumulate[w: Int](j: Int) {mut sum_sq, mut sum_tail, imm x_ptr, imm base}:
        var v = x_ptr.unsafe_load[width=w](base + j).cast[DType.float32]()
        comptime if w == width:
            sum_sq += rebind[SIMD[DType.float32, width]](v * v)  # lane-wise: one horizontal add per row, not per vector
        else:
            sum_tail += (v * v).reduce_add()

    vectorize[width](hidden, accumulate)
    var inv_rms = 1.0 / sqrt((sum_sq.reduce_add() + sum_tail) / Float32(hidden) + eps)

    def scale[w: Int](j: Int) {imm x_ptr, imm weight_ptr, imm out_ptr, imm base, imm inv_rms}:
        var v = x_ptr.unsafe_load[width=w](base + j).cast[DType.float32]()
        var normed = (v * inv_rms).cast[dtype]().cast[DType.float32]()
        var w_ = weight_ptr.unsafe_load[width=w](j).cast[DType.float32]()
        out_ptr.unsafe_store(base + j, (normed * w_).cast[dtype]())

    vectorize[width](hidden, scale)


def rms_norm_cpu[dtype: DType](
    out_ptr: MutPointer[Scalar[dtype], ...],
    x_ptr: Pointer[Scalar[dtype], ...],
    weight_ptr: Pointer[Scalar[dtype], ...],
    rows: Int,
    hidden: Int,
    eps: Float32,
) raises:
    """All rows, one contiguous range of rows per core (few, large tasks: no per-row overhead)."""
    if rows == 0:
        return
    var workers = min(rows, num_physical_cores())
    var rows_per_worker = ceildiv(rows, workers)

    def do_range(w: Int) raises {imm out_ptr, imm x_ptr, imm weight_ptr, imm rows, imm hidden, imm eps, imm rows_per_worker}:
        var end = min(rows, (w + 1) * rows_per_worker)
        for r in range(w * rows_per_worker, end):
            rms_norm_row[dtype](out_ptr, x_ptr, weight_ptr, r, hidden, eps)

    sync_parallelize(do_range, workers)


def rms_norm_gpu_kernel[dtype: DType](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    x_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    weight_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    hidden_i32: Int32,
    eps: Float32,
):
    """One block per row: strided partial sums, a shared-memory reduction, then the scale pass."""
    var hidden = Int(hidden_i32)
    var base = Int(block_idx.x) * hidden
    var tid = Int(thread_idx.x)
    var partial = stack_allocation[GPU_THREADS_PER_ROW, Float32, address_space=AddressSpace.SHARED]()

    var sum_sq: Float32 = 0
    var j = tid
    while j < hidden:
        var v = x_ptr.unsafe_load(base + j).cast[DType.float32]()
        sum_sq += v * v
        j += GPU_THREADS_PER_ROW
    partial.unsafe_store(tid, sum_sq)
    barrier()

    var stride = GPU_THREADS_PER_ROW // 2
    while stride > 0:
        if tid < stride:
            partial.unsafe_store(tid, partial.unsafe_load(tid) + partial.unsafe_load(tid + stride))
        barrier()
        stride //= 2

    var inv_rms = 1.0 / sqrt(partial.unsafe_load(0) / Float32(hidden) + eps)
    j = tid
    while j < hidden:
        var v = x_ptr.unsafe_load(base + j).cast[DType.float32]()
        var normed = (v * inv_rms).cast[dtype]().cast[DType.float32]()
        var w_ = weight_ptr.unsafe_load(j).cast[DType.float32]()
        out_ptr.unsafe_store(base + j, (normed * w_).cast[dtype]())
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
        comptime dtype = output.dtype
        var rows = x.dim_size(0)
        var hidden = x.dim_size(1)
        if weight.dim_size(0) != hidden:
            raise Error("mili_rms_norm: weight has ", weight.dim_size(0), " elements, rows have ", hidden)

        comptime if target == "cpu":
            rms_norm_cpu[dtype](output.unsafe_ptr(), x.unsafe_ptr(), weight.unsafe_ptr(), rows, hidden, Self.eps)
        elif target == "gpu":
            if rows == 0:
                return
            ctx.enqueue_function[rms_norm_gpu_kernel[dtype]](
                output.unsafe_ptr(), x.unsafe_ptr(), weight.unsafe_ptr(), Int32(hidden), Self.eps,
                grid_dim=rows, block_dim=GPU_THREADS_PER_ROW,
            )
        else:
            raise Error("mili_rms_norm: unsupported target ", target)
