# The packed weight layouts of MILI's linear op (the header of linear.mojo describes them) and the
# element-wise readers every path shares.
from std.math import ceildiv
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
def packed_int8_scale[group: Int](scale_ptr: Pointer[Float16, ...], padded_k: Int, n: Int, g: Int) -> Float32:
    """The scale of channel n's group g."""
    return scale_ptr.unsafe_load(((n // PANEL) * (padded_k // group) + g) * PANEL + n % PANEL).cast[DType.float32]()


@always_inline
def packed_int8_weight[group: Int](q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Float16, ...], k_len: Int, n: Int,
                                   k: Int) -> Float32:
    """W[n, k] = q * scale from the int8 panel layout."""
    var padded_k = int8_padded_k(k_len, group)
    return packed_int8_q(q_ptr, padded_k, n, k) * packed_int8_scale[group](scale_ptr, padded_k, n, k // group)
