# MILI's 4-bit linear layout on the CPU (linear.mojo's header has the layout): activations quantized per row to
# int8 in groups of 32, products summed in integers, one float fold per group.
#
# Why 8-bit activations: a decode step streams every weight once, and at 4 bits a weight the float path
# (widen a nibble, convert, FMA) costs ~3 vector instructions per weight per row, enough to leave a 2-core CPU
# compute-bound below its read bandwidth. Integer dot products take 32 (AVX2) or 64 (AVX-512) codes per
# instruction: pmaddubsw (unsigned codes x signed activations -> 16-bit pair sums), summed within a group in 16 bits
# and widened once by pmaddwd; or vpdpbusd (AVX512_VNNI), which does both. llama.cpp quantizes activations the
# same way (Q8_0 / Q8_K, one scale per 256 inputs); here each group of 32 has its own activation scale.
# The offsets meet the sum of the quantized activations, so that the result is the dot product of the exact
# weights with the quantized activations: its error, sum of W * (xs * xq - x), scales with W. Meeting the exact
# float sums instead leaves sum of q * scale * (xs * xq - x), which scales with the unsigned codes (0..15, mean
# 7.5) rather than the centred weights: measured on a Q4_K_M file (benchmarks/gguf_accuracy.py), twice the KL.
#
# For row m, channel n and group g:
#   xs[m, g] = max |x[m, k]| / 127 over the group's k (float32), xq[m, k] = roundeven(x[m, k] * (127 / max)),
#   xsum[m, g] = xs[m, g] * (sum of xq[m, k] over the group) (the integer sum exact, one float32 rounding);
#   isum = sum over the group of xq[m, k] * q[n, k]   (exact int32; q the unsigned 4-bit code 0..15)
#   acc = fma(float(isum), scale[n, g] * xs[m, g], acc);  acc = fma(offset[n, g], xsum[m, g], acc)
# where offset = -8 * scale without stored offsets (W = (q - 8) * scale, GGUF's Q4_0). Groups go in order and each
# row's quantization is its own, so a row's output does not depend on the other rows of its batch.
from max.gpu.host import DeviceContext
from std.memory import bitcast, stack_allocation
from std.sys import CompilationTarget, simd_width_of
from std.sys.intrinsics import llvm_intrinsic
from std.math import ceildiv
from .cpu_parallel import parallel_ranges, tasks_for
from .convert import narrow, widen
from .linear_layout import (
    PANEL, LinearShape, INT4_GROUP, INT4_K_BLOCK, INT4_ZERO_POINT, int8_padded_k, int4_k_blocks, int4_panel_bytes,
)
from .linear_cpu import for_each_tile, panel_vector_at, store_tile, zero_tile, F32_WIDTH, VECTORS_PER_PANEL

comptime I32_WIDTH = F32_WIDTH
comptime CODE_BYTES = 4 * I32_WIDTH  # the codes of one vector's channels for one block of 8 inputs
comptime BLOCK_BYTES = 4 * PANEL  # one block of 8 inputs of a panel: 16 channels x 4 bytes
comptime BLOCKS_PER_GROUP = INT4_GROUP // 8


# --- Which integer dot product this CPU has ----------------------------------------------------------------

comptime DOT_GENERIC = 0  # int32 multiply-adds (any target)
comptime DOT_MADDUBS = 1  # pmaddubsw + pmaddwd (AVX2, AVX-512BW)
comptime DOT_VNNI = 2  # vpdpbusd (AVX512_VNNI)


@always_inline
def int4_dot_kind() -> Int:
    comptime if I32_WIDTH == 16 and CompilationTarget._has_feature["avx512vnni"]():
        return DOT_VNNI
    elif I32_WIDTH == 16 and CompilationTarget._has_feature["avx512bw"]():
        return DOT_MADDUBS
    elif I32_WIDTH == 8 and CompilationTarget._has_feature["avx2"]():
        return DOT_MADDUBS
    else:
        return DOT_GENERIC


