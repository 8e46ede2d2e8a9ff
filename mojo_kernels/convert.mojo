# Float32 <-> storage dtype conversions used by every kernel (compute is float32; storage float32 or
# bfloat16).
#
# float32 -> bfloat16 on the CPU (`narrow`) is plain integer SIMD, so it gives the same bits on every CPU
# whatever conversion instructions it has (the code generated for znver4 and sapphirerapids was checked: integer
# ops only, no vcvtneps2bf16). Guaranteed:
#   - round to nearest, ties to even, on the float32 bit pattern (bfloat16 = float32's upper 16 bits);
#   - subnormal inputs are rounded like any other value, and subnormal results are kept: nothing is flushed
#     to zero (e.g. 1e-40 -> 2^-133, the smallest bfloat16 subnormal; the largest float32 subnormal rounds up
#     to the smallest normal 2^-126);
#   - +-0 keep their sign; +-inf stay +-inf; finite values from max + half an ulp (0x7F7F8000) up become +-inf;
#   - NaN stays NaN: sign and the top 7 payload bits kept, quiet bit set ((bits >> 16) | 0x0040), so a
#     signalling NaN never turns into infinity.
# This is torch's `.to(torch.bfloat16)` bit for bit except for NaN payloads (torch writes 0x7FC0 or 0xFFFF),
# and the same as mili.dtypes.f32_to_bf16_bits on the host. tests/kernels/mojo/test_convert.mojo checks it
# against an explicit definition on every bfloat16's neighbourhood; tests/kernels/test_bf16_narrowing.py
# checks a compiled op against torch.
# Why not Mojo's built-in cast: on x86 CPUs without AVX512_BF16 it is scalarised (~1.6 ns per element here,
# ten times the cost of the arithmetic around it), and on CPUs with AVX512_BF16 it becomes vcvtneps2bf16,
# which flushes subnormal inputs and outputs to zero, so its results would depend on the CPU.
# GPUs convert natively, so they keep the cast; the guarantees above are the CPU path's (the GPU path's
# handling of subnormals is the hardware's and is not tested here).
from std.memory import bitcast
from std.math import isnan
from std.sys import is_gpu


@always_inline
def narrow[w: SIMDLength, //, dtype: DType](v: SIMD[DType.float32, w]) -> SIMD[dtype, w]:
    """Float32 -> dtype, rounding to nearest even (bfloat16 on the CPU: see the guarantees at the top)."""
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
