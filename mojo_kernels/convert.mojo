# Float32 <-> storage dtype conversions used by every kernel (compute is float32; storage float32 or
# bfloat16). Mojo's built-in float32 -> bfloat16 cast is scalarised on x86 (~1.6 ns per element here,
# ten times the cost of the arithmetic around it), so on the CPU bfloat16 is narrowed with integer SIMD:
# round to nearest even on the upper 16 bits, NaN kept quiet. Results are bit-identical to the cast.
# GPUs convert natively, so they keep the cast.
from std.memory import bitcast
from std.math import isnan
from std.sys import is_gpu


@always_inline
def narrow[w: SIMDLength, //, dtype: DType](v: SIMD[DType.float32, w]) -> SIMD[dtype, w]:
    """Float32 -> dtype, rounding to nearest even."""
    comptime if dtype == DType.bfloat16 and not is_gpu():
        var bits = bitcast[DType.uint32, w](v)
        var rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        var halves = isnan(v).select((bits >> 16) | 0x40, rounded).cast[DType.uint16]()
        return rebind[SIMD[dtype, w]](bitcast[DType.bfloat16, w](halves))
    else:
        return v.cast[dtype]()


@always_inline
def widen[dtype: DType, w: SIMDLength, //](v: SIMD[dtype, w]) -> SIMD[DType.float32, w]:
    """Converts dtype -> float32 (exact for float32 and bfloat16)."""
    return v.cast[DType.float32]()


@always_inline
def round_to[w: SIMDLength, //, dtype: DType](v: SIMD[DType.float32, w]) -> SIMD[DType.float32, w]:
    """Returns v rounded to dtype's precision, kept in float32 (like transformers' `.to(dtype)` mid-expression)."""
    comptime if dtype == DType.float32:
        return v
    else:
        return widen(narrow[dtype](v))
