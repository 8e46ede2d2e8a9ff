# Mojo unit tests of the float32 -> bfloat16 narrowing (run by tests/kernels/test_mojo_unit.py via `mojo run`).
#
# The reference is `reference_bf16_bits` below: round to nearest even written out in integer arithmetic on the
# float32 bits, so it means the same thing on every CPU. (Mojo's built-in cast is NOT a usable reference: on CPUs
# with AVX512_BF16 it compiles to vcvtneps2bf16, which flushes subnormal inputs and outputs to zero, while
# elsewhere it keeps them. MILI keeps them, as torch does.) The reference itself is pinned by hand-computed
# bit patterns in `test_reference_on_hand_computed_values`.
#
# Random patterns: the seed is printed; rerun with MILI_TEST_SEED=<seed> to replay a failure.
from std.testing import assert_equal, assert_true, TestSuite
from std.memory import bitcast
from std.math import isnan
from std.os import getenv
from std.random import random_ui64, seed
from mojo_kernels.convert import narrow, widen, round_to


def reference_bf16_bits(f32_bits: UInt32) -> UInt16:
    """The bfloat16 nearest to the float32 with these bits, ties to even; NaN -> quiet NaN.

    bfloat16 is float32 with the low 16 mantissa bits cut off: same sign bit, same 8-bit exponent and bias, same
    subnormals. So the float32 values bfloat16 can hold are exactly those whose low 16 bits are zero, and for a
    finite magnitude m the two candidates are (m >> 16) and (m >> 16) + 1 (as bfloat16 bit patterns). Between
    them float32 values are evenly spaced (the cut-off bits are mantissa bits of one binade, or subnormal
    bits, which continue the spacing of the first normal binade), so the value halfway between them has low
    16 bits 0x8000. Incrementing the kept part carries into the exponent when the mantissa overflows, and past
    the largest finite bfloat16 (0x7F7F) lands on 0x7F80 = infinity, which is what IEEE 754 round-to-nearest-
    even gives there too (|x| >= max + half an ulp overflows).
    NaN: sign and the top 7 payload bits kept, quiet bit (0x0040) set, so a signalling NaN whose payload lies
    only in the low bits still comes out NaN, not infinity. (torch writes 0x7FC0 or 0xFFFF for every NaN;
    MILI, like the vcvtneps2bf16 instruction, keeps the sign and top payload bits.)
    """
    var sign = f32_bits & 0x8000_0000
    var magnitude = f32_bits & 0x7FFF_FFFF
    if magnitude > 0x7F80_0000:  # NaN
        return UInt16((f32_bits >> 16) | 0x0040)
    if magnitude == 0x7F80_0000:  # +-infinity
        return UInt16(f32_bits >> 16)
    var kept = magnitude >> 16  # truncated toward zero
    var dropped = magnitude & 0xFFFF  # what was cut off, in units of 2^-16 of the kept part's last place
    if dropped > 0x8000 or (dropped == 0x8000 and (kept & 1) == 1):
        kept += 1
    return UInt16((sign >> 16) | kept)


def _f32(bits: UInt32) -> Float32:
    return bitcast[DType.float32, 1](bits)


def _bits16(v: BFloat16) -> UInt16:
    return bitcast[DType.uint16, 1](v)


def _bits32(v: Float32) -> UInt32:
    return bitcast[DType.uint32, 1](v)


def _describe(f32_bits: UInt32) -> String:
    return String("float32 bits ", hex(f32_bits), " (", _f32(f32_bits), ")")


def _check_scalar(f32_bits: UInt32) raises:
    """Scalar narrow, widen(narrow) and round_to against the reference, bit for bit."""
    var expected = reference_bf16_bits(f32_bits)
    var value = _f32(f32_bits)
    var ours = narrow[DType.bfloat16](value)
    if _bits16(ours) != expected:
        raise Error(_describe(f32_bits), ": narrow gave ", hex(_bits16(ours)), ", reference ", hex(expected))
    var widened = UInt32(expected) << 16
    if _bits32(widen(ours)) != widened or _bits32(round_to[DType.bfloat16](value)) != widened:
        raise Error(_describe(f32_bits), ": widen/round_to gave ", hex(_bits32(widen(ours))), " / ",
                    hex(_bits32(round_to[DType.bfloat16](value))), ", expected ", hex(widened))


