"""BlockPool: allocation, sharing and release of reference-counted KV blocks."""

from __future__ import annotations

import pytest

from mili.engine.block_pool import BlockPool, OutOfBlocks


def test_alloc_share_release_cycle():
    pool = BlockPool(5)
    a = pool.alloc(3)
    assert len(set(a)) == 3 and pool.num_free == 2 and pool.num_used == 3
    pool.retain(a[:2])                      # a second owner of two of them
    pool.release(a)                         # the first owner lets go of all three
    assert pool.num_free == 3 and [pool.ref_count(b) for b in a] == [1, 1, 0]
    pool.release(a[:2])
    assert pool.num_free == 5


def test_running_out_is_an_error_that_changes_nothing():
    pool = BlockPool(2)
    pool.alloc(1)
    with pytest.raises(OutOfBlocks, match="asked for 2 KV blocks, 1 free of 2"):
        pool.alloc(2)
    assert pool.num_free == 1


def test_misuse_is_caught():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="is free"):
        pool.retain([0])
    with pytest.raises(ValueError, match="released more often"):
        pool.release([1])
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
