"""The RoPE cos/sin table, computed once per model exactly as transformers computes it.

transformers (Qwen3RotaryEmbedding, default rope type) works in float32: inv_freq = 1 / theta^(2i/d),
angle = position * inv_freq rounded to float32, then cos/sin. We keep those float32 steps but round each
correctly (pow and cos in float64): torch's float32 pow may be off by an ulp, so inv_freq can differ from
transformers' by one ulp, which moves an angle by at most position * 1.2e-7 (1e-5 rad at position 100).
"""

from __future__ import annotations

import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / np.power(float(theta), exponents.astype(np.float64))).astype(np.float32)


def rope_table(head_dim: int, theta: float, max_positions: int) -> np.ndarray:
    """[max_positions, head_dim] float32: cos(angle) in [:, :head_dim/2], sin(angle) in [:, head_dim/2:]."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    positions = np.arange(max_positions, dtype=np.float32)
    angles = np.multiply.outer(positions, inverse_frequencies(head_dim, theta)).astype(np.float32)
    angles64 = angles.astype(np.float64)  # cos/sin of the float32 angle, correctly rounded
    return np.concatenate([np.cos(angles64), np.sin(angles64)], axis=1).astype(np.float32)
