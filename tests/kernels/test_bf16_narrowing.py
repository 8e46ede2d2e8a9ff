"""MILI's float32 -> bfloat16 narrowing inside a compiled op against torch's: subnormals, ties, overflow, zeros.

The rope op rounds its float32 cos/sin table to the input dtype and, for x = (1, 0), writes
x1 * cos - x2 * sin = cos (exact: a product with 1 and a zero subtracted) narrowed to bfloat16. So a table
holding arbitrary float32 values makes the op narrow exactly those values, through the kernel's SIMD path and
its tail. It runs on the session's already-compiled elementwise graph: no compile of its own.
(The Mojo unit test tests/kernels/mojo/test_convert.mojo covers `narrow` exhaustively against an explicit
definition; this checks the compiled op and torch agree.)
"""

from __future__ import annotations

import os

import numpy as np
import torch
from max.dtype import DType

from tests.kernels.graphs import DTYPES, ROPE_HEAD_DIMS
from tests.kernels.test_elementwise import make_inputs, run

HEAD_DIM = 64
HALF = HEAD_DIM // 2

HAND_PICKED = np.array([
    0x0030_67C7, 0x0001_16C2,  # 4.445332e-39 and 1e-40: subnormals an AVX512_BF16 conversion flushes to 0
    0x0000_0001, 0x0000_8000, 0x0000_8001, 0x0001_8000, 0x0030_FFFF,  # smallest subnormal, subnormal ties
    0x007F_7FFF, 0x007F_8000, 0x007F_FFFF, 0x0080_0000,  # around the smallest normal (largest subnormal rounds up)
    0x3F80_8000, 0x3F81_8000, 0x3F80_8001, 0x3F80_7FFF, 0x3FFF_FFFF,  # ties to even, carry into the exponent
    0x7F7F_0000, 0x7F7F_7FFF, 0x7F7F_8000, 0x7F7F_FFFF,  # max finite bfloat16; max + half ulp and above -> inf
    0x0000_0000, 0x7F80_0000,  # zero, infinity
], dtype=np.uint32)


def torch_bf16_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_rope_narrows_like_torch_on_subnormals_and_ties(elementwise_model):
    seed = int(os.environ.get("MILI_TEST_SEED") or np.random.SeedSequence().entropy % 2**32)  # replayable
    rng = np.random.default_rng(seed)
    random_bits = np.concatenate([
        rng.integers(0, 2**32, 20000, dtype=np.uint32),
        rng.integers(0, 0x0080_0000, 4000, dtype=np.uint32),  # subnormals
        (rng.integers(0, 0x7F80, 4000, dtype=np.uint32) << 16) | 0x8000,  # exact ties
    ])
    bits = np.concatenate([HAND_PICKED, HAND_PICKED | 0x8000_0000, random_bits])
    values = bits.view(np.float32)
    values = values[~np.isnan(values)]  # NaN handling is pinned by the Mojo test (torch's NaN bits differ)
    tokens = -(-len(values) // HALF)
    cos = np.zeros(tokens * HALF, np.float32)
    cos[:len(values)] = values
    table = np.zeros((tokens, HEAD_DIM), np.float32)  # sin half stays 0
    table[:, :HALF] = cos.reshape(tokens, HALF)
    tables = [table if d == HEAD_DIM else np.zeros((tokens, d), np.float32) for d in ROPE_HEAD_DIMS]

    x = np.zeros((tokens, 1, HEAD_DIM), np.float32)
    x[..., :HALF] = 1.0
    rope_index = 6 + ROPE_HEAD_DIMS.index(HEAD_DIM)  # see build_elementwise_graph's input order
    inputs = [make_inputs(rng, 1, 8, tokens, 1, 4, dtype) for dtype in DTYPES]
    for per_dtype in inputs:
        per_dtype[rope_index] = x
    results = run(elementwise_model, inputs, np.arange(tokens), tables)

    for dtype, outputs in zip(DTYPES, results, strict=True):
        written = outputs[len(outputs) - len(ROPE_HEAD_DIMS) + ROPE_HEAD_DIMS.index(HEAD_DIM)]
        written = np.ascontiguousarray(written[:, 0, :HALF]).reshape(-1)[:len(values)]
        if dtype == DType.float32:
            expected = values.view(np.uint32)  # float32 passes through bit for bit: subnormals survive the math
        else:
            expected = torch_bf16_bits(values).astype(np.uint32) << 16
        wrong = np.flatnonzero(written.view(np.uint32) != expected)
        assert wrong.size == 0, (
            f"{dtype} (seed {seed}): {wrong.size} of {len(values)} differ, e.g. "
            + ", ".join(f"{values.view(np.uint32)[i]:#010x} -> {written.view(np.uint32)[i]:#010x} "
                        f"(expected {expected[i]:#010x})" for i in wrong[:5]))
