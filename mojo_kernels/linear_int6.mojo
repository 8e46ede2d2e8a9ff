# MILI's 6-bit linear layout (GGUF's Q6_K) on the CPU: linear_int4.mojo's activations and integer block sums, the
# codes widened by two bits from the high plane (linear.mojo's header has the layout).
#
# For row m, channel n and half group h (16 inputs: one int8 sub-scale, one 64-byte vector of high bits):
#   isum = sum over h of xq[m, k] * q[n, k] - 32 * sum over h of xq[m, k]   (exact int32; q the code 0..63)
#   acc = fma(float(isum), (block_scale[n, k // 256] * scale[n, h]) * xs[m, g], acc)
# with xs and xq as linear_int4.mojo quantizes them (per 32 inputs). Half groups go in order, so a row's output
# does not depend on the other rows of its batch.
from max.gpu.host import DeviceContext
from std.memory import stack_allocation
from .linear_layout import (
    PANEL, LinearShape, INT4_GROUP, INT6_BLOCK, INT6_SUBGROUP, INT6_ZERO_POINT, int8_padded_k, int4_panel_bytes,
    int6_blocks, int6_high_panel_bytes,
)
from .linear_cpu import for_each_tile, store_tile, zero_tile, F32_WIDTH, VECTORS_PER_PANEL
from .linear_int4 import I32_WIDTH, QuantizedRows, block_sums, tile_rows_int4, with_quantized_rows


@always_inline
def int6_tile[out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], rows: QuantizedRows, codes: Pointer[UInt8, ...],
    high_bits: Pointer[UInt8, ...], scale_ptr: Pointer[Int8, ...], block_ptr: Pointer[Float16, ...],
    shape: LinearShape, row: Int, panel: Int,
):
    """MR rows x NP panels, half group by half group: integer sums, then one fold (the header's formula)."""
    comptime V = NP * VECTORS_PER_PANEL
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var isum = stack_allocation[MR * NP * PANEL, Int32]()
    zero_tile[MR, NP](acc)
    var padded_k = int8_padded_k(shape.k, INT4_GROUP)
    var groups = padded_k // INT4_GROUP
    var subgroups = 2 * groups
    var blocks = int6_blocks(shape.k)
    var panel_bytes = int4_panel_bytes(shape.k)
    var high_panel_bytes = int6_high_panel_bytes(shape.k)
    var xq = rebind[Pointer[Int8, ImmutAnyOrigin]](rows.codes)
    for h in range(subgroups):
        block_sums[MR, NP, 2, True](isum, codes, high_bits, xq, panel, panel_bytes, high_panel_bytes, padded_k, row,
                                    2 * h)
        var g = h // 2
        comptime for v in range(V):
            var p = panel + v // VECTORS_PER_PANEL
            var lane = (v % VECTORS_PER_PANEL) * F32_WIDTH
            var scale = scale_ptr.unsafe_load[width=F32_WIDTH]((p * subgroups + h) * PANEL + lane).cast[DType.float32]()
            var block = block_ptr.unsafe_load[width=F32_WIDTH]((p * blocks + h * INT6_SUBGROUP // INT6_BLOCK) * PANEL
                                                               + lane).cast[DType.float32]()
            var weight_scale = block * scale
            comptime for m in range(MR):
                var i = (m * V + v) * F32_WIDTH
                var zero_point = Int32(INT6_ZERO_POINT) * rows.half_sums.unsafe_load((row + m) * subgroups + h)
                var sums = (isum.unsafe_load[width=I32_WIDTH](i) - zero_point).cast[DType.float32]()
                var row_scale = rows.scales.unsafe_load((row + m) * groups + g)
                acc.unsafe_store(i, sums.fma(weight_scale * row_scale, acc.unsafe_load[width=F32_WIDTH](i)))
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

        for_each_tile[tile_rows_int4()](shape, 1, tile, ctx)

    with_quantized_rows(x_ptr, shape, run, ctx)
