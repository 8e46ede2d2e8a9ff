# Mojo unit tests of the float32 -> bfloat16 narrowing (run by tests/kernels/test_mojo_unit.py via `mojo run`):
# the integer-SIMD path must round exactly like Mojo's own cast, ties, subnormals, infinities and NaN included.
from std.testing import assert_equal, assert_true, TestSuite
from std.memory import bitcast
from std.math import isnan, inf, nan
from std.random import random_ui64, seed
from mojo_kernels.convert import narrow, widen, round_to


def _bits(v: BFloat16) -> UInt16:
    return bitcast[DType.uint16, 1](v)


def _check_same_as_cast(value: Float32) raises:
    var ours = narrow[DType.bfloat16](value)
    var reference = value.cast[DType.bfloat16]()
    assert_equal(_bits(ours), _bits(reference), String("narrowing ", value))
    assert_equal(widen(ours), round_to[DType.bfloat16](value))


def test_random_bit_patterns() raises:
    seed()  # fresh patterns every run
    for _ in range(200000):
        var value = bitcast[DType.float32, 1](UInt32(random_ui64(0, 0xFFFFFFFF)))
        if not isnan(value):
            _check_same_as_cast(value)


def test_ties_round_to_even() raises:
    # 1 + 2^-8 lies halfway between two bfloat16 values; so does 1 + 3 * 2^-8.
    _check_same_as_cast(Float32(1.00390625))
    _check_same_as_cast(Float32(1.01171875))
    _check_same_as_cast(Float32(-1.00390625))


def test_specials() raises:
    for value in [Float32(0), Float32(-0.0), inf[DType.float32](), -inf[DType.float32](), Float32(1e-40),
                  Float32(3.3895314e38)]:
        _check_same_as_cast(value)
    assert_true(isnan(widen(narrow[DType.bfloat16](nan[DType.float32]()))))


def test_vector_matches_scalar() raises:
    var v = SIMD[DType.float32, 16](0)
    for i in range(16):
        v[i] = Float32(i) * 0.3331 - 2.5
    var narrowed = narrow[DType.bfloat16](v)
    for i in range(16):
        assert_equal(_bits(narrowed[i]), _bits(v[i].cast[DType.bfloat16]()))


def main() raises:
    TestSuite.discover_tests[__functions_in_module()]().run()
