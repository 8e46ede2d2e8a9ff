"""The attention op at every kind of context length up to 32K+ keys, against float64 numpy and against itself.

The op takes every row's keys in softmax parts of PART_KEYS keys at fixed positions; a decode or a chunk of at most
MAX_ROWS // group tokens computes its parts in parallel tiles and folds them afterwards, a longer chunk folds them
as it walks its keys (mojo_kernels/attention.mojo). The sweep's context lengths cover every residue modulo PART_KEYS
(so every residue of each block size and softmax step, which divide it) and every part count from 1 to 129
(32,897 keys). Each length gets a decode, a short chunk (split into parts) and a chunk just too long to split, all
ending there, over one shared cache where the new token at position p always has the same query: the same row,
computed as a decode, inside a short chunk, inside a longer chunk or inside a full prefill, must give the same
bits, and match float64 numpy. (From cb30691 until issue 27's fix, merges of more than 64 parts, contexts of
16,385+ keys, used the weights of parts 64.. for parts 0..: relative errors of 0.1 to 2.)"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
from max.driver import Buffer
from max.dtype import DType

from mili.dtypes import numpy_to_buffer, to_numpy_f32
from mili.kernels import KERNEL_SOURCES
from mili.model.kv_layout import KVCacheShape
from tests.kernels import reference as ref
from tests.kernels.graphs import ATTENTION_CASES, NUM_LAYERS, AttentionCase

PART_KEYS = 256  # attention.mojo's PART_KEYS: a multiple of every tested block size and softmax step
MAX_ROWS = 16  # attention.mojo's MAX_ROWS: a sequence of at most MAX_ROWS // group tokens is split into parts
SWEEP = [PART_KEYS * (i % 129) + i % PART_KEYS + 1 for i in range(PART_KEYS + 2)]
FULL_PREFILL = 2 * PART_KEYS * 5 + 37  # one real prefill from position 0: 11 parts, a partial last one
TOLERANCE = {DType.float32: 1e-4, DType.bfloat16: 1e-2}
LAYER = 1
HEADS = ((2, 4), (1, 8), (2, 2))  # (KV heads, query heads): GQA 2, 8 and 1, one per case in turn


@dataclass(frozen=True)
class Run:
    """One sequence of the batch: q_len new tokens ending at context `context`."""

    kind: str
    context: int
    q_len: int


def sweep_runs(group: int) -> list[Run]:
    tokens_per_tile = max(1, MAX_ROWS // group)
    runs = [Run("prefill", FULL_PREFILL, FULL_PREFILL)]
    for i, context in enumerate(SWEEP):
        runs.append(Run("decode", context, 1))
        if tokens_per_tile > 1:
            runs.append(Run("short chunk", context, min(context, 2 + i % (tokens_per_tile - 1))))
        runs.append(Run("long chunk", context, min(context, tokens_per_tile + 1 + i % 3)))
    return runs


def test_the_sweep_covers_every_residue_and_part_count_of_the_kernel():
    source = (KERNEL_SOURCES / "attention.mojo").read_text()
    for name, value in (("PART_KEYS", PART_KEYS), ("MAX_ROWS", MAX_ROWS), ("STEP_KEYS", PART_KEYS // 2)):
        assert re.search(rf"^comptime {name} = {value}\b", source, re.MULTILINE), f"attention.mojo's {name} changed"
    assert {length % PART_KEYS for length in SWEEP} == set(range(PART_KEYS))
    assert {-(-length // PART_KEYS) for length in SWEEP} == set(range(1, 130))
    assert max(SWEEP) > 32_768


@pytest.mark.parametrize("index", range(len(ATTENTION_CASES)),
                         ids=lambda i: "{0.dtype}-bs{0.block_size}-d{0.head_dim}".format(ATTENTION_CASES[i]))
def test_every_row_gives_the_same_bits_however_computed_up_to_32k_keys(attention_models, index, rng):
    case: AttentionCase = ATTENTION_CASES[index]
    kv_heads, heads = HEADS[index % len(HEADS)]
    bs, d = case.block_size, case.head_dim
    positions = -(-max(SWEEP) // bs) * bs
    num_blocks = positions // bs + 3
    shape = KVCacheShape(NUM_LAYERS, num_blocks, kv_heads, bs, d)
    cache = np.full(shape.shape, np.nan, np.float32)  # other layers and unowned blocks: poison
    table = rng.permutation(num_blocks)[:positions // bs].astype(np.int32)
    k = ref.as_dtype(rng.standard_normal((positions, kv_heads, d)), case.dtype)
    v = ref.as_dtype(rng.standard_normal((positions, kv_heads, d)), case.dtype)
    shape.write_blocks(cache, LAYER, table, k, v)
    queries = ref.as_dtype(rng.standard_normal((positions, heads, d)), case.dtype)  # the query at each position

    runs = sweep_runs(heads // kv_heads)
    query_start = np.concatenate([[0], np.cumsum([r.q_len for r in runs])]).astype(np.int32)
    q = np.concatenate([queries[r.context - r.q_len:r.context] for r in runs])
    no_new_kv = numpy_to_buffer(np.zeros((1, kv_heads, d), np.float32), case.dtype)
    out = to_numpy_f32(attention_models[case].execute(
        numpy_to_buffer(cache, case.dtype), no_new_kv, no_new_kv, Buffer.from_numpy(np.array([-1], np.int32)),
        numpy_to_buffer(q, case.dtype), Buffer.from_numpy(np.array([LAYER], np.int32)),
        Buffer.from_numpy(query_start), Buffer.from_numpy(np.array([r.context for r in runs], np.int32)),
        Buffer.from_numpy(np.broadcast_to(table, (len(runs), len(table))).copy()))[0])
    assert np.isfinite(out).all(), "a row read poison: a block it does not own, or another layer"

    # float64 numpy: each sweep length's row (its decode) and the first row of each long chunk
    k_heads, v_heads = (np.ascontiguousarray(x.transpose(1, 0, 2), np.float64) for x in (k, v))
    errors: dict[int, float] = {}  # context -> relative error of its row
    for run, start in zip(runs, query_start, strict=False):
        if run.kind in ("decode", "long chunk"):
            row_context = run.context - run.q_len + 1
            expected = ref.attention_row(queries[row_context - 1], k_heads[:, :row_context], v_heads[:, :row_context])
            errors[row_context] = ref.relative_error(out[start], expected)
    worst_context = max(errors, key=errors.__getitem__)
    wrong = sorted(c for c, error in errors.items() if error > TOLERANCE[case.dtype])
    assert not wrong, (f"{len(wrong)} of {len(errors)} contexts are off by more than {TOLERANCE[case.dtype]} (the "
                       f"shortest {wrong[0]} keys; worst {errors[worst_context]:.2e} at {worst_context})")

    ways: dict[int, set[str]] = {}  # context of a row -> how it was computed
    first_seen: dict[int, tuple[Run, np.ndarray]] = {}  # context of a row -> the first run that computed it
    identical = 0
    for run, start in zip(runs, query_start, strict=False):
        for i in range(run.q_len):
            row_context = run.context - run.q_len + i + 1
            ways.setdefault(row_context, set()).add(run.kind)
            if row_context in first_seen:
                other, expected = first_seen[row_context]
                np.testing.assert_array_equal(
                    out[start + i], expected, err_msg=f"the row at context {row_context}: {run.kind} ending at "
                                                      f"{run.context} vs {other.kind} ending at {other.context}")
                identical += 1
            else:
                first_seen[row_context] = (run, out[start + i])
    for length in SWEEP:  # every length was computed as a decode, as a chunk's last row, and in the full prefill
        expected_ways = {run.kind for run in runs if run.context == length or
                         (run.kind == "prefill" and length <= FULL_PREFILL)}
        assert ways[length] == expected_ways and len(expected_ways) >= 2, (length, ways[length])

    print(f"{case} with {kv_heads} KV / {heads} query heads: {len(errors)} contexts against float64 (worst "
          f"relative error {errors[worst_context]:.1e}, at {worst_context} keys); {identical} rows bit-identical to "
          f"the same row computed another way")
    assert set(SWEEP) <= set(errors) and len(set(SWEEP)) == len(SWEEP) == PART_KEYS + 2
