"""BlockPool: one owner per block; allocation, return, and misuse caught at once."""

from __future__ import annotations

import pytest

from mili.engine.block_pool import BlockPool, OutOfBlocks


def test_alloc_and_free_cycle():
    pool = BlockPool(5)
    a = pool.alloc(3)
    assert len(set(a)) == 3 and pool.num_free == 2 and pool.num_used == 3
    assert not any(pool.is_free(b) for b in a)
    pool.free(a[:2])
    assert pool.num_free == 4 and pool.is_free(a[0]) and not pool.is_free(a[2])
    pool.free(a[2:])
    assert pool.num_free == 5


def test_running_out_is_an_error_that_changes_nothing():
    pool = BlockPool(2)
    pool.alloc(1)
    with pytest.raises(OutOfBlocks, match="asked for 2 KV blocks, 1 free of 2"):
        pool.alloc(2)
    assert pool.num_free == 1


def test_misuse_is_caught():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([1])
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
    with pytest.raises(ValueError, match="cannot allocate -1"):
        pool.alloc(-1)
