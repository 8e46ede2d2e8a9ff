"""RMSNorm op vs a float64 numpy reference, float32 and bfloat16, awkward sizes, fresh random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from max.driver import CPU
from max.dtype import DType
from max.engine import InferenceSession
from max.graph import DeviceRef

from mili.dtypes import bf16_bits_to_f32, f32_to_bf16_bits, numpy_to_buffer, to_numpy_f32
from tests.kernels.graphs import LARGE_EPS, SMALL_EPS, build_kernel_graph

SIZES = [(1, 96), (3, 100), (17, 1024), (5, 37), (64, 1000), (2, 4097), (0, 96)]


@pytest.fixture(scope="module")
def kernel_model():
    device = CPU()
    return InferenceSession(devices=[device]).load(build_kernel_graph(DeviceRef.from_device(device)))


def rms_norm_reference(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps) * weight.astype(np.float64)


def bf16_round(values: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(f32_to_bf16_bits(values))


def run(model, x32, w32, x16, w16):
    buffers = [numpy_to_buffer(x32, DType.float32), numpy_to_buffer(w32, DType.float32),
               numpy_to_buffer(x16, DType.bfloat16), numpy_to_buffer(w16, DType.bfloat16)]
    return [to_numpy_f32(out) for out in model.execute(*buffers)]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), 1e-30))


@pytest.mark.parametrize("rows,hidden", SIZES)
def test_rms_norm_matches_float64_reference(kernel_model, rows, hidden):
    rng = np.random.default_rng()
    # Rows of very different scales: the op must normalise each on its own.
    scale = np.exp(rng.uniform(-3, 3, size=(rows, 1))).astype(np.float32)
    x = (rng.standard_normal((rows, hidden)) * scale).astype(np.float32)
    w = rng.uniform(-2, 2, hidden).astype(np.float32)
    x16, w16 = bf16_round(x), bf16_round(w)

    out32, out32_large_eps, out16, out16_large_eps = run(kernel_model, x, w, x16, w16)

    for out, eps in ((out32, SMALL_EPS), (out32_large_eps, LARGE_EPS)):
        assert out.shape == (rows, hidden)
        assert not np.isnan(out).any()
        assert relative_error(out, rms_norm_reference(x, w, eps)) <= 1e-5
    for out, eps in ((out16, SMALL_EPS), (out16_large_eps, LARGE_EPS)):
        assert out.shape == (rows, hidden)
        assert relative_error(out, rms_norm_reference(x16, w16, eps)) <= 1e-2


def test_large_eps_changes_the_result(kernel_model):
    """Guards the test above: the two eps values must give visibly different outputs."""
    rng = np.random.default_rng()
    x = (0.3 * rng.standard_normal((4, 100))).astype(np.float32)
    w = rng.uniform(0.5, 2, 100).astype(np.float32)
    out_small, out_large, _, _ = run(kernel_model, x, w, bf16_round(x), bf16_round(w))
    assert relative_error(out_small, out_large) > 0.1


def test_bf16_rounds_like_transformers(kernel_model):
    """Qwen3RMSNorm rounds the normalised value to bf16 before the weight multiply; so must we."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    rng = np.random.default_rng()
    hidden = 100
    x16 = bf16_round(rng.standard_normal((9, hidden)).astype(np.float32))
    w16 = bf16_round(rng.uniform(-2, 2, hidden).astype(np.float32))
    norm = Qwen3RMSNorm(hidden, eps=SMALL_EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w16))
        expected = norm.to(torch.bfloat16)(torch.from_numpy(x16).to(torch.bfloat16)).float().numpy()
    _, _, out16, _ = run(kernel_model, x16, w16, x16, w16)
    mismatched = np.mean(out16 != expected)
    # Summation order differs (SIMD lanes vs torch), which may flip a rare last-bit rounding.
    assert mismatched < 0.01, f"{mismatched:.2%} of bf16 outputs differ from transformers"
