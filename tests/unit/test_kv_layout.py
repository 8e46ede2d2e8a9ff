"""The KV cache layout the kernels and the host share (mili/model/kv_layout.py, mojo_kernels/kv_cache.mojo):
where each element of a token's K and V lands inside its block, and that every way of writing agrees with
reading back."""

import numpy as np
import pytest

from mili.model.kv_layout import V_CHUNK, KVCacheShape

SEED = 29


def test_elements_land_where_the_layout_says():
    """K dim-major [head_dim, block_size]; V chunk-major [head_dim / 32, block_size, 32] for head_dim 64."""
    shape = KVCacheShape(num_layers=2, num_blocks=3, kv_heads=2, block_size=8, head_dim=64)
    cache = np.zeros(shape.shape, np.float32)
    k = np.arange(2 * 64, dtype=np.float32).reshape(2, 64) + 1
    v = -k
    shape.write(cache, layer=1, slot=8 + 5, k=k, v=v)  # block 1, offset 5
    for head in range(2):
        k_block = cache[1, 0, 1, head]
        v_block = cache[1, 1, 1, head]
        for dim in (0, 31, 32, 63):
            assert k_block[dim * 8 + 5] == k[head, dim]
            assert v_block[(dim // V_CHUNK) * 8 * V_CHUNK + 5 * V_CHUNK + dim % V_CHUNK] == v[head, dim]
    assert np.count_nonzero(cache) == 2 * k.size  # nothing else was touched


def test_head_dim_not_a_multiple_of_the_chunk_stays_token_major():
    shape = KVCacheShape(num_layers=1, num_blocks=2, kv_heads=1, block_size=4, head_dim=40)
    assert shape.v_chunk == 40
    cache = np.zeros(shape.shape, np.float32)
    v = np.arange(40, dtype=np.float32).reshape(1, 40) + 1
    shape.write(cache, layer=0, slot=6, k=np.zeros((1, 40), np.float32), v=v)
    np.testing.assert_array_equal(cache[0, 1, 1, 0].reshape(4, 40)[2], v[0])


@pytest.mark.parametrize("head_dim", [128, 64, 40])
def test_write_blocks_and_write_agree_with_read(head_dim):
    print(f"seed {SEED}")
    rng = np.random.default_rng(SEED)
    shape = KVCacheShape(num_layers=2, num_blocks=6, kv_heads=3, block_size=8, head_dim=head_dim)
    blocks = np.array([4, 0, 5])
    k = rng.standard_normal((24, 3, head_dim)).astype(np.float32)
    v = rng.standard_normal((24, 3, head_dim)).astype(np.float32)
    by_blocks = np.zeros(shape.shape, np.float32)
    shape.write_blocks(by_blocks, 1, blocks, k, v)
    by_tokens = np.zeros(shape.shape, np.float32)
    compared = 0
    for position in range(24):
        slot = int(blocks[position // 8]) * 8 + position % 8
        shape.write(by_tokens, 1, slot, k[position], v[position])
        got_k, got_v = shape.read(by_blocks, 1, slot)
        np.testing.assert_array_equal(got_k, k[position])
        np.testing.assert_array_equal(got_v, v[position])
        compared += 1
    assert compared == 24
    np.testing.assert_array_equal(by_blocks, by_tokens)
