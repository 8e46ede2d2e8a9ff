"""bfloat16 conversions against torch's, including rounding ties, infinities, NaN and subnormals; the run
dtype a `--dtype` choice resolves to."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from max.dtype import DType

from mili.dtypes import (
    bf16_bits_to_f32,
    convert_buffer,
    f32_to_bf16_bits,
    numpy_to_buffer,
    parse_run_dtype,
    resolve_run_dtype,
    to_numpy_f32,
)


def torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_f32_to_bf16_rounds_like_torch(rng):
    random_bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([
        random_bits.view(np.float32),  # every exponent, subnormals, some NaNs
        rng.standard_normal(10_000).astype(np.float32),
        # exact ties between two bf16 values: round to even
        ((np.arange(1000, dtype=np.uint32) << 16) | np.uint32(0x8000)).view(np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, np.finfo(np.float32).max, 1e-45], np.float32),
    ])
    ours, theirs = f32_to_bf16_bits(values), torch_bf16_bits(values)
    nan = np.isnan(values)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_bits_to_f32(ours[nan])).all()


def test_bf16_to_f32_is_exact():
    bits = np.arange(2**16, dtype=np.uint16)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    ours = bf16_bits_to_f32(bits)
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(ours[finite], expected[finite])
    assert np.isnan(ours[~finite]).all()


def test_buffer_round_trip(rng):
    values = rng.standard_normal((3, 5)).astype(np.float32)
    bf16 = numpy_to_buffer(values, DType.bfloat16)
    assert bf16.dtype == DType.bfloat16 and tuple(bf16.shape) == (3, 5)
    np.testing.assert_array_equal(to_numpy_f32(bf16), torch.from_numpy(values).bfloat16().float().numpy())
    f32 = numpy_to_buffer(values, DType.float32)
    assert convert_buffer(f32, DType.float32) is f32  # no copy when nothing changes
    np.testing.assert_array_equal(to_numpy_f32(convert_buffer(bf16, DType.float32)), to_numpy_f32(bf16))


@pytest.mark.parametrize("name,expected", [("float32", DType.float32), ("fp32", DType.float32),
                                           ("bfloat16", DType.bfloat16), ("BF16", DType.bfloat16)])
def test_parse_run_dtype(name, expected):
    assert parse_run_dtype(name) == expected


def test_parse_run_dtype_names_the_choices():
    with pytest.raises(ValueError, match="choose float32 or bfloat16"):
        parse_run_dtype("float16")


@pytest.mark.parametrize("checkpoint_dtype, expected", [
    ("bfloat16", DType.bfloat16), ("float16", DType.bfloat16), ("float32", DType.float32),
    (None, DType.float32),  # a config.json that names no dtype: float32, exact whatever the file holds
])
def test_auto_on_cpu_is_the_checkpoints_dtype(checkpoint_dtype, expected):
    for requested in ("auto", "AUTO", None):
        assert resolve_run_dtype(requested, checkpoint_dtype=checkpoint_dtype, device="cpu") == expected


@pytest.mark.parametrize("checkpoint_dtype", ["bfloat16", "float32", None])
def test_auto_on_gpu_is_bfloat16(checkpoint_dtype):
    assert resolve_run_dtype("auto", checkpoint_dtype=checkpoint_dtype, device="gpu") == DType.bfloat16


def test_an_explicit_dtype_wins_over_the_checkpoints():
    assert resolve_run_dtype("float32", checkpoint_dtype="bfloat16", device="cpu") == DType.float32
    assert resolve_run_dtype("bf16", checkpoint_dtype="float32", device="gpu") == DType.bfloat16
    assert resolve_run_dtype(DType.float32, checkpoint_dtype="bfloat16", device="gpu") == DType.float32
    with pytest.raises(ValueError, match="choose float32 or bfloat16"):
        resolve_run_dtype("float16", checkpoint_dtype="float16", device="cpu")