def _check_width[w: Int](patterns: List[UInt32]) raises:
    """narrow on SIMD vectors of w lanes; every pattern goes through once, the last vector wraps around."""
    var n = len(patterns)
    for start in range(0, n, w):
        var bits = SIMD[DType.uint32, w](0)
        for lane in range(w):
            bits[lane] = patterns[(start + lane) % n]
        var narrowed = bitcast[DType.uint16, w](narrow[DType.bfloat16](bitcast[DType.float32, w](bits)))
        for lane in range(w):
            var expected = reference_bf16_bits(bits[lane])
            if narrowed[lane] != expected:
                raise Error(_describe(bits[lane]), " in lane ", lane, " of a ", w, "-wide vector: narrow gave ",
                            hex(narrowed[lane]), ", reference ", hex(expected))


def _check_all(patterns: List[UInt32]) raises:
    for p in patterns:
        _check_scalar(p)
    _check_width[2](patterns)
    _check_width[4](patterns)
    _check_width[8](patterns)
    _check_width[16](patterns)
    _check_width[32](patterns)
    _check_width[64](patterns)


def _pin(f32_bits: UInt32, expected: UInt16) raises:
    assert_equal(reference_bf16_bits(f32_bits), expected, _describe(f32_bits))


def test_reference_on_hand_computed_values() raises:
    """Pins the reference itself: each expected result worked out by hand from the bit patterns."""
    # The hex patterns really are the values named (decimal literals parse identically everywhere).
    assert_equal(_bits32(Float32(1.00390625)), 0x3F80_8000)  # 1 + 2^-8
    assert_equal(_bits32(Float32(4.445332e-39)), 0x0030_67C7)
    assert_equal(_bits32(Float32(1e-40)), 0x0001_16C2)
    assert_equal(_bits32(Float32(3.3895314e38)), 0x7F7F_0000)  # largest finite bfloat16
    _pin(0x3F80_0000, 0x3F80)  # 1.0, exact
    _pin(0x3F80_8000, 0x3F80)  # 1 + 2^-8: tie, kept part even (0x3F80) -> down
    _pin(0x3F81_8000, 0x3F82)  # 1 + 3 * 2^-8: tie, kept part odd (0x3F81) -> up to even
    _pin(0x3F80_8001, 0x3F81)  # just above the tie -> up
    _pin(0x3F80_7FFF, 0x3F80)  # just below the tie -> down
    _pin(0xBF80_8000, 0xBF80)  # -(1 + 2^-8): ties are symmetric
    _pin(0x3FFF_FFFF, 0x4000)  # mantissa overflow carries into the exponent: 1.99999988 -> 2.0
    _pin(0x0030_67C7, 0x0030)  # 4.445332e-39 (subnormal): kept 0x0030, dropped 0x67C7 < half -> down, NOT 0
    _pin(0x0001_16C2, 0x0001)  # 1e-40 (subnormal) -> smallest bfloat16 subnormal 2^-133, NOT 0
    _pin(0x0030_FFFF, 0x0031)  # subnormal rounding up
    _pin(0x0000_0001, 0x0000)  # smallest float32 subnormal 2^-149: far below half of 2^-133 -> +0
    _pin(0x0000_8000, 0x0000)  # exactly half of 2^-133: tie, kept 0 even -> +0
    _pin(0x0000_8001, 0x0001)  # just above that half -> 2^-133
    _pin(0x0001_8000, 0x0002)  # tie between subnormals 1 and 2 -> even (2)
    _pin(0x8001_8000, 0x8002)  # the same, negative
    _pin(0x8000_FFFF, 0x8001)  # negative subnormal rounding (in magnitude) up
    _pin(0x007F_7FFF, 0x007F)  # below the tie under the smallest normal: stays the largest bf16 subnormal
    _pin(0x007F_8000, 0x0080)  # tie, kept 0x7F odd -> up into the normal range (2^-126)
    _pin(0x007F_FFFF, 0x0080)  # largest float32 subnormal -> smallest normal 2^-126
    _pin(0x7F7F_0000, 0x7F7F)  # largest finite bfloat16, exact
    _pin(0x7F7F_7FFF, 0x7F7F)  # below max + half ulp -> max
    _pin(0x7F7F_8000, 0x7F80)  # max + half ulp: tie, kept 0x7F7F odd -> up = +inf
    _pin(0x7F7F_FFFF, 0x7F80)  # largest finite float32 -> +inf
    _pin(0xFF7F_FFFF, 0xFF80)  # -> -inf
    _pin(0x0000_0000, 0x0000)  # +0
    _pin(0x8000_0000, 0x8000)  # -0 keeps its sign
    _pin(0x7F80_0000, 0x7F80)  # +inf
    _pin(0xFF80_0000, 0xFF80)  # -inf
    _pin(0x7FC0_0000, 0x7FC0)  # the canonical quiet NaN
    _pin(0xFFC0_0000, 0xFFC0)  # negative quiet NaN keeps its sign
    _pin(0x7F80_0001, 0x7FC0)  # signalling NaN, payload only in the low bits: quiet NaN, not inf
    _pin(0xFF80_0001, 0xFFC0)  # the same, negative
    _pin(0x7FBF_FFFF, 0x7FFF)  # NaN whose rounding would carry: top payload kept, quiet bit set, no carry
    _pin(0x7FFF_FFFF, 0x7FFF)  # NaN with every bit set: must not carry into the sign


