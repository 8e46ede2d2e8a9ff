# The packed weight layouts of MILI's linear op (the header of linear.mojo describes them) and the
# element-wise readers every path shares.
from std.math import ceildiv
from std.sys.intrinsics import llvm_intrinsic
from .convert import widen

comptime PANEL = 16

@fieldwise_init
struct LinearShape(TrivialRegisterPassable):
    var rows: Int  # M
    var k: Int  # K, input features
    var n: Int  # N, output features

    @always_inline
    def panels(self) -> Int:
        return ceildiv(self.n, PANEL)


@always_inline
def bf16_panel_stride(k: Int) -> Int:
    """Elements of one bf16 panel: K2 pairs of 16 channels x 2."""
    return ceildiv(k, 2) * 2 * PANEL


@always_inline
def int8_padded_k(k: Int, group: Int) -> Int:
    return ceildiv(k, group) * group



@always_inline
def packed_bf16_weight(w_ptr: Pointer[BFloat16, ...], k_len: Int, n: Int, k: Int) -> Float32:
    """W[n, k] from the bf16 panel layout."""
    return widen(w_ptr.unsafe_load(((n // PANEL) * ceildiv(k_len, 2) + k // 2) * 2 * PANEL + (n % PANEL) * 2 + k % 2))


@always_inline
def packed_int8_q(q_ptr: Pointer[Int8, ...], padded_k: Int, n: Int, k: Int) -> Float32:
    """Q[n, k] (unscaled) from the int8 panel layout."""
    return q_ptr.unsafe_load(((n // PANEL) * padded_k + k) * PANEL + n % PANEL).cast[DType.float32]()


@always_inline
def packed_int8_scale[S: DType, //, group: Int](scale_ptr: Pointer[Scalar[S], ...], padded_k: Int, n: Int, g: Int) -> Float32:
    """The scale (or the offset: same layout) of channel n's group g."""
    return scale_ptr.unsafe_load(((n // PANEL) * (padded_k // group) + g) * PANEL + n % PANEL).cast[DType.float32]()


@always_inline
def packed_int8_weight[S: DType, //, group: Int](q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Scalar[S], ...],
                                                 k_len: Int, n: Int, k: Int) -> Float32:
    """W[n, k] = q * scale from the int8 panel layout."""
    var padded_k = int8_padded_k(k_len, group)
    return packed_int8_q(q_ptr, padded_k, n, k) * packed_int8_scale[group](scale_ptr, padded_k, n, k // group)


@always_inline
def separately_rounded[w: SIMDLength, //](v: SIMD[DType.float32, w]) -> SIMD[DType.float32, w]:
    """V as computed, never fused with the operation that uses it: LLVM would contract q * scale + offset into one
    FMA (one rounding: other bits than gguf-py's two)."""
    return llvm_intrinsic["llvm.arithmetic.fence", SIMD[DType.float32, w]](v)


@always_inline
def exact_int8_weights[w: SIMDLength, //, OFFSETS: Bool](
    q: SIMD[DType.int8, w], scale: SIMD[DType.float32, w], offset: SIMD[DType.float32, w]
) -> SIMD[DType.float32, w]:
    """W = q * scale (+ offset), rounded after the multiply and after the add, as gguf-py dequantizes."""
    var scaled = separately_rounded(q.cast[DType.float32]() * scale)
    comptime if OFFSETS:
        return scaled + offset
    else:
        return scaled


@always_inline
def packed_int8_offset_weight[S: DType, //, group: Int](
    q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Scalar[S], ...], offset_ptr: Pointer[Float32, ...], k_len: Int, n: Int,
    k: Int,
) -> Float32:
    """W[n, k] = q * scale + offset from the int8 panel layout with offsets (exact_int8_weights)."""
    var padded_k = int8_padded_k(k_len, group)
    var at = ((n // PANEL) * padded_k + k) * PANEL + n % PANEL
    return exact_int8_weights[True](q_ptr.unsafe_load(at), packed_int8_scale[group](scale_ptr, padded_k, n, k // group),
                                    packed_int8_scale[group](offset_ptr, padded_k, n, k // group))


@always_inline
def packed_float_weight[E: DType, //](w_ptr: Pointer[Scalar[E], ...], k_len: Int, n: Int, k: Int) -> Float32:
    """W[n, k] from the k-major float panel layout (float16 widened exactly)."""
    return w_ptr.unsafe_load(((n // PANEL) * k_len + k) * PANEL + n % PANEL).cast[DType.float32]()


# --- The 4-bit layout (linear.mojo's header) ---------------------------------------------------------------

comptime INT4_GROUP = 32  # inputs per scale, and per activation scale
comptime INT4_ZERO_POINT = 8  # without stored offsets, W = (q - 8) * scale
comptime INT4_K_BLOCK = 256  # GGUF Q4_K's super-block: one float16 scale and min per 256 inputs


@always_inline
def int4_k_blocks(k: Int) -> Int:
    """Q4_K block scales (and mins) per channel: ceil(Kg / 256)."""
    return ceildiv(int8_padded_k(k, INT4_GROUP), INT4_K_BLOCK)


@always_inline
def int4_panel_bytes(k: Int) -> Int:
    """Bytes of one panel's codes: K rounded up to 32, two codes a byte, 16 channels."""
    return int8_padded_k(k, INT4_GROUP) // 2 * PANEL


@always_inline
def packed_int4_code(codes: Pointer[UInt8, ...], k_len: Int, n: Int, k: Int) -> Float32:
    """Q[n, k] (the unsigned 4-bit code) from the 4-bit panel layout."""
    var at = (n // PANEL) * int4_panel_bytes(k_len) + (k // 8) * 4 * PANEL + (n % PANEL) * 4 + k % 4
    var byte = codes.unsafe_load(at)
    return ((byte >> 4) if k % 8 >= 4 else (byte & 0x0F)).cast[DType.float32]()


@always_inline
def packed_int4_weight[S: DType, //, OFFSETS: Bool](
    codes: Pointer[UInt8, ...], scale_ptr: Pointer[Scalar[S], ...], offset_ptr: Pointer[Scalar[S], ...], k_len: Int,
    n: Int, k: Int,
) -> Float32:
    """W[n, k] as gguf-py dequantizes it: (q - 8) * scale (one rounding), or q * scale + offset (two)."""
    var padded_k = int8_padded_k(k_len, INT4_GROUP)
    var q = packed_int4_code(codes, k_len, n, k)
    var scale = packed_int8_scale[INT4_GROUP](scale_ptr, padded_k, n, k // INT4_GROUP)
    comptime if OFFSETS:
        return separately_rounded(SIMD[DType.float32, 1](q * scale))[0] + packed_int8_scale[INT4_GROUP](
            offset_ptr, padded_k, n, k // INT4_GROUP)
    else:
        return (q - Float32(INT4_ZERO_POINT)) * scale


# --- The 6-bit layout (GGUF's Q6_K; linear.mojo's header) --------------------------------------------------

comptime INT6_SUBGROUP = 16  # inputs per int8 sub-scale
comptime INT6_BLOCK = 256  # inputs per float16 block scale
comptime INT6_ZERO_POINT = 32  # W = (q - 32) * block_scale * scale


@always_inline
def int6_high_panel_bytes(k: Int) -> Int:
    """Bytes of one panel's high bits: K rounded up to 32, four 2-bit fields a byte, 16 channels."""
    return int8_padded_k(k, INT4_GROUP) // 4 * PANEL


@always_inline
def int6_blocks(k: Int) -> Int:
    """Block scales per channel: ceil(Kg / 256)."""
    return ceildiv(int8_padded_k(k, INT4_GROUP), INT6_BLOCK)


@always_inline
def packed_int6_code(codes: Pointer[UInt8, ...], high_bits: Pointer[UInt8, ...], k_len: Int, n: Int, k: Int) -> Int:
    """Q[n, k] (0..63): the 4-bit layout's nibble, and two bits from the high plane's 64-byte vector of its pair of
    blocks (byte 4j + i: bits 0-1 and 2-3 for the even block's inputs i and 4 + i, bits 4-5 and 6-7 for the odd
    block's)."""
    var nibble = Int(packed_int4_code(codes, k_len, n, k))
    var at = (n // PANEL) * int6_high_panel_bytes(k_len) + (k // 16) * 4 * PANEL + (n % PANEL) * 4 + k % 4
    var shift = 2 * (2 * ((k // 8) % 2) + (1 if k % 8 >= 4 else 0))
    return nibble | (Int((high_bits.unsafe_load(at) >> UInt8(shift)) & 3) << 4)


@always_inline
def packed_int6_scale(scale_ptr: Pointer[Int8, ...], block_ptr: Pointer[Float16, ...], k_len: Int, n: Int,
                      k: Int) -> Float32:
    """Block_scale[n, k // 256] * scale[n, k // 16], exact in float32 (11 significant bits times 8)."""
    var subgroups = int8_padded_k(k_len, INT4_GROUP) // INT6_SUBGROUP
    var scale = scale_ptr.unsafe_load(((n // PANEL) * subgroups + k // INT6_SUBGROUP) * PANEL + n % PANEL)
    var block = block_ptr.unsafe_load(((n // PANEL) * int6_blocks(k_len) + k // INT6_BLOCK) * PANEL + n % PANEL)
    return block.cast[DType.float32]() * scale.cast[DType.float32]()


@always_inline
def packed_int6_weight(codes: Pointer[UInt8, ...], high_bits: Pointer[UInt8, ...], scale_ptr: Pointer[Int8, ...],
                       block_ptr: Pointer[Float16, ...], k_len: Int, n: Int, k: Int) -> Float32:
    """W[n, k] as gguf-py dequantizes Q6_K: (block_scale * scale) * (q - 32), each product rounded once."""
    var q = packed_int6_code(codes, high_bits, k_len, n, k) - INT6_ZERO_POINT
    return packed_int6_scale(scale_ptr, block_ptr, k_len, n, k) * Float32(q)



@always_inline
def packed_int4_k_weight(codes: Pointer[UInt8, ...], scale_ptr: Pointer[UInt8, ...], min_ptr: Pointer[UInt8, ...],
                         block_ptr: Pointer[Float16, ...], block_min_ptr: Pointer[Float16, ...], k_len: Int, n: Int,
                         k: Int) -> Float32:
    """W[n, k] as gguf-py dequantizes Q4_K: (block_scale * scale) * q - (block_min * min), each step rounded."""
    var groups = int8_padded_k(k_len, INT4_GROUP) // INT4_GROUP
    var at = ((n // PANEL) * groups + k // INT4_GROUP) * PANEL + n % PANEL
    var block_at = ((n // PANEL) * int4_k_blocks(k_len) + k // INT4_K_BLOCK) * PANEL + n % PANEL
    var scale = block_ptr.unsafe_load(block_at).cast[DType.float32]() * scale_ptr.unsafe_load(at).cast[DType.float32]()
    var offset = block_min_ptr.unsafe_load(block_at).cast[DType.float32]() * min_ptr.unsafe_load(at).cast[
        DType.float32]()
    return separately_rounded(SIMD[DType.float32, 1](packed_int4_code(codes, k_len, n, k) * scale))[0] - offset
