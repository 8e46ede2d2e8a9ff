"""Paged KV store + flash attention vs float64 numpy, on ragged batches mixing prefill, chunked prefill,
decode and speculative verification, with GQA ratios 1/2/4/8, random non-contiguous block tables,
padding slots, and NaN-poisoned cache slots that no sequence owns (reading one would poison the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from max.driver import Buffer
from max.dtype import DType

from mili.dtypes import numpy_to_buffer, to_numpy_f32
from mili.model.kv_layout import KVCacheShape
from tests.kernels import reference as ref
from tests.kernels.graphs import ATTENTION_CASES, NUM_LAYERS, AttentionCase

TOLERANCE = {DType.float32: 1e-4, DType.bfloat16: 1e-2}
LAYER = 1


@dataclass
class Scenario:
    name: str
    kv_heads: int
    heads: int
    seqs: list[tuple[int, int]]  # (q_len, context_len)
    padding: int = 0  # extra K/V rows with slot -1


SCENARIOS = [
    Scenario("mixed-gqa2", 2, 4, [(5, 5), (1, 37), (3, 100), (20, 20), (4, 1001)], padding=3),
    Scenario("prefill-mha", 3, 3, [(77, 77), (1, 1)]),
    Scenario("chunks-gqa4", 2, 8, [(33, 90), (7, 7), (16, 49)], padding=1),
    Scenario("decode-batch-gqa8", 1, 8, [(1, n) for n in (1, 15, 16, 17, 250, 1200)]),
    Scenario("long-decode-split", 2, 4, [(1, 1500)]),
    Scenario("verify-gqa2", 2, 4, [(4, 300), (4, 4), (6, 1023)]),
    Scenario("long-prefill-gqa2", 2, 4, [(301, 301), (150, 613)]),  # many softmax steps per row
]


def run_scenario(model, case: AttentionCase, sc: Scenario, rng):
    bs, d = case.block_size, case.head_dim
    blocks_needed = sum(-(-ctx // bs) for _, ctx in sc.seqs)
    num_blocks = blocks_needed + 5  # a few blocks no one owns
    shape = KVCacheShape(NUM_LAYERS, num_blocks, sc.kv_heads, bs, d)
    cache = np.full(shape.shape, np.nan, np.float32)  # poison: only owned slots get values
    order = rng.permutation(num_blocks)
    tables, ks, vs, qs = [], [], [], []
    new_k, new_v, slots = [], [], []
    used = 0
    for q_len, ctx in sc.seqs:
        n = -(-ctx // bs)
        blocks = order[used:used + n]
        used += n
        tables.append(blocks)
        k = ref.as_dtype(rng.standard_normal((ctx, sc.kv_heads, d)), case.dtype)
        v = ref.as_dtype(rng.standard_normal((ctx, sc.kv_heads, d)), case.dtype)
        ks.append(k)
        vs.append(v)
        qs.append(ref.as_dtype(rng.standard_normal((q_len, sc.heads, d)), case.dtype))
        for pos in range(ctx):
            slot = int(blocks[pos // bs]) * bs + pos % bs
            if pos < ctx - q_len:
                shape.write(cache, LAYER, slot, k[pos], v[pos])  # already cached
            else:
                new_k.append(k[pos])
                new_v.append(v[pos])
                slots.append(slot)
    for _ in range(sc.padding):  # padding rows: garbage K/V that must not land anywhere
        new_k.append(np.full((sc.kv_heads, d), 7.0, np.float32))
        new_v.append(np.full((sc.kv_heads, d), 7.0, np.float32))
        slots.append(-1)
    # The other layers hold finite values: a wrong layer offset would read them instead of NaN-free data.
    for layer in range(NUM_LAYERS):
        if layer != LAYER:
            cache[layer] = ref.as_dtype(rng.standard_normal(cache[layer].shape), case.dtype)
    max_blocks = max(len(t) for t in tables) + 2
    block_tables = np.full((len(sc.seqs), max_blocks), -1, np.int32)
    for i, t in enumerate(tables):
        block_tables[i, :len(t)] = t
    query_start = np.concatenate([[0], np.cumsum([q for q, _ in sc.seqs])]).astype(np.int32)
    context_lens = np.array([c for _, c in sc.seqs], np.int32)

    expected_cache = cache.copy()
    for kk, vv, slot in zip(new_k, new_v, slots, strict=True):
        if slot >= 0:
            shape.write(expected_cache, LAYER, slot, kk, vv)

    cache_buffer = numpy_to_buffer(cache, case.dtype)
    out = model.execute(
        cache_buffer, numpy_to_buffer(np.stack(new_k), case.dtype), numpy_to_buffer(np.stack(new_v), case.dtype),
        Buffer.from_numpy(np.array(slots, np.int32)), numpy_to_buffer(np.concatenate(qs), case.dtype),
        Buffer.from_numpy(np.array([LAYER], np.int32)), Buffer.from_numpy(query_start),
        Buffer.from_numpy(context_lens), Buffer.from_numpy(block_tables),
    )[0]
    return to_numpy_f32(out), to_numpy_f32(cache_buffer), expected_cache, (qs, ks, vs, query_start)


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"{c.dtype}-bs{c.block_size}-d{c.head_dim}")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_store_and_attention_match_float64(attention_models, case, scenario, rng):
    out, cache_after, expected_cache, (qs, ks, vs, query_start) = run_scenario(
        attention_models[case], case, scenario, rng)
    # The whole cache: new tokens at their slots, everything else (NaN poison included) untouched.
    np.testing.assert_array_equal(cache_after, ref.as_dtype(expected_cache, case.dtype))
    worst = 0.0
    for b, (q_len, _) in enumerate(scenario.seqs):
        got = out[query_start[b]:query_start[b + 1]]
        assert not np.isnan(got).any(), f"sequence {b} read a slot it does not own"
        worst = max(worst, ref.relative_error(got, ref.attention(qs[b], ks[b], vs[b], q_len)))
    assert worst <= TOLERANCE[case.dtype], f"relative error {worst:.2e}"


def test_bad_block_table_is_rejected(attention_models):
    case = ATTENTION_CASES[0]
    model = attention_models[case]
    shape = KVCacheShape(NUM_LAYERS, 4, 1, case.block_size, case.head_dim)
    cache = Buffer.from_numpy(np.zeros(shape.shape, np.float32))
    d = case.head_dim

    def run(block_table, context_len, slots=(0,)):
        return model.execute(
            cache, Buffer.from_numpy(np.zeros((len(slots), 1, d), np.float32)),
            Buffer.from_numpy(np.zeros((len(slots), 1, d), np.float32)), Buffer.from_numpy(np.array(slots, np.int32)),
            Buffer.from_numpy(np.zeros((1, 2, d), np.float32)), Buffer.from_numpy(np.array([LAYER], np.int32)),
            Buffer.from_numpy(np.array([0, 1], np.int32)), Buffer.from_numpy(np.array([context_len], np.int32)),
            Buffer.from_numpy(np.array([block_table], np.int32)))

    run([0, 1], 3)  # a valid call works
    with pytest.raises(Exception, match="is not a cache block"):
        run([9, 1], 3)
    with pytest.raises(Exception, match="needs 3 blocks, its table has 2"):
        run([0, 1], 2 * case.block_size + 1)
    with pytest.raises(Exception, match="context_len 0 is less than its 1 new tokens"):
        run([0, 1], 0)
    with pytest.raises(Exception, match="outside the KV cache"):
        run([0, 1], 3, slots=(4 * case.block_size,))


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: f"{c.dtype}-bs{c.block_size}-d{c.head_dim}")
def test_verification_rows_are_bit_identical_to_decodes(attention_models, case, rng):
    """Speculative decoding relies on it: each of a sequence's k + 1 verification rows gives exactly the bits of
    a decode of that row alone (context = its own limit), at contexts long enough to split the key range
    (decodes of 525..530 keys vs a verification whose last row sees 530), next to another sequence."""
    bs, d, kv_heads, heads = case.block_size, case.head_dim, 2, 4
    q_len, context = 6, 530
    num_blocks = -(-context // bs) + 4
    shape = KVCacheShape(NUM_LAYERS, num_blocks, kv_heads, bs, d)
    cache = ref.as_dtype(rng.standard_normal(shape.shape), case.dtype)
    table = rng.permutation(num_blocks).astype(np.int32)
    q = numpy_to_buffer(ref.as_dtype(rng.standard_normal((q_len + 1, heads, d)), case.dtype), case.dtype)
    no_new_kv = numpy_to_buffer(np.zeros((1, kv_heads, d), np.float32), case.dtype)

    def attend(q_rows, query_start, context_lens, tables):
        return to_numpy_f32(attention_models[case].execute(
            numpy_to_buffer(cache, case.dtype), no_new_kv, no_new_kv, Buffer.from_numpy(np.array([-1], np.int32)),
            q_rows, Buffer.from_numpy(np.array([LAYER], np.int32)),
            Buffer.from_numpy(np.array(query_start, np.int32)), Buffer.from_numpy(np.array(context_lens, np.int32)),
            Buffer.from_numpy(np.array(tables, np.int32)))[0])

    q_all = to_numpy_f32(q)
    # the verification: rows 0..5 of sequence 0; row 6 is a decode of sequence 1 over 37 keys, same blocks
    verify = attend(q, [0, q_len, q_len + 1], [context, 37], [table, table])
    compared = 0
    for i in range(q_len):
        alone = attend(numpy_to_buffer(q_all[i:i + 1], case.dtype), [0, 1], [context - q_len + i + 1], [table])
        np.testing.assert_array_equal(verify[i], alone[0], err_msg=f"verification row {i}")
        compared += alone.size
    assert compared == q_len * heads * d
    assert np.isfinite(verify).all()
