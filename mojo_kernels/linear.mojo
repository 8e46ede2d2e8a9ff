# MILI's linear layers: out[m, n] = sum_k x[m, k] * W[n, k], over weights packed once at load time
# (mili/model/packed_linear.py packs them; the layouts below are the contract between the two).
#
# Packed formats. Output channels are grouped in panels of 16 (N is padded with zero channels to whole panels):
#   bf16  w[panels, K2 * 32] bfloat16, K2 = ceil(K / 2):
#           W[n, k] at ((n // 16) * K2 + k // 2) * 32 + (n % 16) * 2 + k % 2
#         A panel is one 64-byte row per pair of k in which each channel's two weights share a 32-bit lane:
#         the layout vdpbf16ps (AVX512_BF16) and AMX B tiles read, and that AVX2 splits with a shift and a mask.
#   int8  q[panels, Kg * 16] int8, Kg = K rounded up to the group size G:  q[n, k] at ((n // 16) * Kg + k) * 16 + n % 16
#         scales[panels, (Kg / G) * 16] float16 or float32:  scale[n, g] at ((n // 16) * (Kg / G) + g) * 16 + n % 16
#         W[n, k] = q[n, k] * scale[n, k // G] (MILI's own int8: q in [-127, 127], float16 scales; GGUF's Q8_0,
#         Q4_0, Q5_0 are G = 32 with float16 scales, Q6_K G = 16 with float32 ones: mili/gguf/repack.py)
#   int8 with offsets (mili_linear_int8_offsets: GGUF's Q4_1, Q5_1, Q4_K, Q5_K):
#         q and scales as above, offsets[panels, (Kg / G) * 16] float32 laid out as the scales;
#         W[n, k] = q[n, k] * scale[n, k // G] + offset[n, k // G] (rounded after the multiply and after the add)
#   int4 (mili_linear_int4, mili_linear_int4_offsets: GGUF's Q4_0, Q4_1, Q4_K; `--quantization int4`):
#         codes[panels, Kg * 8] uint8, Kg = K rounded up to 32: per panel, a 64-byte block per 8 inputs in which
#         channel j's four bytes (4j .. 4j + 3) hold codes k = 8b + i in their low nibbles and k = 8b + 4 + i in their
#         high ones (i = 0..3): the lanes pmaddubsw / vpdpbusd dot with four activations;
#         scales (and offsets) [panels, Kg / 32 * 16] float16 or float32, laid out as int8's;
#         W[n, k] = (q[n, k] - 8) * scale[n, k // 32], or q[n, k] * scale + offset with offsets (q unsigned, 0..15).
#         Activations are quantized to int8 per row per 32 inputs and the products summed in integers
#         (linear_int4.mojo has the arithmetic; a row's result still depends on that row alone).
#   int4 with two-level scales (mili_linear_int4_k: GGUF's Q4_K as stored): codes as int4's; scales and mins
#         [panels, Kg / 32 * 16] uint8 (6-bit values) laid out as int4's scales, block_scales and block_mins
#         [panels, ceil(Kg / 256) * 16] float16; W[n, k] = q * (block_scale * scale) - block_min * min.
#   int6 (mili_linear_int6: GGUF's Q6_K): codes as int4's (the low 4 bits of each 6-bit code), and
#         high[panels, Kg * 4] uint8: per panel, a 64-byte vector per pair of blocks (16 inputs) whose byte 4j + i
#         holds the top 2 bits of the even block's codes i and 4 + i in bits 0-1 and 2-3, the odd block's in 4-5 and
#         6-7 (the nibbles' byte positions);
#         scales[panels, Kg / 16 * 16] int8 and block_scales[panels, ceil(Kg / 256) * 16] float16, laid out as
#         int8's scales; W[n, k] = (q[n, k] - 32) * (block_scale[n, k // 256] * scale[n, k // 16]) (q 0..63).
#         Activations as int4's.
#   float k-major (mili_linear_float: GGUF's F16 and F32 tensors, as stored)
#         w[panels, K * 16] float16 or float32:  W[n, k] at ((n // 16) * K + k) * 16 + n % 16
# Padding (k >= K, n >= N) is never read into an output.
#
# Accumulation, and why a row's output is bit-identical whatever M is: every bf16 output (m, n) is one float32
# chain acc = fma(x[m, k], W[n, k], acc) over k = 0, 1, ..., K-1 in order, with W[n, k] decoded exactly to
# float32 (a bfloat16 is the top half of a float32). An int8 output sums each group unscaled first:
# part_g = chain of fma(x[m, k], q[n, k], part) over the group's k in order from 0 (q is exact in float32), then
# acc = fma(part_g, scale[n, g], acc) over g in order: one FMA per weight instead of a multiply and an FMA.
# Layouts with offsets or float32 scales (GGUF's Q4_1, Q5_1 and K-quants) instead decode every weight exactly as
# gguf-py dequantizes it, W = (q * scale, rounded) + offset, rounded, and run one chain of K FMAs like bf16's, as
# does a float k-major layout: the values the op multiplies are gguf-py's, bit for bit, and a prefill multiplies
# a panel decoded once at the bf16 path's speed.
# Rows never share an accumulator and K is never split, so the blocking (1..MR rows per micro-kernel call,
# threads over panels, row blocks for cache reuse) changes which rows share a weight load, never a row's
# arithmetic.
# On CPUs with AVX512_BF16, bfloat16 activations against bf16 weights use vdpbf16ps instead, for every M alike
# (two k per instruction: bf16 products are exact, each add rounds, denormals are flushed), so the guarantee
# holds there too; such a CPU's results differ from an AVX2 CPU's in the last bits.
#
# CPU: threads split the panels (never K); within a thread, rows in blocks that stay in L2 while the
# thread's panels stream past. GPU: one thread per output element (correct, not tuned: MILI's GPU
# target is compile-checked only).
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, block_dim, grid_dim
from std.math import ceildiv
from .convert import narrow, widen
from .linear_layout import (
    PANEL, LinearShape, bf16_panel_stride, exact_int8_weights, int8_padded_k, packed_bf16_weight, packed_float_weight,
    packed_int8_q, packed_int8_scale, INT4_GROUP, INT4_ZERO_POINT, int4_panel_bytes, packed_int4_code,
    INT6_SUBGROUP, INT6_ZERO_POINT, int6_blocks, int6_high_panel_bytes, packed_int6_code, packed_int6_scale,
    int4_k_blocks,
)
from .linear_cpu import linear_bf16_cpu, linear_int8_cpu, linear_float_cpu, kernel_family_code, exact_int8_arithmetic
from .linear_int4 import linear_int4_cpu, linear_int4_k_cpu, int4_kernel_code
from .linear_int6 import linear_int6_cpu

