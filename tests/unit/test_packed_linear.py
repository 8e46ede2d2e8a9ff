"""Host-side packing of linear weights (mili/model/packed_linear.py): the layouts the Mojo kernels read, written
out index by index from the formulas in mojo_kernels/linear.mojo, and int8 quantisation's guarantees."""

from __future__ import annotations

import numpy as np
import pytest

from mili.dtypes import f32_to_bf16_bits
from mili.model.packed_linear import (PANEL, PackedShape, WeightFormat, dequantize_int8, int4_as_int8, pack_bf16,
                                      pack_int4, pack_weight, quantize_int4, quantize_int8, unpack_bf16,
                                      unpack_int4_codes)
from tests.kernels.reference import bf16_round

SHAPES = [(1, 1), (16, 2), (21, 37), (40, 64), (33, 129)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_layout_is_the_one_the_kernels_read(n, k, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    packed = pack_bf16(w).reshape(-1)
    bits = f32_to_bf16_bits(w)
    pairs = -(-k // 2)
    for row in range(n):
        for col in range(k):
            assert packed[((row // PANEL) * pairs + col // 2) * 32 + (row % PANEL) * 2 + col % 2] == bits[row, col]
    padding = np.ones(packed.size, bool)
    padding[[((r // PANEL) * pairs + c // 2) * 32 + (r % PANEL) * 2 + c % 2 for r in range(n) for c in range(k)]] = False
    assert not packed[padding].any(), "padding must be zero"
    assert packed.size == int(np.prod(PackedShape(WeightFormat.BF16, n, k).arrays()[0][2]))


@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_packing_round_trips_and_bits_pack_like_floats(n, k, rng):
    w = rng.standard_normal((n, k)).astype(np.float32)
    np.testing.assert_array_equal(unpack_bf16(pack_bf16(w), n, k), bf16_round(w))
    np.testing.assert_array_equal(pack_bf16(f32_to_bf16_bits(w)), pack_bf16(w))


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_layout_and_error_bound(n, k, group, rng):
    w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-5, 1, size=(n, 1)))).astype(np.float32)
    q, scales = quantize_int8(w, group)
    kg = -(-k // group) * group
    q_flat, s_flat = q.reshape(-1), scales.reshape(-1)
    deq = dequantize_int8(q, scales, n, k, group)
    for row in range(n):
        for col in range(k):
            scale = s_flat[((row // PANEL) * (kg // group) + col // group) * PANEL + row % PANEL]
            value = q_flat[((row // PANEL) * kg + col) * PANEL + row % PANEL]
            assert deq[row, col] == np.float32(value) * np.float32(scale)
            # round to nearest with a scale rounded up: at most half a step off, even for tiny (subnormal) scales
            assert abs(float(deq[row, col]) - float(w[row, col])) <= 0.5 * float(scale) * (1 + 1e-6)
    assert np.abs(q).max() <= 127
    assert q.shape == PackedShape(WeightFormat.INT8, n, k, group).arrays()[0][2]
    assert scales.shape == PackedShape(WeightFormat.INT8, n, k, group).arrays()[1][2]


def test_int8_all_zero_groups_have_zero_scale_and_zero_q():
    w = np.zeros((16, 64), np.float32)
    w[3, 40] = 127 / 128  # scale 1/128, exact in float16
    q, scales = quantize_int8(w, 32)
    deq = dequantize_int8(q, scales, 16, 64, 32)
    np.testing.assert_array_equal(deq, w)
    assert np.count_nonzero(scales) == 1


def test_a_gguf_q8_0_tensor_is_held_without_loss(rng):
    """Q8_0: blocks of 32 int8 with one float16 scale, |q| <= 127 and the block's largest |q| = 127 (llama.cpp
    sets d = max|w| / 127). Quantising its dequantised values gives back the same q and scales exactly."""
    n, k = 48, 96
    scales = np.abs(rng.standard_normal((n, k // 32))).astype(np.float16) * np.float16(0.01)
    q = rng.integers(-127, 128, size=(n, k // 32, 32))
    q[:, :, 0] = np.where(rng.random((n, k // 32)) < 0.5, -127, 127)
    w = (q * scales.astype(np.float32)[:, :, None]).reshape(n, k).astype(np.float32)
    packed = pack_weight(w, WeightFormat.INT8, 32)
    np.testing.assert_array_equal(packed.dense(), w)
    held_scales = packed.arrays[1].reshape(n // PANEL, k // 32, PANEL).transpose(0, 2, 1).reshape(n, k // 32)
    np.testing.assert_array_equal(held_scales, scales)


@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_layout_is_the_one_the_kernels_read(n, k, rng):
    """Byte (n // 16) * Kg / 2 * 16 + (k // 8) * 64 + (n % 16) * 4 + k % 4 holds code [n, k] in its low nibble for
    k % 8 < 4, else in its high one (mojo_kernels/linear.mojo's header)."""
    codes = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    groups = -(-k // 32)
    packed = pack_int4(codes, np.ones((n, groups), np.float32), None).arrays[0]
    kg = groups * 32
    assert packed.shape == (-(-n // PANEL), kg // 2 * PANEL)
    flat = packed.reshape(-1)
    for row in range(n):
        for col in range(k):
            byte = flat[(row // PANEL) * kg // 2 * PANEL + (col // 8) * 64 + (row % PANEL) * 4 + col % 4]
            assert (byte >> 4 if col % 8 >= 4 else byte & 0x0F) == codes[row, col], (row, col)
    np.testing.assert_array_equal(unpack_int4_codes(packed, n, k), codes)


@pytest.mark.parametrize("n,k", SHAPES)
def test_int4_quantization_error_bound(n, k, rng):
    """--quantization int4: every weight within half a step of its group's scale, offsets at or below the group's
    minimum, codes 0..15; the int8 layout it runs in with --float-activations holds the same values."""
    w = (rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 2, size=(n, 1)))).astype(np.float32)
    packed = quantize_int4(w)
    assert packed.shape == PackedShape(WeightFormat.INT4, n, k, 32, offsets=True)
    codes, scales, offsets = packed.arrays
    groups = -(-k // 32)
    per_weight = np.repeat(scales.reshape(-1, groups, PANEL).transpose(0, 2, 1).reshape(-1, groups)[:n], 32, axis=1)
    error = np.abs(packed.dense() - w)
    assert np.all(error <= per_weight[:, :k].astype(np.float32) * 0.5001 + 1e-30)
    low = offsets.reshape(-1, groups, PANEL).transpose(0, 2, 1).reshape(-1, groups)[:n].astype(np.float32)
    padded = np.pad(w, ((0, 0), (0, groups * 32 - k)), mode="edge").reshape(n, groups, 32)
    assert np.all(low <= padded.min(axis=2))
    np.testing.assert_array_equal(int4_as_int8(packed).dense(), packed.dense())


def test_storage_sizes():
    assert PackedShape(WeightFormat.INT8, 1024, 1024).nbytes() == 1024 * 1024 * (1 + 2 / 32)
    assert PackedShape(WeightFormat.INT4, 1024, 1024, offsets=True).stored_bits_per_weight == 5.0
    assert PackedShape(WeightFormat.INT4, 1024, 1024).stored_bits_per_weight == 4.5
    assert PackedShape(WeightFormat.BF16, 1024, 1024).nbytes() == 1024 * 1024 * 2
    with pytest.raises(ValueError, match="not packed"):
        PackedShape(WeightFormat.DENSE, 1024, 1024).nbytes()
    with pytest.raises(ValueError, match="group_size"):
        quantize_int8(np.zeros((1, 1), np.float32), 0)
