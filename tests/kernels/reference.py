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
