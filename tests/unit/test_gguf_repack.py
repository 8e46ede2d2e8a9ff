"""GGUF quantized tensors repacked as grouped int8 codes (mili/gguf/repack.py) dequantize to gguf-py's own
dequantization in every bit, for every type, shape, regrouping and mix of types joined along N."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from mili.gguf import repack
from mili.gguf.repack import QUANTIZED_TYPES, GroupedCodes, grouped_codes, join_rows
from tests.gguf_blocks import FLOAT, random_blocks

T = GGMLQuantizationType

# Per type: the codes' range, the group, whether there are offsets.
EXPECTED = {
    T.Q8_0: ((-128, 127), 32, False),
    T.Q4_0: ((-8, 7), 32, False),
    T.Q5_0: ((-16, 15), 32, False),
    T.Q4_1: ((0, 15), 32, True),
    T.Q5_1: ((0, 31), 32, True),
    T.Q4_K: ((0, 15), 32, True),
    T.Q5_K: ((0, 31), 32, True),
    T.Q6_K: ((-32, 31), 16, False),
}
TYPES = sorted(EXPECTED, key=lambda t: t.name)
# [rows, blocks per row]: one row, rows not a multiple of 16, several blocks per row.
SHAPES = [(1, 1), (37, 3), (16, 2), (5, 4)]


def bits(w: np.ndarray) -> np.ndarray:
    assert w.dtype == np.float32
    return w.view(np.uint32)


def cols_of(tensor_type: GGMLQuantizationType, blocks: int) -> int:
    return GGML_QUANT_SIZES[tensor_type][0] * blocks


def test_the_types_are_the_eight_expected():
    assert QUANTIZED_TYPES == frozenset(EXPECTED)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}blocks")
@pytest.mark.parametrize("tensor_type", TYPES, ids=lambda t: t.name)
def test_repacking_is_bit_for_bit_gguf_dequantize(tensor_type, shape, rng):
    rows, cols = shape[0], cols_of(tensor_type, shape[1])
    raw = random_blocks(tensor_type, rows, cols, rng)
    codes = grouped_codes(tensor_type, raw, rows, cols)
    (low, high), group, has_offsets = EXPECTED[tensor_type]
    assert codes.q.dtype == np.int8 and codes.q.shape == (rows, cols)
    assert codes.group == group
    assert codes.scales.dtype == np.float32 and codes.scales.shape == (rows, cols // group)
    assert (codes.offsets is not None) == has_offsets
    assert low <= codes.q.min() and codes.q.max() <= high
    expected = dequantize(raw, tensor_type)
    np.testing.assert_array_equal(bits(codes.dequantize()), bits(expected))
    # The flat bytes are read the same.
    np.testing.assert_array_equal(bits(grouped_codes(tensor_type, raw.ravel(), rows, cols).dequantize()),
                                  bits(expected))


@pytest.mark.parametrize("tensor_type", TYPES, ids=lambda t: t.name)
def test_codes_span_their_range(tensor_type, rng):
    """Random K-quant bits reach both ends of the range; Q8_0 keeps its -128 codes; the quantized legacy types
    stay within theirs."""
    rows, cols = 37, cols_of(tensor_type, 3)
    codes = grouped_codes(tensor_type, random_blocks(tensor_type, rows, cols, rng), rows, cols)
    (low, high), _, _ = EXPECTED[tensor_type]
    assert low <= codes.q.min() and codes.q.max() <= high
    if tensor_type in (T.Q4_K, T.Q5_K, T.Q6_K):
        assert (codes.q.min(), codes.q.max()) == (low, high)
    if tensor_type == T.Q8_0:
        assert codes.q.min() == -128


def test_signed_zeros_come_out_as_gguf_py_gives_them(rng):
    """Zero codes with negative scales make -0.0 weights; K-quant offsets -(dmin * 0) are -0.0 (or +0.0 for a
    negative dmin) and d * q - dm keeps every zero's sign as a + (-b) does."""
    rows, cols = 37, 512
    for tensor_type in (T.Q6_K, T.Q4_K, T.Q5_K):
        raw = random_blocks(tensor_type, rows, cols, rng)
        expected = dequantize(raw, tensor_type)
        negative_zeros = np.count_nonzero((expected == 0) & np.signbit(expected))
        assert negative_zeros > 0 or tensor_type != T.Q6_K
        np.testing.assert_array_equal(bits(grouped_codes(tensor_type, raw, rows, cols).dequantize()), bits(expected))


