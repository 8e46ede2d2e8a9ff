# MILI's 6-bit linear layout (GGUF's Q6_K) on the CPU: linear_int4.mojo's activations and integer block sums, the
# codes widened by two bits from the high plane (linear.mojo's header has the layout).
#
# For row m, channel n, group g of 32 inputs and its half groups h (16 inputs: one int8 sub-scale, one 64-byte
# vector of high bits), in a block b of 256 inputs:
#   isum[g] = sum over g's two h of scale[n, h] * (sum over h of xq[m, k] * q[n, k] - 32 * sum over h of xq[m, k])
#             (exact int32; q the code 0..63)
#   part[b] = sum over b's g, in order, of float(isum[g]) * xs[m, g];  acc = fma(block_scale[n, b], part[b], acc)
# with xs and xq as linear_int4.mojo quantizes them (per 32 inputs). Groups go in order, so a row's output does
# not depend on the other rows of its batch.
from max.gpu.host import DeviceContext
from std.memory import bitcast, stack_allocation
from .linear_layout import (
    PANEL, LinearShape, INT4_GROUP, INT6_BLOCK, INT6_SUBGROUP, INT6_ZERO_POINT, int8_padded_k, int4_panel_bytes,
    int6_blocks, int6_high_panel_bytes,
)
from .linear_cpu import for_each_tile, panel_vector_at, store_tile, zero_tile, F32_WIDTH, VECTORS_PER_PANEL
from .linear_int4 import (
    DOT_MADDUBS, DOT_VNNI, I32_WIDTH, STREAMING_ROWS, QuantizedRows, block_sums, int4_dot_kind, multiply_pair_sums,
    sub_scale_pairs, tile_rows_int4, with_quantized_rows,
)


@always_inline
def zero_point_sums(first: SIMD[DType.int8, I32_WIDTH], second: SIMD[DType.int8, I32_WIDTH], first_sum: Int32,
                    second_sum: Int32) -> SIMD[DType.int32, I32_WIDTH]:
    """Lane i: first[i] * first_sum + second[i] * second_sum (sub-scales of two half groups times the sums of a
    row's activation codes there, each at most 16 * 127 in magnitude): one pmaddwd where there is one."""
    comptime if int4_dot_kind() == DOT_MADDUBS or int4_dot_kind() == DOT_VNNI:
        var both = SIMD[DType.int32, I32_WIDTH]((first_sum & 0xFFFF) | (second_sum << 16))
        return multiply_pair_sums(first.interleave(second).cast[DType.int16](), bitcast[DType.int16, 2 * I32_WIDTH](both))
    else:
        return first.cast[DType.int32]() * first_sum + second.cast[DType.int32]() * second_sum


@always_inline
def int6_tile[out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], rows: QuantizedRows, codes: Pointer[UInt8, ...],
    high_bits: Pointer[UInt8, ...], scale_ptr: Pointer[Int8, ...], block_ptr: Pointer[Float16, ...],
    shape: LinearShape, row: Int, panel: Int,
):
    """MR rows x NP panels, block by block of 256 inputs: per group of 32, the integer sums of its two half groups
    times their int8 sub-scales (exact, in the pmaddwd that widens the pair sums) less the zero point, converted
    once and multiplied by the row's activation scale; the block scale multiplies the block's sum once (the
    header's formula, regrouped)."""
    comptime V = NP * VECTORS_PER_PANEL
    comptime GROUPS_PER_BLOCK = INT6_BLOCK // INT4_GROUP
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var scaled = stack_allocation[MR * NP * PANEL, Float32]()
    var isum = stack_allocation[MR * NP * PANEL, Int32]()
    var sub_scales = stack_allocation[V * 2 * I32_WIDTH, Int16]()
    zero_tile[MR, NP](acc)
    var padded_k = int8_padded_k(shape.k, INT4_GROUP)
    var groups = padded_k // INT4_GROUP
    var subgroups = 2 * groups
    var blocks = int6_blocks(shape.k)
    var panel_bytes = int4_panel_bytes(shape.k)
    var high_panel_bytes = int6_high_panel_bytes(shape.k)
    var xq = rebind[Pointer[Int8, ImmutAnyOrigin]](rows.codes)
    var pairs = rebind[Pointer[Int16, ImmutAnyOrigin]](sub_scales)

    for block in range(blocks):
        zero_tile[MR, NP](scaled)
        for g in range(block * GROUPS_PER_BLOCK, min(groups, (block + 1) * GROUPS_PER_BLOCK)):
            comptime for half in range(2):
                comptime for v in range(V):
                    sub_scales.unsafe_store(v * 2 * I32_WIDTH, sub_scale_pairs(scale_ptr, panel_vector_at(panel, subgroups, v, 2 * g + half)))
                block_sums[MR, NP, 2, True, SCALED=True, ACCUMULATE=half == 1](
                    isum, codes, high_bits, xq, panel, panel_bytes, high_panel_bytes, padded_k, row, 4 * g + 2 * half,
                    pairs)
            comptime for v in range(V):
                var first = scale_ptr.unsafe_load[width=I32_WIDTH](panel_vector_at(panel, subgroups, v, 2 * g))
                var second = scale_ptr.unsafe_load[width=I32_WIDTH](panel_vector_at(panel, subgroups, v, 2 * g + 1))
                comptime for m in range(MR):
                    var i = (m * V + v) * F32_WIDTH
                    var half_at = (row + m) * subgroups + 2 * g
                    var zero_point = zero_point_sums(first, second, rows.half_sums.unsafe_load(half_at),
                                                     rows.half_sums.unsafe_load(half_at + 1))
                    var sums = (isum.unsafe_load[width=I32_WIDTH](i) - zero_point * INT6_ZERO_POINT).cast[DType.float32]()
                    var row_scale = rows.scales.unsafe_load((row + m) * groups + g)
                    scaled.unsafe_store(i, sums.fma(row_scale, scaled.unsafe_load[width=F32_WIDTH](i)))
        comptime for v in range(V):
            var block_at = panel_vector_at(panel, blocks, v, block)
            var block_scale = block_ptr.unsafe_load[width=F32_WIDTH](block_at).cast[DType.float32]()
            comptime for m in range(MR):
                var i = (m * V + v) * F32_WIDTH
                acc.unsafe_store(i, block_scale.fma(scaled.unsafe_load[width=F32_WIDTH](i), acc.unsafe_load[width=F32_WIDTH](i)))
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


def linear_int6_cpu[x_dtype: DType, out_dtype: DType](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[Scalar[x_dtype], ...],
    codes: Pointer[UInt8, ...], high_bits: Pointer[UInt8, ...], scale_ptr: Pointer[Int8, ...],
    block_ptr: Pointer[Float16, ...], shape: LinearShape, ctx: DeviceContext,
) raises:
    """W = (q - 32) * block_scale * scale (GGUF's Q6_K)."""

    def run(rows: QuantizedRows) raises {imm out_ptr, imm codes, imm high_bits, imm scale_ptr, imm block_ptr, imm shape, ref ctx}:
        def tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm rows, imm codes, imm high_bits, imm scale_ptr, imm block_ptr, imm shape}:
            int6_tile[out_dtype, MR, NP](out_ptr, rows, codes, high_bits, scale_ptr, block_ptr, shape, row, panel)

        for_each_tile[tile_rows_int4(), STREAMING_ROWS](shape, 1, tile, ctx)

    with_quantized_rows(x_ptr, shape, run, ctx)
