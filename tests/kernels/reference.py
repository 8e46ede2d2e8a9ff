"""float64 numpy references for the kernels, written from the math (and transformers' definitions)."""

from __future__ import annotations

import numpy as np
from max.dtype import DType

from mili.dtypes import bf16_bits_to_f32, f32_to_bf16_bits


def bf16_round(values: np.ndarray) -> np.ndarray:
    """Values as bfloat16 would hold them (as float32)."""
    return bf16_bits_to_f32(f32_to_bf16_bits(np.asarray(values, np.float32)))


def as_dtype(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Values as a tensor of `dtype` (float32 or bfloat16) holds them, as float32."""
    return bf16_round(values) if dtype == DType.bfloat16 else np.asarray(values, np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return x64 / np.sqrt((x64 * x64).mean(axis=-1, keepdims=True) + eps) * weight.astype(np.float64)


def swiglu(gate_up: np.ndarray) -> np.ndarray:
    g, u = np.split(gate_up.astype(np.float64), 2, axis=-1)
    return g / (1.0 + np.exp(-g)) * u


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE in float64 from the definition (not from our table)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    x1, x2 = x[..., : d // 2].astype(np.float64), x[..., d // 2:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_len: int) -> np.ndarray:
    """Causal GQA attention of one sequence's q_len new tokens; k, v hold its whole context [ctx, kv, d]."""
    tokens, heads, d = q.shape
    context, kv_heads, _ = k.shape
    group = heads // kv_heads
    out = np.empty((tokens, heads, d), np.float64)
    for i in range(tokens):
        limit = context - q_len + i + 1
        for h in range(heads):
            scores = k[:limit, h // group].astype(np.float64) @ q[i, h].astype(np.float64) / np.sqrt(d)
            p = np.exp(scores - scores.max())
            out[i, h] = (p / p.sum()) @ v[:limit, h // group].astype(np.float64)
    return out


def attention_row(q: np.ndarray, k_heads: np.ndarray, v_heads: np.ndarray) -> np.ndarray:
    """Attention of one new token's query heads q [heads, d] over a whole context given head-major, k_heads and
    v_heads [kv_heads, context, d] (float64: long contexts are laid out once, not per row); returns [heads, d]."""
    heads, d = q.shape
    kv_heads = k_heads.shape[0]
    grouped = q.astype(np.float64).reshape(kv_heads, heads // kv_heads, d)
    out = np.empty((kv_heads, heads // kv_heads, d), np.float64)
    for h in range(kv_heads):  # 2-D products: BLAS, where a batched matmul of thin matrices would loop
        scores = k_heads[h] @ grouped[h].T / np.sqrt(d)  # [context, group]
        p = np.exp(scores - scores.max(axis=0))
        out[h] = (p / p.sum(axis=0)).T @ v_heads[h]
    return out.reshape(heads, d)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute error over the largest reference magnitude (0 for empty arrays)."""
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0)) / scale


def quantize_activations(x: np.ndarray, group: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 4-bit linear op's activations, from its definition (mojo_kernels/linear_int4.mojo's header), in float32
    exactly as specified: per row per `group` inputs (zero-padded), scale = max|x| / 127,
    codes = roundeven(x * (127 / max|x|)) in [-127, 127], and the sum of the group's quantized values, scale * sum
    of codes (here in float64). Returns (codes [M, Kg] float64, scales [M, G] float64, sums [M, G] float64)."""
    m, k = x.shape
    count = -(-k // group)
    padded = np.zeros((m, count * group), np.float32)
    padded[:, :k] = x
    groups = padded.reshape(m, count, group)
    amax = np.abs(groups).max(axis=2)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint(groups * inverse[:, :, None]), -127, 127)
    scales = (amax / np.float32(127)).astype(np.float32)
    return (codes.reshape(m, count * group).astype(np.float64), scales.astype(np.float64),
            scales.astype(np.float64) * codes.sum(axis=2))


def int4_linear(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] @ W^T for W = codes * scale + offset (codes [N, K] 0..15; scales, offsets [N, G]) with x quantized
    as quantize_activations says, in float64: sum over groups of (xs * scale) * sum(xq * q) + offset * xs * sum(xq),
    the exact weights times the quantized activations. Returns (the result, sum over groups of |xs * scale| *
    sum |xq * q| + |offset| * xs * sum |xq|: the magnitude float32 rounding errors scale with)."""
    xq, xs, xsum = quantize_activations(x, group)
    m, n = x.shape[0], codes.shape[0]
    q = np.zeros((n, xq.shape[1]))
    q[:, :codes.shape[1]] = codes
    count = xs.shape[1]
    xq_g, q_g = xq.reshape(m, count, group), q.reshape(n, count, group)
    isum = np.einsum("mgk,ngk->mng", xq_g, q_g)
    isum_abs = np.einsum("mgk,ngk->mng", np.abs(xq_g), np.abs(q_g))
    xabs = xs * np.abs(xq_g).sum(axis=2)
    scaled = xs[:, None, :] * scales[None, :, :]
    result = (scaled * isum).sum(axis=2) + xsum @ offsets.T
    magnitude = (np.abs(scaled) * isum_abs).sum(axis=2) + xabs @ np.abs(offsets).T
    return result, magnitude


def int6_linear(x: np.ndarray, codes: np.ndarray, weight_scales: np.ndarray,
                group: int = 32, subgroup: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """x [M, K] @ W^T for W = (codes - 32) * weight_scales (codes [N, K] 0..63; weight_scales [N, ceil(K / 16)],
    the block scale times the sub-scale) with x quantized as quantize_activations says, in float64: sum over half
    groups of (xs * weight_scale) * sum(xq * (q - 32)). Returns (the result, the matching sum of magnitudes)."""
    xq, xs, _ = quantize_activations(x, group)
    m, n = x.shape[0], codes.shape[0]
    count = xq.shape[1] // subgroup
    q = np.zeros((n, xq.shape[1]))
    q[:, :codes.shape[1]] = codes.astype(np.float64) - 32
    xq_h, q_h = xq.reshape(m, count, subgroup), q.reshape(n, count, subgroup)
    scales = np.zeros((n, count))
    scales[:, :weight_scales.shape[1]] = weight_scales
    isum = np.einsum("mhk,nhk->mnh", xq_h, q_h)
    isum_abs = np.einsum("mhk,nhk->mnh", np.abs(xq_h), np.abs(q_h))
    scaled = np.repeat(xs, group // subgroup, axis=1)[:, None, :] * scales[None, :, :]
    return (scaled * isum).sum(axis=2), (np.abs(scaled) * isum_abs).sum(axis=2)