def test_chunked_unpacking_matches(rng, monkeypatch):
    """Tensors unpacked in several row chunks (the last one short) come out as in one."""
    monkeypatch.setattr(repack, "_CHUNK_ELEMENTS", 3 * 256)
    for tensor_type in TYPES:
        rows, cols = 37, 512
        raw = random_blocks(tensor_type, rows, cols, rng)
        codes = grouped_codes(tensor_type, raw, rows, cols)
        np.testing.assert_array_equal(bits(codes.dequantize()), bits(dequantize(raw, tensor_type)))


def test_scales_fit_float16(rng):
    for tensor_type in (T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1):
        raw = random_blocks(tensor_type, 37, 96, rng)
        assert grouped_codes(tensor_type, raw, 37, 96).scales_fit_float16
    # Q4_K: d = 1 + 2^-10 (a float16) times the 6-bit scale 3 is 3 + 3 * 2^-10, 12 significant bits: no float16.
    raw = random_blocks(T.Q4_K, 1, 256, rng)
    raw[0, 0:2] = np.array([1 + 2**-10], np.float16).view(np.uint8)
    raw[0, 4] = (raw[0, 4] & 0xC0) | 3  # sub-block 0's scale
    codes = grouped_codes(T.Q4_K, raw, 1, 256)
    assert codes.scales[0, 0] == np.float32(3 + 3 * 2**-10)
    assert not codes.scales_fit_float16
    np.testing.assert_array_equal(bits(codes.dequantize()), bits(dequantize(raw, T.Q4_K)))
    # Scales too large for float16 do not fit either.
    big = GroupedCodes(np.zeros((1, 32), np.int8), np.array([[1e6]], np.float32), None, 32)
    assert not big.scales_fit_float16