def test_hand_computed_and_special_values() raises:
    """MILI's narrow on the patterns above (and their negations), scalar and every vector width."""
    var patterns: List[UInt32] = [
        0x3F80_0000, 0x3F80_8000, 0x3F81_8000, 0x3F80_8001, 0x3F80_7FFF, 0x3FFF_FFFF, 0x0030_67C7, 0x0001_16C2,
        0x0030_FFFF, 0x0000_0001, 0x0000_8000, 0x0000_8001, 0x0001_8000, 0x0000_FFFF, 0x007F_7FFF, 0x007F_8000,
        0x007F_FFFF, 0x0080_0000, 0x7F7F_0000, 0x7F7F_7FFF, 0x7F7F_8000, 0x7F7F_FFFF, 0x0000_0000, 0x7F80_0000,
        0x7FC0_0000, 0x7F80_0001, 0x7FBF_FFFF, 0x7FFF_FFFF, 0x7FC0_0001,
    ]
    for i in range(len(patterns)):
        patterns.append(patterns[i] | 0x8000_0000)
    _check_all(patterns)
    # Sanity on the NaN results, independent of the reference: NaN in, NaN out.
    for p in patterns:
        if isnan(_f32(p)):
            assert_true(isnan(widen(narrow[DType.bfloat16](_f32(p)))), _describe(p))


def test_every_bfloat16_neighbourhood() raises:
    """For every one of the 65536 bfloat16 patterns b (all subnormals, both zeros, max, inf and the NaNs
    included): the float32 values at b itself, one float32 ulp above, just below / at / just above the tie with
    the next bfloat16, and just below the next bfloat16."""
    var patterns = List[UInt32](capacity=65536 * 7)
    for b in range(65536):
        var base = UInt32(b) << 16
        for low in [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF]:
            patterns.append(base | UInt32(low))
    _check_all(patterns)


def test_random_bit_patterns() raises:
    """Uniformly random float32 bit patterns, plus random subnormals and random ties (uniform patterns hit
    subnormals only 1 time in 256 and exact ties 1 in 65536). Replay with MILI_TEST_SEED=<printed seed>."""
    var from_env = getenv("MILI_TEST_SEED")
    var run_seed: Int
    if from_env:
        run_seed = atol(from_env)
    else:
        seed()  # from the clock
        run_seed = Int(random_ui64(0, 0x7FFF_FFFF))
    print("test_random_bit_patterns: seed ", run_seed, " (replay with MILI_TEST_SEED=", run_seed, ")", sep="")
    seed(run_seed)
    var patterns = List[UInt32](capacity=300000)
    for _ in range(200000):
        patterns.append(UInt32(random_ui64(0, 0xFFFF_FFFF)))
    for _ in range(50000):  # subnormals of either sign
        patterns.append(UInt32(random_ui64(0, 0x007F_FFFF)) | (UInt32(random_ui64(0, 1)) << 31))
    for _ in range(50000):  # exact ties anywhere
        patterns.append((UInt32(random_ui64(0, 0xFFFF)) << 16) | 0x8000)
    _check_all(patterns)


def main() raises:
    TestSuite.discover_tests[__functions_in_module()]().run()