def int4_kernel_code() -> Int:
    """What the 4-bit op compiles to here, for tests and logs: I32_WIDTH * 10 + the dot kind."""
    return I32_WIDTH * 10 + int4_dot_kind()


# Rows (a decode step's one) whose tiles take a single panel: the low-bit ops at M = 1 read each weight once at a
# fraction of their compute rate, so what counts is how DRAM and the prefetchers see the reads. A thread's tiles of
# 1 panel read its codes as one sequential stream (and each scale array as another); tiles of 4 read 4 streams
# 8-24 KB apart. Measured on a Zen 3 (benchmarks/mojo/linear_4bit_panels.mojo, a 0.6B token's Q4_K projections
# and Q6_K head, widths interleaved): 1 panel 7-14% faster than 4 in 4 of 4 runs, 1-7% faster than 2.
comptime STREAMING_ROWS = 1


@always_inline
def tile_rows_int4() -> Int:
    """Most rows per call: 4 on AVX2 (4 rows x 2 vectors of 16-bit sums, 4 unpacked code vectors and two
    broadcasts in 16 registers), 8 on AVX-512."""
    return 8 if I32_WIDTH >= 16 else 4


@always_inline
def pair_sums(codes: SIMD[DType.uint8, CODE_BYTES], x: SIMD[DType.int8, CODE_BYTES]) -> SIMD[DType.int16, 2 * I32_WIDTH]:
    """Pmaddubsw: lane i = codes[2i] * x[2i] + codes[2i + 1] * x[2i + 1] (at most 2 * 15 * 127: no saturation)."""
    comptime if I32_WIDTH == 16:
        return llvm_intrinsic["llvm.x86.avx512.pmaddubs.w.512", SIMD[DType.int16, 2 * I32_WIDTH]](codes, x)
    else:
        return llvm_intrinsic["llvm.x86.avx2.pmadd.ub.sw", SIMD[DType.int16, 2 * I32_WIDTH]](codes, x)


@always_inline
def widen_pair_sums(sums: SIMD[DType.int16, 2 * I32_WIDTH]) -> SIMD[DType.int32, I32_WIDTH]:
    """Pmaddwd against ones: lane i = sums[2i] + sums[2i + 1]."""
    return multiply_pair_sums(sums, SIMD[DType.int16, 2 * I32_WIDTH](1))


@always_inline
def multiply_pair_sums(sums: SIMD[DType.int16, 2 * I32_WIDTH], scales: SIMD[DType.int16, 2 * I32_WIDTH]) -> SIMD[DType.int32, I32_WIDTH]:
    """Pmaddwd: lane i = sums[2i] * scales[2i] + sums[2i + 1] * scales[2i + 1] (widen_pair_sums with weights)."""
    comptime if I32_WIDTH == 16:
        return llvm_intrinsic["llvm.x86.avx512.pmaddw.d.512", SIMD[DType.int32, I32_WIDTH]](sums, scales)
    else:
        return llvm_intrinsic["llvm.x86.avx2.pmadd.wd", SIMD[DType.int32, I32_WIDTH]](sums, scales)


@always_inline
def dot_quads(acc: SIMD[DType.int32, I32_WIDTH], codes: SIMD[DType.uint8, CODE_BYTES],
              x: SIMD[DType.int8, CODE_BYTES]) -> SIMD[DType.int32, I32_WIDTH]:
    """Acc[i] + the dot product of lane i's four codes with lane i's four activations."""
    comptime if int4_dot_kind() == DOT_VNNI:
        # LLVM declares both byte operands as <64 x i8> (the first is read unsigned, the second signed).
        return llvm_intrinsic["llvm.x86.avx512.vpdpbusd.512", SIMD[DType.int32, I32_WIDTH]](
            acc, rebind[SIMD[DType.uint8, 64]](codes), rebind[SIMD[DType.int8, 64]](x))
    else:
        var words = bitcast[DType.uint32, I32_WIDTH](codes)
        var xs = bitcast[DType.int32, I32_WIDTH](x)
        var out = acc
        comptime for i in range(4):
            var code = ((words >> UInt32(8 * i)) & 0xFF).cast[DType.int32]()
            var xi = (xs << Int32(24 - 8 * i)) >> 24  # byte i, sign-extended
            out += code * xi
        return out