comptime GPU_THREADS = 256


# --- GPU: one thread per output element --------------------------------------------------------------------

def linear_bf16_gpu_kernel[x_dtype: DType, out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], x_ptr: Pointer[Scalar[x_dtype], ImmutAnyOrigin],
    w_ptr: Pointer[BFloat16, ImmutAnyOrigin], rows: Int32, k_len: Int32, n_len: Int32,
):
    var total = Int(rows) * Int(n_len)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < total:
        var m = i // Int(n_len)
        var n = i - m * Int(n_len)
        var acc: Float32 = 0
        for k in range(Int(k_len)):
            acc = widen(x_ptr.unsafe_load(m * Int(k_len) + k)).fma(packed_bf16_weight(w_ptr, Int(k_len), n, k), acc)
        out_ptr.unsafe_store(i, narrow[out_dtype](acc))
        i += stride


def linear_int8_gpu_kernel[x_dtype: DType, out_dtype: DType, scale_dtype: DType, group: Int, OFFSETS: Bool](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], x_ptr: Pointer[Scalar[x_dtype], ImmutAnyOrigin],
    q_ptr: Pointer[Int8, ImmutAnyOrigin], scale_ptr: Pointer[Scalar[scale_dtype], ImmutAnyOrigin],
    offset_ptr: Pointer[Float32, ImmutAnyOrigin], rows: Int32, k_len: Int32, n_len: Int32,
):
    var total = Int(rows) * Int(n_len)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < total:
        var m = i // Int(n_len)
        var n = i - m * Int(n_len)
        var padded_k = int8_padded_k(Int(k_len), group)
        var acc: Float32 = 0
        comptime if exact_int8_arithmetic[scale_dtype, OFFSETS]():
            for k in range(Int(k_len)):
                var g = k // group
                var offset: Float32 = 0
                comptime if OFFSETS:
                    offset = packed_int8_scale[group](offset_ptr, padded_k, n, g)
                var q = q_ptr.unsafe_load(((n // PANEL) * padded_k + k) * PANEL + n % PANEL)
                var w = exact_int8_weights[OFFSETS](q, packed_int8_scale[group](scale_ptr, padded_k, n, g), offset)
                acc = widen(x_ptr.unsafe_load(m * Int(k_len) + k)).fma(w, acc)
        else:
            for g in range(padded_k // group):
                var part: Float32 = 0
                for k in range(g * group, min(Int(k_len), (g + 1) * group)):
                    part = widen(x_ptr.unsafe_load(m * Int(k_len) + k)).fma(packed_int8_q(q_ptr, padded_k, n, k), part)
                acc = part.fma(packed_int8_scale[group](scale_ptr, padded_k, n, g), acc)
        out_ptr.unsafe_store(i, narrow[out_dtype](acc))
        i += stride


def linear_float_gpu_kernel[x_dtype: DType, out_dtype: DType, w_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], x_ptr: Pointer[Scalar[x_dtype], ImmutAnyOrigin],
    w_ptr: Pointer[Scalar[w_dtype], ImmutAnyOrigin], rows: Int32, k_len: Int32, n_len: Int32,
):
    var total = Int(rows) * Int(n_len)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < total:
        var m = i // Int(n_len)
        var n = i - m * Int(n_len)
        var acc: Float32 = 0
        for k in range(Int(k_len)):
            acc = widen(x_ptr.unsafe_load(m * Int(k_len) + k)).fma(packed_float_weight(w_ptr, Int(k_len), n, k), acc)
        out_ptr.unsafe_store(i, narrow[out_dtype](acc))
        i += stride


def linear_int4_gpu_kernel[x_dtype: DType, out_dtype: DType, scale_dtype: DType, OFFSETS: Bool](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], x_ptr: Pointer[Scalar[x_dtype], ImmutAnyOrigin],
    codes: Pointer[UInt8, ImmutAnyOrigin], scale_ptr: Pointer[Scalar[scale_dtype], ImmutAnyOrigin],
    offset_ptr: Pointer[Scalar[scale_dtype], ImmutAnyOrigin], rows: Int32, k_len: Int32, n_len: Int32,
):
    """The CPU path's formula (linear_int4.mojo's header), each thread quantizing its row's groups itself."""
    var total = Int(rows) * Int(n_len)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    var k_total = Int(k_len)
    var padded_k = int8_padded_k(k_total, INT4_GROUP)
    while i < total:
        var m = i // Int(n_len)
        var n = i - m * Int(n_len)
        var acc: Float32 = 0
        for g in range(padded_k // INT4_GROUP):
            var end = min(k_total, (g + 1) * INT4_GROUP)
            var amax: Float32 = 0
            for k in range(g * INT4_GROUP, end):
                amax = max(amax, abs(widen(x_ptr.unsafe_load(m * k_total + k))))
            var inverse = Float32(127) / amax if amax > 0 else Float32(0)
            var isum = 0
            var code_sum = 0
            for k in range(g * INT4_GROUP, end):
                var xq = max(min(round(widen(x_ptr.unsafe_load(m * k_total + k)) * inverse), 127), -127)
                isum += Int(xq) * Int(packed_int4_code(codes, k_total, n, k))
                code_sum += Int(xq)
            var xsum = (amax / 127) * Float32(code_sum)  # the sum of the quantized activations
            var scale = packed_int8_scale[INT4_GROUP](scale_ptr, padded_k, n, g)
            var offset = scale * -Float32(INT4_ZERO_POINT)
            comptime if OFFSETS:
                offset = packed_int8_scale[INT4_GROUP](offset_ptr, padded_k, n, g)
            acc = offset.fma(xsum, Float32(isum).fma(scale * (amax / 127), acc))
        out_ptr.unsafe_store(i, narrow[out_dtype](acc))
        i += stride


def linear_int6_gpu_kernel[x_dtype: DType, out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], x_ptr: Pointer[Scalar[x_dtype], ImmutAnyOrigin],
    codes: Pointer[UInt8, ImmutAnyOrigin], high_bits: Pointer[UInt8, ImmutAnyOrigin],
    scale_ptr: Pointer[Int8, ImmutAnyOrigin], block_ptr: Pointer[Float16, ImmutAnyOrigin], rows: Int32, k_len: Int32,
    n_len: Int32,
):
    """The CPU path's formula (linear_int6.mojo's header), each thread quantizing its row's groups itself."""
    var total = Int(rows) * Int(n_len)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    var k_total = Int(k_len)
    var padded_k = int8_padded_k(k_total, INT4_GROUP)
    while i < total:
        var m = i // Int(n_len)
        var n = i - m * Int(n_len)
        var acc: Float32 = 0
        for g in range(padded_k // INT4_GROUP):
            var amax: Float32 = 0
            for k in range(g * INT4_GROUP, min(k_total, (g + 1) * INT4_GROUP)):
                amax = max(amax, abs(widen(x_ptr.unsafe_load(m * k_total + k))))
            var inverse = Float32(127) / amax if amax > 0 else Float32(0)
            for h in range(2):
                var start = g * INT4_GROUP + h * INT6_SUBGROUP
                var isum = 0
                for k in range(start, min(k_total, start + INT6_SUBGROUP)):
                    var xq = max(min(round(widen(x_ptr.unsafe_load(m * k_total + k)) * inverse), 127), -127)
                    isum += Int(xq) * (packed_int6_code(codes, high_bits, k_total, n, k) - INT6_ZERO_POINT)
                var weight_scale = packed_int6_scale(scale_ptr, block_ptr, k_total, n, start)
                acc = Float32(isum).fma(weight_scale * (amax / 127), acc)
        out_ptr.unsafe_store(i, narrow[out_dtype](acc))
        i += stride


def linear_int4_k_gpu_kernel[x_dtype: DType, out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], x_ptr: Pointer[Scalar[x_dtype], ImmutAnyOrigin],
    codes: Pointer[UInt8, ImmutAnyOrigin], scale_ptr: Pointer[UInt8, ImmutAnyOrigin],
    min_ptr: Pointer[UInt8, ImmutAnyOrigin], block_ptr: Pointer[Float16, ImmutAnyOrigin],
    block_min_ptr: Pointer[Float16, ImmutAnyOrigin], rows: Int32, k_len: Int32, n_len: Int32,
):
    """The CPU path's formula (linear_int4.mojo's header, Q4_K's scales), each thread quantizing its row itself."""
    var total = Int(rows) * Int(n_len)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    var k_total = Int(k_len)
    var padded_k = int8_padded_k(k_total, INT4_GROUP)
    var groups = padded_k // INT4_GROUP
    while i < total:
        var m = i // Int(n_len)
        var n = i - m * Int(n_len)
        var acc: Float32 = 0
        for g in range(groups):
            var end = min(k_total, (g + 1) * INT4_GROUP)
            var amax: Float32 = 0
            for k in range(g * INT4_GROUP, end):
                amax = max(amax, abs(widen(x_ptr.unsafe_load(m * k_total + k))))
            var inverse = Float32(127) / amax if amax > 0 else Float32(0)
            var isum = 0
            var code_sum = 0
            for k in range(g * INT4_GROUP, end):
                var xq = max(min(round(widen(x_ptr.unsafe_load(m * k_total + k)) * inverse), 127), -127)
                isum += Int(xq) * Int(packed_int4_code(codes, k_total, n, k))
                code_sum += Int(xq)
            var xsum = (amax / 127) * Float32(code_sum)  # the sum of the quantized activations
            var at = ((n // PANEL) * groups + g) * PANEL + n % PANEL
            var block_at = ((n // PANEL) * int4_k_blocks(k_total) + g * INT4_GROUP // 256) * PANEL + n % PANEL
            var scale = block_ptr.unsafe_load(block_at).cast[DType.float32]() * scale_ptr.unsafe_load(at).cast[
                DType.float32]()
            var offset = -(block_min_ptr.unsafe_load(block_at).cast[DType.float32]() * min_ptr.unsafe_load(at).cast[
                DType.float32]())
            acc = offset.fma(xsum, Float32(isum).fma(scale * (amax / 127), acc))
        out_ptr.unsafe_store(i, narrow[out_dtype](acc))
        i += stride


@always_inline
def gpu_blocks(total: Int) -> Int:
    return max(1, min(ceildiv(total, GPU_THREADS), 65535))


# --- The ops ---------------------------------------------------------------------------------------------

def check_packed(op: StaticString, x_rows: Int, out_rows: Int, shape: LinearShape, w_panels: Int, w_cols: Int,
                 expected_cols: Int) raises:
    if x_rows != out_rows:
        raise Error(op, ": x has ", x_rows, " rows but the output has ", out_rows)
    if w_panels != shape.panels() or w_cols != expected_cols:
        raise Error(op, ": packed weight is [", w_panels, ", ", w_cols, "], expected [", shape.panels(), ", ",
                    expected_cols, "] for K = ", shape.k, ", N = ", shape.n)


@extensibility.register("mili_linear_bf16")
struct LinearBF16:
    """Computes out [M, N] = x [M, K] @ W^T with W packed as bf16 panels (see the top of this file)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        w: InputTensor[dtype=DType.bfloat16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var shape = LinearShape(x.dim_size(0), x.dim_size(1), output.dim_size(1))
        check_packed("mili_linear_bf16", shape.rows, output.dim_size(0), shape, w.dim_size(0), w.dim_size(1),
                     bf16_panel_stride(shape.k))
        if shape.rows == 0 or shape.n == 0:
            return
        comptime if target == "cpu":
            linear_bf16_cpu[x.dtype, output.dtype](output.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), shape, ctx)
        elif target == "gpu":
            ctx.enqueue_function[linear_bf16_gpu_kernel[x.dtype, output.dtype]](
                output.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(),
                Int32(shape.rows), Int32(shape.k), Int32(shape.n),
                grid_dim=gpu_blocks(shape.rows * shape.n), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_linear_bf16: unsupported target ", target)


def check_scale_dtype(op: StaticString, dtype: DType) raises:
    if dtype != DType.float16 and dtype != DType.float32:
        raise Error(op, ": scales must be float16 or float32, got ", dtype)


def linear_int8[OFFSETS: Bool, group: Int, target: StaticString](
    op: StaticString, output: OutputTensor[rank=2, ...], x: InputTensor[rank=2, ...],
    q: InputTensor[dtype=DType.int8, rank=2, ...], scales: InputTensor[rank=2, ...],
    offset_ptr: Pointer[Float32, ImmutAnyOrigin], offset_shape: Tuple[Int, Int], ctx: DeviceContext,
) raises:
    """Both int8 ops; without OFFSETS `offset_ptr` is never read."""
    comptime assert group > 0, "group_size must be positive"
    check_scale_dtype(op, scales.dtype)
    var shape = LinearShape(x.dim_size(0), x.dim_size(1), output.dim_size(1))
    var padded_k = int8_padded_k(shape.k, group)
    check_packed(op, shape.rows, output.dim_size(0), shape, q.dim_size(0), q.dim_size(1), padded_k * PANEL)
    check_packed(op, shape.rows, output.dim_size(0), shape, scales.dim_size(0), scales.dim_size(1),
                 padded_k // group * PANEL)
    comptime if OFFSETS:
        check_packed(op, shape.rows, output.dim_size(0), shape, offset_shape[0], offset_shape[1],
                     padded_k // group * PANEL)
    if shape.rows == 0 or shape.n == 0:
        return
    comptime if target == "cpu":
        linear_int8_cpu[x.dtype, output.dtype, group, OFFSETS](
            output.unsafe_ptr(), x.unsafe_ptr(), q.unsafe_ptr(), scales.unsafe_ptr(), offset_ptr, shape, ctx)
    elif target == "gpu":
        ctx.enqueue_function[linear_int8_gpu_kernel[x.dtype, output.dtype, scales.dtype, group, OFFSETS]](
            output.unsafe_ptr(), x.unsafe_ptr(), q.unsafe_ptr(), scales.unsafe_ptr(), offset_ptr,
            Int32(shape.rows), Int32(shape.k), Int32(shape.n),
            grid_dim=gpu_blocks(shape.rows * shape.n), block_dim=GPU_THREADS,
        )
    else:
        raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_linear_int8")
struct LinearInt8[group_size: Int]:
    """Computes out [M, N] = x [M, K] @ W^T with W = q * scale packed as int8 panels, one float16 or float32 scale
    per channel per `group_size` inputs (see the top of this file)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        q: InputTensor[dtype=DType.int8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        # No offsets: the offset pointer is a stand-in that is never read.
        var unused = rebind[Pointer[Float32, ImmutAnyOrigin]](q.unsafe_ptr().unsafe_bitcast[Float32]())
        linear_int8[False, Self.group_size, target]("mili_linear_int8", output, x, q, scales, unused, (0, 0), ctx)


@extensibility.register("mili_linear_int8_offsets")
struct LinearInt8Offsets[group_size: Int]:
    """Computes out [M, N] = x [M, K] @ W^T with W = q * scale + offset (GGUF's Q4_1, Q5_1, Q4_K, Q5_K): int8
    panels, one scale (float16 or float32) and one float32 offset per channel per `group_size` inputs."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        q: InputTensor[dtype=DType.int8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        offsets: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var offset_ptr = rebind[Pointer[Float32, ImmutAnyOrigin]](offsets.unsafe_ptr())
        linear_int8[True, Self.group_size, target]("mili_linear_int8_offsets", output, x, q, scales, offset_ptr,
                                                   (offsets.dim_size(0), offsets.dim_size(1)), ctx)


def linear_int4[OFFSETS: Bool, target: StaticString](
    op: StaticString, output: OutputTensor[rank=2, ...], x: InputTensor[rank=2, ...],
    codes: InputTensor[dtype=DType.uint8, rank=2, ...], scales: InputTensor[rank=2, ...],
    offsets: InputTensor[rank=2, ...], ctx: DeviceContext,
) raises:
    """Both 4-bit ops; without OFFSETS `offsets` is a stand-in that is never read."""
    check_scale_dtype(op, scales.dtype)
    var shape = LinearShape(x.dim_size(0), x.dim_size(1), output.dim_size(1))
    var groups = int8_padded_k(shape.k, INT4_GROUP) // INT4_GROUP
    check_packed(op, shape.rows, output.dim_size(0), shape, codes.dim_size(0), codes.dim_size(1),
                 int4_panel_bytes(shape.k))
    check_packed(op, shape.rows, output.dim_size(0), shape, scales.dim_size(0), scales.dim_size(1), groups * PANEL)
    comptime if OFFSETS:
        if offsets.dtype != scales.dtype:
            raise Error(op, ": offsets must have the scales' dtype ", scales.dtype, ", got ", offsets.dtype)
        check_packed(op, shape.rows, output.dim_size(0), shape, offsets.dim_size(0), offsets.dim_size(1),
                     groups * PANEL)
    if shape.rows == 0 or shape.n == 0:
        return
    var offset_ptr = rebind[Pointer[Scalar[scales.dtype], ImmutAnyOrigin]](
        offsets.unsafe_ptr().unsafe_bitcast[Scalar[scales.dtype]]())
    comptime if target == "cpu":
        linear_int4_cpu[x.dtype, output.dtype, OFFSETS](
            output.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(), scales.unsafe_ptr(), offset_ptr, shape, ctx)
    elif target == "gpu":
        ctx.enqueue_function[linear_int4_gpu_kernel[x.dtype, output.dtype, scales.dtype, OFFSETS]](
            output.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(), scales.unsafe_ptr(), offset_ptr,
            Int32(shape.rows), Int32(shape.k), Int32(shape.n),
            grid_dim=gpu_blocks(shape.rows * shape.n), block_dim=GPU_THREADS,
        )
    else:
        raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_linear_int4")
struct LinearInt4:
    """Computes out [M, N] = x [M, K] @ W^T with W = (q - 8) * scale (GGUF's Q4_0): 4-bit codes in panels, one
    float16 or float32 scale per channel per 32 inputs, activations quantized to int8 (linear_int4.mojo)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        linear_int4[False, target]("mili_linear_int4", output, x, codes, scales, scales, ctx)


@extensibility.register("mili_linear_int4_offsets")
struct LinearInt4Offsets:
    """Computes out [M, N] = x [M, K] @ W^T with W = q * scale + offset (GGUF's Q4_1 and Q4_K, MILI's int4): 4-bit
    codes in panels, a scale and an offset (both float16 or both float32) per channel per 32 inputs, activations
    quantized to int8 (linear_int4.mojo)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        offsets: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        linear_int4[True, target]("mili_linear_int4_offsets", output, x, codes, scales, offsets, ctx)


@extensibility.register("mili_linear_int4_k")
struct LinearInt4K:
    """Computes out [M, N] = x [M, K] @ W^T with W = q * (block_scale * scale) - block_min * min (GGUF's Q4_K as
    stored): 4-bit codes in panels, 6-bit scales and mins per channel per 32 inputs, float16 block scales and mins
    per 256, activations quantized to int8 (linear_int4.mojo)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[dtype=DType.uint8, rank=2, ...],
        mins: InputTensor[dtype=DType.uint8, rank=2, ...],
        block_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        block_mins: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mili_linear_int4_k"
        var shape = LinearShape(x.dim_size(0), x.dim_size(1), output.dim_size(1))
        var rows = output.dim_size(0)
        var groups = int8_padded_k(shape.k, INT4_GROUP) // INT4_GROUP
        check_packed(op, shape.rows, rows, shape, codes.dim_size(0), codes.dim_size(1), int4_panel_bytes(shape.k))
        for t in [(scales.dim_size(0), scales.dim_size(1)), (mins.dim_size(0), mins.dim_size(1))]:
            check_packed(op, shape.rows, rows, shape, t[0], t[1], groups * PANEL)
        for t in [(block_scales.dim_size(0), block_scales.dim_size(1)), (block_mins.dim_size(0), block_mins.dim_size(1))]:
            check_packed(op, shape.rows, rows, shape, t[0], t[1], int4_k_blocks(shape.k) * PANEL)
        if shape.rows == 0 or shape.n == 0:
            return
        comptime if target == "cpu":
            linear_int4_k_cpu[x.dtype, output.dtype](output.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(),
                                                     scales.unsafe_ptr(), mins.unsafe_ptr(), block_scales.unsafe_ptr(),
                                                     block_mins.unsafe_ptr(), shape, ctx)
        elif target == "gpu":
            ctx.enqueue_function[linear_int4_k_gpu_kernel[x.dtype, output.dtype]](
                output.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(), scales.unsafe_ptr(), mins.unsafe_ptr(),
                block_scales.unsafe_ptr(), block_mins.unsafe_ptr(), Int32(shape.rows), Int32(shape.k), Int32(shape.n),
                grid_dim=gpu_blocks(shape.rows * shape.n), block_dim=GPU_THREADS,
            )
        else:
            raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_linear_int6")
struct LinearInt6:
    """Computes out [M, N] = x [M, K] @ W^T with W = (q - 32) * block_scale * scale (GGUF's Q6_K): 6-bit codes in
    panels (a nibble plane and a 2-bit plane), an int8 scale per channel per 16 inputs and a float16 one per 256,
    activations quantized to int8 (linear_int6.mojo)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        high_bits: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[dtype=DType.int8, rank=2, ...],
        block_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mili_linear_int6"
        var shape = LinearShape(x.dim_size(0), x.dim_size(1), output.dim_size(1))
        var rows = output.dim_size(0)
        check_packed(op, shape.rows, rows, shape, codes.dim_size(0), codes.dim_size(1), int4_panel_bytes(shape.k))
        check_packed(op, shape.rows, rows, shape, high_bits.dim_size(0), high_bits.dim_size(1),
                     int6_high_panel_bytes(shape.k))
        check_packed(op, shape.rows, rows, shape, scales.dim_size(0), scales.dim_size(1),
                     int8_padded_k(shape.k, INT4_GROUP) // INT6_SUBGROUP * PANEL)
        check_packed(op, shape.rows, rows, shape, block_scales.dim_size(0), block_scales.dim_size(1),
                     int6_blocks(shape.k) * PANEL)
        if shape.rows == 0 or shape.n == 0:
            return
        comptime if target == "cpu":
            linear_int6_cpu[x.dtype, output.dtype](output.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(),
                                                   high_bits.unsafe_ptr(), scales.unsafe_ptr(),
                                                   block_scales.unsafe_ptr(), shape, ctx)
        elif target == "gpu":
            ctx.enqueue_function[linear_int6_gpu_kernel[x.dtype, output.dtype]](
                output.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(), high_bits.unsafe_ptr(), scales.unsafe_ptr(),
                block_scales.unsafe_ptr(), Int32(shape.rows), Int32(shape.k), Int32(shape.n),
                grid_dim=gpu_blocks(shape.rows * shape.n), block_dim=GPU_THREADS,
            )
        else:
            raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_linear_float")
struct LinearFloat:
    """Computes out [M, N] = x [M, K] @ W^T with W float16 or float32 in k-major panels (GGUF's F16 and F32
    tensors, run as stored; see the top of this file)."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        x: InputTensor[rank=2, ...],
        w: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        if w.dtype != DType.float16 and w.dtype != DType.float32:
            raise Error("mili_linear_float: weights must be float16 or float32, got ", w.dtype)
        var shape = LinearShape(x.dim_size(0), x.dim_size(1), output.dim_size(1))
        check_packed("mili_linear_float", shape.rows, output.dim_size(0), shape, w.dim_size(0), w.dim_size(1),
                     shape.k * PANEL)
        if shape.rows == 0 or shape.n == 0:
            return
        comptime if target == "cpu":
            linear_float_cpu[x.dtype, output.dtype](output.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), shape, ctx)
        elif target == "gpu":
            ctx.enqueue_function[linear_float_gpu_kernel[x.dtype, output.dtype, w.dtype]](
                output.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(),
                Int32(shape.rows), Int32(shape.k), Int32(shape.n),
                grid_dim=gpu_blocks(shape.rows * shape.n), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_linear_float: unsupported target ", target)


@extensibility.register("mili_linear_kernel_family")
struct LinearKernelFamily:
    """[2] int32: which CPU micro-kernel mili_linear_bf16 runs for `x_dtype` activations here (kernel_family_code),
    and which the 4-bit ops run (int4_kernel_code). Lets tests check that the path this machine has is the one
    that ran."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[dtype=DType.int32, rank=1, ...],
        x: InputTensor[rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime if target == "cpu":
            output.unsafe_ptr().unsafe_store(0, Int32(kernel_family_code[x.dtype]()))
            output.unsafe_ptr().unsafe_store(1, Int32(int4_kernel_code()))
        else:
            raise Error("mili_linear_kernel_family: CPU only")