@pytest.mark.parametrize("tensor_type", TYPES, ids=lambda t: t.name)
def test_regrouped_keeps_every_bit(tensor_type, rng):
    rows, cols = 5, cols_of(tensor_type, 2)
    raw = random_blocks(tensor_type, rows, cols, rng)
    codes = grouped_codes(tensor_type, raw, rows, cols)
    expected = bits(dequantize(raw, tensor_type))
    assert codes.regrouped(codes.group) is codes
    for group in (16, 8, 4, 1):
        smaller = codes.regrouped(group)
        assert smaller.group == group and smaller.scales.shape == (rows, cols // group)
        assert (smaller.offsets is None) == (codes.offsets is None)
        np.testing.assert_array_equal(bits(smaller.dequantize()), expected)
    for group in (0, 12, 2 * codes.group):
        with pytest.raises(ValueError, match=f"groups of {codes.group} into groups of {group}"):
            codes.regrouped(group)


def test_join_rows_of_mixed_types_keeps_every_bit(rng):
    """q/k/v stored as Q4_K, Q6_K and Q8_0 (and gate/up as Q5_1 and Q5_0): joined along N in groups of 16, with
    offsets, and the -0.0 weights of the parts without offsets stay -0.0."""
    cols = 512
    for mix in ([(T.Q4_K, 37), (T.Q6_K, 5), (T.Q8_0, 16)], [(T.Q5_1, 3), (T.Q5_0, 1)], [(T.Q8_0, 7), (T.Q4_0, 9)]):
        raws = [(t, random_blocks(t, rows, cols, rng), rows) for t, rows in mix]
        parts = [grouped_codes(t, raw, rows, cols) for t, raw, rows in raws]
        joined = join_rows(parts)
        expected = np.concatenate([dequantize(raw, t) for t, raw, _ in raws])
        assert joined.group == min(part.group for part in parts)
        assert (joined.offsets is not None) == any(part.offsets is not None for part in parts)
        assert joined.q.shape == (sum(rows for _, rows in mix), cols)
        np.testing.assert_array_equal(bits(joined.dequantize()), bits(expected))
    # A -0.0 weight in a part without offsets stays -0.0 beside a part with offsets.
    minus_zero = GroupedCodes(np.zeros((1, 32), np.int8), np.full((1, 1), -1.0, np.float32), None, 32)
    with_offsets = GroupedCodes(np.ones((1, 32), np.int8), np.ones((1, 2), np.float32), np.ones((1, 2), np.float32),
                                16)
    joined = join_rows([minus_zero, with_offsets])
    assert np.all(np.signbit(joined.dequantize()[0])) and np.all(joined.dequantize()[0] == 0)


def test_join_rows_rejects_what_it_cannot_join():
    def part(k: int, group: int) -> GroupedCodes:
        return GroupedCodes(np.zeros((2, k), np.int8), np.zeros((2, k // group), np.float32), None, group)

    with pytest.raises(ValueError, match="at least one part"):
        join_rows([])
    with pytest.raises(ValueError, match=r"same K; they have K = \[32, 64\]"):
        join_rows([part(64, 32), part(32, 32)])
    with pytest.raises(ValueError, match=r"groups of \[24, 16\] have no common group"):
        join_rows([part(48, 24), part(48, 16)])
    assert join_rows([part(64, 32), part(64, 16)]).offsets is None


@pytest.mark.parametrize("tensor_type", [T.Q2_K, T.Q3_K, T.IQ4_NL, *FLOAT], ids=lambda t: t.name)
def test_unsupported_types_are_named(tensor_type):
    with pytest.raises(ValueError, match=f"{tensor_type.name} tensors cannot be repacked.*Q4_K.*Q8_0"):
        grouped_codes(tensor_type, np.zeros(1024, np.uint8), 1, 256)


def test_bad_shapes_and_bytes_are_named(rng):
    raw = random_blocks(T.Q6_K, 2, 512, rng)
    with pytest.raises(ValueError, match=r"Q6_K row is whole blocks of 256 values; a 2 x 384 .*multiple of 256"):
        grouped_codes(T.Q6_K, raw, 2, 384)
    with pytest.raises(ValueError, match="Q8_0 row is whole blocks of 32 values"):
        grouped_codes(T.Q8_0, raw, 2, 0)
    with pytest.raises(ValueError, match=r"a 3 x 512 Q6_K tensor is 1260 bytes \(420 per row\), raw holds 840"):
        grouped_codes(T.Q6_K, raw, 3, 512)
    with pytest.raises(ValueError, match="Q6_K tensor's bytes as uint8, got int8"):
        grouped_codes(T.Q6_K, raw.view(np.int8), 2, 512)


def test_grouped_codes_check_their_arrays():
    with pytest.raises(ValueError, match="q must be int8"):
        GroupedCodes(np.zeros((1, 32), np.int16), np.zeros((1, 1), np.float32), None, 32)
    with pytest.raises(ValueError, match="group 24 does not divide K = 32"):
        GroupedCodes(np.zeros((1, 32), np.int8), np.zeros((1, 1), np.float32), None, 24)
    with pytest.raises(ValueError, match=r"offsets must be float32 \[1, 1\]"):
        GroupedCodes(np.zeros((1, 32), np.int8), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float16), 32)


@pytest.mark.parametrize("tensor_type", [*FLOAT, *TYPES], ids=lambda t: t.name)
def test_random_blocks_are_valid_tensors(tensor_type, rng):
    raw = random_blocks(tensor_type, 3, 512, rng)
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    assert raw.dtype == np.uint8 and raw.shape == (3, 512 // block_size * type_size)
    w = dequantize(raw, tensor_type)
    assert w.shape == (3, 512) and np.all(np.isfinite(w))
