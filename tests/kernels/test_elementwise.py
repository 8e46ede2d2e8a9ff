"""RMSNorm (plain, fused residual add, per-head), SwiGLU and RoPE vs float64 numpy, fp32 and bf16.

Fresh random inputs every run, sizes that are not multiples of the SIMD width, and every output element
compared (an element the kernel failed to write would hold garbage and fail).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from max.driver import Buffer
from max.dtype import DType

from mili.dtypes import numpy_to_buffer, to_numpy_f32
from mili.model.rope import rope_table
from tests.kernels import reference as ref
from tests.kernels.graphs import DTYPES, LARGE_EPS, ROPE_HEAD_DIMS, SMALL_EPS

THETA = 1_000_000.0
MAX_POSITIONS = 5000
TOLERANCE = {DType.float32: 1e-5, DType.bfloat16: 1e-2}
# (rows, hidden, tokens, heads, intermediate)
SIZES = [(1, 96, 1, 1, 3), (3, 100, 5, 3, 100), (17, 1024, 7, 16, 3072), (5, 37, 2, 2, 37),
         (64, 1000, 33, 5, 1000), (2, 4097, 1, 8, 129), (0, 96, 0, 4, 16)]


@pytest.fixture(scope="module")
def tables():
    return [rope_table(d, THETA, MAX_POSITIONS) for d in ROPE_HEAD_DIMS]


def make_inputs(rng, rows, hidden, tokens, heads, inter, dtype):
    scale = np.exp(rng.uniform(-3, 3, size=(rows, 1)))  # rows of very different magnitudes
    return [ref.as_dtype(a, dtype) for a in (
        rng.standard_normal((rows, hidden)) * scale, rng.uniform(-2, 2, hidden),
        rng.standard_normal((rows, hidden)) * scale, 3 * rng.standard_normal((tokens, 2 * inter)),
        rng.standard_normal((tokens, heads, 64)), rng.uniform(0.5, 2, 64),
        *[rng.standard_normal((tokens, heads, d)) for d in ROPE_HEAD_DIMS])]


def run(model, inputs_per_dtype, positions, tables):
    buffers = [numpy_to_buffer(a, dtype) for dtype, inputs in zip(DTYPES, inputs_per_dtype, strict=True)
               for a in inputs]
    buffers += [Buffer.from_numpy(positions.astype(np.int32))] + [Buffer.from_numpy(t) for t in tables]
    outputs = [to_numpy_f32(o) for o in model.execute(*buffers)]
    per = len(outputs) // len(DTYPES)
    return [outputs[i * per:(i + 1) * per] for i in range(len(DTYPES))]


def rope_with_table(x, positions, table):
    """Rotate-half in float64 using the table's own cos/sin (isolates the kernel from table rounding)."""
    d = x.shape[-1]
    cos, sin = table[positions, : d // 2][:, None, :], table[positions, d // 2:][:, None, :]
    x1, x2 = x[..., : d // 2].astype(np.float64), x[..., d // 2:].astype(np.float64)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("rows,hidden,tokens,heads,inter", SIZES)
def test_elementwise_ops_match_float64(elementwise_model, tables, rows, hidden, tokens, heads, inter, rng):
    inputs = [make_inputs(rng, rows, hidden, tokens, heads, inter, dtype) for dtype in DTYPES]
    positions = rng.integers(0, MAX_POSITIONS, size=tokens)
    results = run(elementwise_model, inputs, positions, tables)
    for dtype, (x, w, residual, gate_up, head_x, head_w, *rope_x), outs in zip(DTYPES, inputs, results, strict=True):
        norm_small, norm_large, add_normed, add_sum, head_normed, swiglu_out, *rope_outs = outs
        tol = TOLERANCE[dtype]
        summed = ref.bf16_round(x + residual) if dtype == DType.bfloat16 else x.astype(np.float64) + residual
        checks = {
            "rms_norm": (norm_small, ref.rms_norm(x, w, SMALL_EPS)),
            "rms_norm large eps": (norm_large, ref.rms_norm(x, w, LARGE_EPS)),
            "add_rms_norm out": (add_normed, ref.rms_norm(summed, w, SMALL_EPS)),
            "add_rms_norm residual": (add_sum, x.astype(np.float64) + residual),
            "head_rms_norm": (head_normed, ref.rms_norm(head_x, head_w, SMALL_EPS)),
            "swiglu": (swiglu_out, ref.swiglu(gate_up)),
        }
        for d, table, xr, out in zip(ROPE_HEAD_DIMS, tables, rope_x, rope_outs, strict=True):
            checks[f"rope d={d}"] = (out, rope_with_table(xr, positions, table))
        for name, (actual, expected) in checks.items():
            assert actual.shape == expected.shape, name
            assert not np.isnan(actual).any(), name
            err = ref.relative_error(actual, expected)
            assert err <= tol, f"{name} ({dtype}): relative error {err:.2e} > {tol:.0e}"


def test_large_eps_changes_the_result(elementwise_model, tables, rng):
    """Guards the test above: the two eps values must give visibly different outputs."""
    inputs = [make_inputs(rng, 4, 100, 2, 2, 8, dtype) for dtype in DTYPES]
    inputs[0][0] *= 0.3 / np.abs(inputs[0][0]).max()
    (small, large, *_), _ = run(elementwise_model, inputs, np.zeros(2, np.int64), tables)
    assert ref.relative_error(small, large) > 0.1


def test_rope_table_matches_transformers():
    """Our float32 table reproduces transformers' Qwen3RotaryEmbedding at every position."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    for head_dim in ROPE_HEAD_DIMS:
        config = Qwen3Config(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": THETA},
                             max_position_embeddings=40960)
        positions = torch.arange(40960)[None, :]
        cos, sin = Qwen3RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
        table = rope_table(head_dim, THETA, 40960)
        half = head_dim // 2
        # One ulp of inv_freq (torch's float32 pow vs a correctly rounded one) moves the angle by up to
        # position * 1.2e-7; cos/sin themselves agree to float32 rounding.
        allowed = 2e-6 + 2.4e-7 * np.arange(40960, dtype=np.float64)[:, None]
        assert (np.abs(table[:, :half] - cos[0, :, :half].numpy()) <= allowed).all()
        assert (np.abs(table[:, half:] - sin[0, :, :half].numpy()) <= allowed).all()


def test_rope_table_matches_the_definition_at_small_positions(rng):
    """Independent of transformers: float64 cos/sin of position * theta^(-2i/d), where float32 angles are exact
    enough (the table inherits float32 angle rounding at large positions, as the reference does)."""
    x = rng.standard_normal((64, 1, 128))
    positions = np.arange(64)
    table = rope_table(128, THETA, 64)
    # float32 angles at positions < 64 are within 64 * 2^-24 rad of exact.
    assert ref.relative_error(rope_with_table(x, positions, table), ref.rope(x, positions, THETA)) < 1e-5


def test_rope_rejects_positions_outside_the_table(elementwise_model, tables, rng):
    inputs = [make_inputs(rng, 1, 8, 2, 1, 4, dtype) for dtype in DTYPES]
    with pytest.raises(Exception, match="outside the RoPE table"):
        run(elementwise_model, inputs, np.array([0, MAX_POSITIONS]), tables)