# --- Activations: int8 per row per group of 32 -------------------------------------------------------------

@always_inline
def quantize_group[x_dtype: DType](
    x_ptr: Pointer[Scalar[x_dtype], ...], k_len: Int, row: Int, g: Int, padded_k: Int, rows: QuantizedRows,
):
    """Row `row`'s group g: its 32 codes (zero past K), its scale, the sum of its quantized values and the sums of
    its two halves' codes."""
    var start = g * INT4_GROUP
    var values: SIMD[DType.float32, INT4_GROUP]
    if start + INT4_GROUP <= k_len:
        values = widen(x_ptr.unsafe_load[width=INT4_GROUP](row * k_len + start))
    else:
        values = SIMD[DType.float32, INT4_GROUP](0)
        for i in range(k_len - start):
            values[i] = widen(x_ptr.unsafe_load(row * k_len + start + i))
    var amax = abs(values).reduce_max()
    var at = row * (padded_k // INT4_GROUP) + g
    var scale = amax / 127
    var inverse = Float32(127) / amax if amax > 0 else Float32(0)
    var rounded = llvm_intrinsic["llvm.roundeven", SIMD[DType.float32, INT4_GROUP]](values * inverse)
    var codes = max(min(rounded, 127), -127).cast[DType.int32]()
    var low_sum = codes.slice[16]().reduce_add()
    var high_sum = codes.slice[16, offset=16]().reduce_add()
    rows.scales.unsafe_store(at, scale)
    rows.sums.unsafe_store(at, scale * Float32(low_sum + high_sum))
    rows.codes.unsafe_store(row * padded_k + start, codes.cast[DType.int8]())
    rows.half_sums.unsafe_store(2 * at, low_sum)
    rows.half_sums.unsafe_store(2 * at + 1, high_sum)


@fieldwise_init
struct QuantizedRows(TrivialRegisterPassable):
    """A batch's activations as the low-bit ops read them, per row: int8 codes [rows, Kg], and per group of 32
    a float32 scale and the float32 sum of its quantized values, scale * sum of codes [rows, Kg / 32] (the 4-bit
    layouts' offsets meet it); per half group the sum of its codes [rows, Kg / 16] (the 6-bit layout's zero point
    meets it)."""

    var codes: MutPointer[Int8, MutUntrackedOrigin]
    var scales: MutPointer[Float32, MutUntrackedOrigin]
    var sums: MutPointer[Float32, MutUntrackedOrigin]
    var half_sums: MutPointer[Int32, MutUntrackedOrigin]


def with_quantized_rows[x_dtype: DType, BodyFn: def(QuantizedRows) raises -> None, //](
    x_ptr: Pointer[Scalar[x_dtype], ...], shape: LinearShape, body: BodyFn, ctx: DeviceContext,
) raises:
    """Quantizes every row (rows split across cores when many) and calls body with them."""
    var padded_k = int8_padded_k(shape.k, INT4_GROUP)
    var groups = padded_k // INT4_GROUP
    var codes = List[Int8](length=shape.rows * padded_k, fill=0)
    var scales = List[Float32](length=shape.rows * groups, fill=0)
    var sums = List[Float32](length=shape.rows * groups, fill=0)
    var half_sums = List[Int32](length=shape.rows * 2 * groups, fill=0)
    var quantized = QuantizedRows(rebind[MutPointer[Int8, MutUntrackedOrigin]](codes.unsafe_ptr()),
                                  rebind[MutPointer[Float32, MutUntrackedOrigin]](scales.unsafe_ptr()),
                                  rebind[MutPointer[Float32, MutUntrackedOrigin]](sums.unsafe_ptr()),
                                  rebind[MutPointer[Int32, MutUntrackedOrigin]](half_sums.unsafe_ptr()))

    def rows(first: Int, end: Int) raises {imm x_ptr, imm shape, imm quantized, imm padded_k, imm groups}:
        for row in range(first, end):
            for g in range(groups):
                quantize_group(x_ptr, shape.k, row, g, padded_k, quantized)

    parallel_ranges(shape.rows, tasks_for(shape.rows * shape.k), rows, ctx)
    body(quantized)
    _ = codes^
    _ = scales^
    _ = sums^
    _ = half_sums^


# --- The tile ---------------------------------------------------------------------------------------------

@always_inline
def broadcast_quad(xq: Pointer[Int8, ...], at: Int) -> SIMD[DType.int8, CODE_BYTES]:
    """Xq[at .. at + 3] repeated in every 32-bit lane (at is a multiple of 4)."""
    var word = xq.unsafe_bitcast[Int32]().unsafe_load(at // 4)
    return bitcast[DType.int8, CODE_BYTES](SIMD[DType.int32, I32_WIDTH](word))


@always_inline
def sub_scale_pairs[S: DType, //](scale_ptr: Pointer[Scalar[S], ...], at: Int) -> SIMD[DType.int16, 2 * I32_WIDTH]:
    """The I32_WIDTH integer sub-scales at `at` (uint8 or int8), each repeated in its channel's two 16-bit lanes:
    the second operand of pmaddwd against pmaddubsw's pair sums (block_sums with SCALED)."""
    var scales = scale_ptr.unsafe_load[width=I32_WIDTH](at)
    return scales.interleave(scales).cast[DType.int16]()


@always_inline
def scaled_int32(sums: SIMD[DType.int32, I32_WIDTH], scales: SIMD[DType.int16, 2 * I32_WIDTH]) -> SIMD[DType.int32, I32_WIDTH]:
    """Lane i of sums times channel i's sub-scale (sub_scale_pairs' layout): the paths without pmaddubsw."""
    var words = bitcast[DType.int32, I32_WIDTH](scales)
    return sums * ((words << 16) >> 16)


@always_inline
def block_sums[MR: Int, NP: Int, BLOCKS: Int, SIX_BITS: Bool, SCALED: Bool = False, ACCUMULATE: Bool = False](
    isum: MutPointer[Int32, ...], codes: Pointer[UInt8, ...], high_bits: Pointer[UInt8, ...], xq: Pointer[Int8, ...],
    panel: Int, panel_bytes: Int, high_panel_bytes: Int, padded_k: Int, row: Int, first_block: Int,
    sub_scales: Pointer[Int16, ...],
):
    """Isum[m, v] = the integer dot products over BLOCKS blocks of 8 inputs from `first_block` on, for the tile's
    MR rows and its NP panels' V vectors. Codes are the nibbles, or with SIX_BITS the nibbles with two more bits
    from the high plane (linear.mojo's header; BLOCKS even, first_block even). With SCALED, each channel's sum is
    multiplied by its integer sub-scale (sub_scales: vector v's at v * 2 * I32_WIDTH, as sub_scale_pairs makes
    them; exact in int32), by the pmaddwd that widens the pair sums anyway; with ACCUMULATE, isum += instead of =.
    Each value is used where it is made, so that LLVM keeps MR x V sums, and either the V unpacked code vectors of
    a block (V <= MR: rows inner) or the MR rows' broadcasts (rows outer), in registers; making the broadcasts
    inside a loop over the vectors let LLVM reuse them across vectors, keep them all live and spill."""
    comptime V = NP * VECTORS_PER_PANEL
    comptime MADDUBS = int4_dot_kind() == DOT_MADDUBS
    # pmaddubsw's 16-bit pair sums may add up before they are widened: 8 of 4-bit codes (each at most 2 * 15 * 127)
    # stay below 32767, but only 2 of 6-bit ones (2 * 63 * 127 each), so 6-bit codes widen after every block.
    comptime SIXTEEN_BITS = MADDUBS and not SIX_BITS
    comptime SUM_WIDTH = 2 * I32_WIDTH if SIXTEEN_BITS else I32_WIDTH
    comptime SumType = DType.int16 if SIXTEEN_BITS else DType.int32
    var sums = stack_allocation[MR * V * SUM_WIDTH, Scalar[SumType]]()
    comptime for i in range(MR * V):
        sums.unsafe_store(i * SUM_WIDTH, SIMD[SumType, SUM_WIDTH](0))
    var x_at = row * padded_k + first_block * 8

    @always_inline
    def accumulate(m: Int, v: Int, low: SIMD[DType.uint8, CODE_BYTES], high: SIMD[DType.uint8, CODE_BYTES],
                   x_low: SIMD[DType.int8, CODE_BYTES], x_high: SIMD[DType.int8, CODE_BYTES]) {imm sums, imm sub_scales}:
        var at = (m * V + v) * SUM_WIDTH
        comptime if MADDUBS:
            var pairs = pair_sums(low, x_low) + pair_sums(high, x_high)
            comptime if SIXTEEN_BITS:
                sums.unsafe_store(at, sums.unsafe_load[width=SUM_WIDTH](at) + rebind[SIMD[SumType, SUM_WIDTH]](pairs))
            else:
                var wide: SIMD[DType.int32, I32_WIDTH]
                comptime if SCALED:
                    wide = multiply_pair_sums(pairs, sub_scales.unsafe_load[width=2 * I32_WIDTH](v * 2 * I32_WIDTH))
                else:
                    wide = widen_pair_sums(pairs)
                sums.unsafe_store(at, sums.unsafe_load[width=SUM_WIDTH](at) + rebind[SIMD[SumType, SUM_WIDTH]](wide))
        else:
            var quads = dot_quads(dot_quads(rebind[SIMD[DType.int32, I32_WIDTH]](sums.unsafe_load[width=SUM_WIDTH](at)),
                                            low, x_low), high, x_high)
            sums.unsafe_store(at, rebind[SIMD[SumType, SUM_WIDTH]](quads))

    @always_inline
    def unpack(v: Int, block: Int, mut low: SIMD[DType.uint8, CODE_BYTES], mut high: SIMD[DType.uint8, CODE_BYTES]) {imm codes, imm high_bits, imm panel, imm panel_bytes, imm high_panel_bytes, imm first_block}:
        var lane = (v % VECTORS_PER_PANEL) * CODE_BYTES
        var b = first_block + block
        var packed = codes.unsafe_load[width=CODE_BYTES]((panel + v // VECTORS_PER_PANEL) * panel_bytes + b * BLOCK_BYTES
                                                         + lane)
        low = packed & 0x0F
        high = (packed >> 4) & 0x0F
        comptime if SIX_BITS:
            # one 64-byte vector per pair of blocks; byte 4j + i: bits 0-1 and 2-3 for the even block's codes
            # i and 4 + i, bits 4-5 and 6-7 for the odd block's
            var top = high_bits.unsafe_load[width=CODE_BYTES](
                (panel + v // VECTORS_PER_PANEL) * high_panel_bytes + (b // 2) * BLOCK_BYTES + lane)
            if block % 2 == 0:
                low |= (top << 4) & 0x30
                high |= (top << 2) & 0x30
            else:
                low |= top & 0x30
                high |= (top >> 2) & 0x30

    comptime for block in range(BLOCKS):
        var x_block = x_at + block * 8
        comptime if V <= MR:
            var lows = stack_allocation[V * CODE_BYTES, UInt8]()
            var highs = stack_allocation[V * CODE_BYTES, UInt8]()
            comptime for v in range(V):
                var low = SIMD[DType.uint8, CODE_BYTES](0)
                var high = SIMD[DType.uint8, CODE_BYTES](0)
                unpack(v, block, low, high)
                lows.unsafe_store(v * CODE_BYTES, low)
                highs.unsafe_store(v * CODE_BYTES, high)
            comptime for m in range(MR):
                var x_low = broadcast_quad(xq, x_block + m * padded_k)
                var x_high = broadcast_quad(xq, x_block + m * padded_k + 4)
                comptime for v in range(V):
                    accumulate(m, v, lows.unsafe_load[width=CODE_BYTES](v * CODE_BYTES),
                               highs.unsafe_load[width=CODE_BYTES](v * CODE_BYTES), x_low, x_high)
        else:
            var x_lows = stack_allocation[MR * CODE_BYTES, Int8]()
            var x_highs = stack_allocation[MR * CODE_BYTES, Int8]()
            comptime for m in range(MR):
                x_lows.unsafe_store(m * CODE_BYTES, broadcast_quad(xq, x_block + m * padded_k))
                x_highs.unsafe_store(m * CODE_BYTES, broadcast_quad(xq, x_block + m * padded_k + 4))
            comptime for v in range(V):
                var low = SIMD[DType.uint8, CODE_BYTES](0)
                var high = SIMD[DType.uint8, CODE_BYTES](0)
                unpack(v, block, low, high)
                comptime for m in range(MR):
                    accumulate(m, v, low, high, x_lows.unsafe_load[width=CODE_BYTES](m * CODE_BYTES),
                               x_highs.unsafe_load[width=CODE_BYTES](m * CODE_BYTES))
    comptime for i in range(MR * V):
        var partial = sums.unsafe_load[width=SUM_WIDTH](i * SUM_WIDTH)
        var total: SIMD[DType.int32, I32_WIDTH]
        comptime if SIXTEEN_BITS:
            var pairs = rebind[SIMD[DType.int16, 2 * I32_WIDTH]](partial)
            comptime if SCALED:
                total = multiply_pair_sums(pairs, sub_scales.unsafe_load[width=2 * I32_WIDTH]((i % V) * 2 * I32_WIDTH))
            else:
                total = widen_pair_sums(pairs)
        else:
            total = rebind[SIMD[DType.int32, I32_WIDTH]](partial)
            comptime if SCALED and not MADDUBS:  # with pmaddubsw the widening pmaddwd multiplied already
                total = scaled_int32(total, sub_scales.unsafe_load[width=2 * I32_WIDTH]((i % V) * 2 * I32_WIDTH))
        comptime if ACCUMULATE:
            total += isum.unsafe_load[width=I32_WIDTH](i * I32_WIDTH)
        isum.unsafe_store(i * I32_WIDTH, total)


@always_inline
def int4_tile[S: DType, //, out_dtype: DType, MR: Int, NP: Int, OFFSETS: Bool](
    out_ptr: MutPointer[Scalar[out_dtype], ...], rows: QuantizedRows, codes: Pointer[UInt8, ...],
    scale_ptr: Pointer[Scalar[S], ...], offset_ptr: Pointer[Scalar[S], ...], shape: LinearShape, row: Int, panel: Int,
):
    """MR rows x NP panels, group by group: integer sums, then one fold per group (the header's formula)."""
    comptime V = NP * VECTORS_PER_PANEL
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var isum = stack_allocation[MR * NP * PANEL, Int32]()
    zero_tile[MR, NP](acc)
    var padded_k = int8_padded_k(shape.k, INT4_GROUP)
    var groups = padded_k // INT4_GROUP
    var panel_bytes = int4_panel_bytes(shape.k)
    var xq = rebind[Pointer[Int8, ImmutAnyOrigin]](rows.codes)
    var no_high_bits = rebind[Pointer[UInt8, ImmutAnyOrigin]](codes)  # never read without SIX_BITS
    var no_sub_scales = rebind[Pointer[Int16, ImmutAnyOrigin]](codes)  # never read without SCALED
    for g in range(groups):
        block_sums[MR, NP, BLOCKS_PER_GROUP, False](isum, codes, no_high_bits, xq, panel, panel_bytes, 0, padded_k,
                                                    row, g * BLOCKS_PER_GROUP, no_sub_scales)
        comptime for v in range(V):
            var at = panel_vector_at(panel, groups, v, g)
            var scale = scale_ptr.unsafe_load[width=F32_WIDTH](at).cast[DType.float32]()
            var offset: SIMD[DType.float32, F32_WIDTH]
            comptime if OFFSETS:
                offset = offset_ptr.unsafe_load[width=F32_WIDTH](at).cast[DType.float32]()
            else:
                offset = scale * -Float32(INT4_ZERO_POINT)
            comptime for m in range(MR):
                var i = (m * V + v) * F32_WIDTH
                var row_group = (row + m) * groups + g
                var sums = isum.unsafe_load[width=I32_WIDTH](i).cast[DType.float32]()
                var folded = sums.fma(scale * rows.scales.unsafe_load(row_group), acc.unsafe_load[width=F32_WIDTH](i))
                acc.unsafe_store(i, offset.fma(SIMD[DType.float32, F32_WIDTH](rows.sums.unsafe_load(row_group)), folded))
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


@always_inline
def int4_k_tile[out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], rows: QuantizedRows, codes: Pointer[UInt8, ...],
    scale_ptr: Pointer[UInt8, ...], min_ptr: Pointer[UInt8, ...], block_ptr: Pointer[Float16, ...],
    block_min_ptr: Pointer[Float16, ...], shape: LinearShape, row: Int, panel: Int,
):
    """Int4_tile with GGUF Q4_K's two-level scales, W = q * (block_scale * scale) - block_min * min, folded block by
    block of 256 inputs: per group the integer sum times its 6-bit sub-scale (exact, in the pmaddwd that widens the
    pair sums) meets the row's activation scale, and the group's 6-bit min its quantized sum; the float16 block
    scale and min multiply the two sums once per block:
      acc += block_scale * (sum over g of float(scale[g] * isum[g]) * xs[g]) - block_min * (sum of min[g] * xsum[g])
    (every product of the two-level scales with the 6-bit values is exact in float32 either way)."""
    comptime V = NP * VECTORS_PER_PANEL
    comptime GROUPS_PER_BLOCK = INT4_K_BLOCK // INT4_GROUP
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var scaled = stack_allocation[MR * NP * PANEL, Float32]()
    var mins = stack_allocation[MR * NP * PANEL, Float32]()
    var isum = stack_allocation[MR * NP * PANEL, Int32]()
    var sub_scales = stack_allocation[V * 2 * I32_WIDTH, Int16]()
    zero_tile[MR, NP](acc)
    var padded_k = int8_padded_k(shape.k, INT4_GROUP)
    var groups = padded_k // INT4_GROUP
    var blocks = int4_k_blocks(shape.k)
    var panel_bytes = int4_panel_bytes(shape.k)
    var xq = rebind[Pointer[Int8, ImmutAnyOrigin]](rows.codes)
    var no_high_bits = rebind[Pointer[UInt8, ImmutAnyOrigin]](codes)  # never read without SIX_BITS
    var pairs = rebind[Pointer[Int16, ImmutAnyOrigin]](sub_scales)
    for block in range(blocks):
        zero_tile[MR, NP](scaled)
        zero_tile[MR, NP](mins)
        for g in range(block * GROUPS_PER_BLOCK, min(groups, (block + 1) * GROUPS_PER_BLOCK)):
            comptime for v in range(V):
                sub_scales.unsafe_store(v * 2 * I32_WIDTH, sub_scale_pairs(scale_ptr, panel_vector_at(panel, groups, v, g)))
            block_sums[MR, NP, BLOCKS_PER_GROUP, False, SCALED=True](
                isum, codes, no_high_bits, xq, panel, panel_bytes, 0, padded_k, row, g * BLOCKS_PER_GROUP, pairs)
            comptime for v in range(V):
                var group_min = min_ptr.unsafe_load[width=F32_WIDTH](panel_vector_at(panel, groups, v, g)).cast[DType.float32]()
                comptime for m in range(MR):
                    var i = (m * V + v) * F32_WIDTH
                    var row_group = (row + m) * groups + g
                    var sums = isum.unsafe_load[width=I32_WIDTH](i).cast[DType.float32]()
                    scaled.unsafe_store(i, sums.fma(rows.scales.unsafe_load(row_group), scaled.unsafe_load[width=F32_WIDTH](i)))
                    mins.unsafe_store(i, group_min.fma(rows.sums.unsafe_load(row_group), mins.unsafe_load[width=F32_WIDTH](i)))
        comptime for v in range(V):
            var block_at = panel_vector_at(panel, blocks, v, block)
            var block_scale = block_ptr.unsafe_load[width=F32_WIDTH](block_at).cast[DType.float32]()
            var block_min = block_min_ptr.unsafe_load[width=F32_WIDTH](block_at).cast[DType.float32]()
            comptime for m in range(MR):
                var i = (m * V + v) * F32_WIDTH
                var folded = block_scale.fma(scaled.unsafe_load[width=F32_WIDTH](i), acc.unsafe_load[width=F32_WIDTH](i))
                acc.unsafe_store(i, (-block_min).fma(mins.unsafe_load[width=F32_WIDTH](i), folded))
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


def linear_int4_k_cpu[x_dtype: DType, out_dtype: DType](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[Scalar[x_dtype], ...], codes: Pointer[UInt8, ...],
    scale_ptr: Pointer[UInt8, ...], min_ptr: Pointer[UInt8, ...], block_ptr: Pointer[Float16, ...],
    block_min_ptr: Pointer[Float16, ...], shape: LinearShape, ctx: DeviceContext,
) raises:
    """W = q * (block_scale * scale) - block_min * min (GGUF's Q4_K as stored)."""

    def run(rows: QuantizedRows) raises {imm out_ptr, imm codes, imm scale_ptr, imm min_ptr, imm block_ptr, imm block_min_ptr, imm shape, ref ctx}:
        def tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm rows, imm codes, imm scale_ptr, imm min_ptr, imm block_ptr, imm block_min_ptr, imm shape}:
            int4_k_tile[out_dtype, MR, NP](out_ptr, rows, codes, scale_ptr, min_ptr, block_ptr, block_min_ptr, shape,
                                           row, panel)

        for_each_tile[tile_rows_int4(), STREAMING_ROWS](shape, 1, tile, ctx)

    with_quantized_rows(x_ptr, shape, run, ctx)


def linear_int4_cpu[S: DType, //, x_dtype: DType, out_dtype: DType, OFFSETS: Bool](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[Scalar[x_dtype], ...],
    codes: Pointer[UInt8, ...], scale_ptr: Pointer[Scalar[S], ...], offset_ptr: Pointer[Scalar[S], ...],
    shape: LinearShape, ctx: DeviceContext,
) raises:
    """W = (q - 8) * scale, or q * scale + offset with OFFSETS (offset_ptr is not read without)."""

    def run(rows: QuantizedRows) raises {imm out_ptr, imm codes, imm scale_ptr, imm offset_ptr, imm shape, ref ctx}:
        def tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm rows, imm codes, imm scale_ptr, imm offset_ptr, imm shape}:
            int4_tile[out_dtype, MR, NP, OFFSETS](out_ptr, rows, codes, scale_ptr, offset_ptr, shape, row, panel)

        for_each_tile[tile_rows_int4(), STREAMING_ROWS](shape, 1, tile, ctx)

    with_quantized_rows(x_ptr, shape, run, ctx)
