"""RadixCache on its own: match/insert/split/evict/lock, salts, and a randomised run against a simple model."""

from __future__ import annotations

import random

import pytest

from mili.engine.block_pool import BlockPool
from mili.engine.radix_cache import RadixCache

BS = 4


def cache_with(num_blocks: int = 32, enabled: bool = True) -> RadixCache:
    return RadixCache(BlockPool(num_blocks), BS, enabled)


def finish_request(cache: RadixCache, tokens: list[int], salt=None) -> list[int]:
    """What the engine does for one request: match, lock, compute the rest, insert, release, unlock."""
    match = cache.match(tokens, salt)
    cache.lock(match.node)
    cache.pool.retain(match.blocks)
    fresh = cache.pool.alloc(-(-len(tokens) // BS) - len(match.blocks))
    blocks = match.blocks + fresh
    cache.insert(tokens, blocks, salt)
    cache.pool.release(blocks)
    cache.unlock(match.node)
    cache.check()
    return blocks


def test_match_never_covers_the_whole_prompt():
    cache = cache_with()
    tokens = list(range(12))                        # exactly three blocks
    finish_request(cache, tokens)
    match = cache.match(tokens)
    assert match.num_tokens == 8 and len(match.blocks) == 2  # the last block is recomputed
    assert cache.match(tokens + [99]).num_tokens == 12


def test_partial_match_splits_an_edge_and_keeps_the_first_blocks():
    cache = cache_with()
    first = finish_request(cache, list(range(16)))
    other = list(range(8)) + [50, 51, 52, 53, 54, 55, 56, 57, 58]
    match = cache.match(other)
    assert match.num_tokens == 8 and match.blocks == first[:2]
    finish_request(cache, other)
    assert cache.match(list(range(16)) + [1]).blocks == first  # both branches still there
    assert cache.match(other + [1]).num_tokens == 16
    assert cache.usage().cached_blocks == 4 + 2


def test_lru_eviction_spares_locked_and_recent_prefixes():
    cache = cache_with(num_blocks=6)
    old, mid, new = [1] * 8, [2] * 8, [3] * 8
    for tokens in (old, mid, new):
        finish_request(cache, tokens)
    assert cache.pool.num_free == 0
    held = cache.match(mid + [0])
    cache.lock(held.node)
    cache.match(old + [0])                  # touching `old` makes `new` the least recently used unlocked
    assert cache.evict(2) == 2
    assert cache.match(new + [0]).num_tokens == 0
    assert cache.match(old + [0]).num_tokens == 8
    assert cache.evict(10) == 2             # only `old` is left to evict; `mid` is locked
    assert cache.match(mid + [0]).num_tokens == 8
    cache.unlock(held.node)
    assert cache.evict(10) == 2 and cache.pool.num_free == 6
    cache.check()


def test_salts_never_share_blocks():
    cache = cache_with()
    tokens = list(range(9))
    finish_request(cache, tokens, salt="alice")
    assert cache.match(tokens, salt="bob").num_tokens == 0
    assert cache.match(tokens, salt="alice").num_tokens == 8
    assert cache.match(tokens).num_tokens == 0


def test_disabled_cache_matches_nothing_and_holds_nothing():
    cache = cache_with(enabled=False)
    finish_request(cache, list(range(9)))
    assert cache.match(list(range(9))).num_tokens == 0
    assert cache.pool.num_free == cache.pool.num_blocks


def test_check_catches_a_leaked_reference():
    cache = cache_with()
    finish_request(cache, list(range(9)))
    cache.pool.retain(cache.match(list(range(9))).blocks)  # a holder the check is not told about
    with pytest.raises(AssertionError, match="pool counts 2 references, owners hold 1"):
        cache.check()


def longest_cached_prefix(model: set[tuple[int, ...]], tokens: list[int]) -> int:
    limit = (len(tokens) - 1) // BS * BS
    best = 0
    for end in range(BS, limit + 1, BS):
        if tuple(tokens[:end]) in model:
            best = end
    return best


def tree_prefixes(cache: RadixCache) -> set[tuple[int, ...]]:
    """Every whole-block prefix the tree holds (for the default salt)."""
    found: set[tuple[int, ...]] = set()
    stack = [(cache.root(), ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            label = prefix + child.tokens
            found.update(label[:end] for end in range(len(prefix) + BS, len(label) + 1, BS))
            stack.append((child, label))
    return found


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_agree_with_a_set_of_prefixes(seed):
    """Inserts, matches, evictions and concurrent holders in random order; after every step the tree
    matches exactly what a plain set of cached prefixes says, and the pool bookkeeping checks out."""
    rng = random.Random(seed ^ random.getrandbits(32))
    cache = cache_with(num_blocks=40)
    model: set[tuple[int, ...]] = set()
    running: list[tuple[list[int], object]] = []  # requests holding blocks: (blocks, locked node)
    for _ in range(400):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 24))]  # tiny alphabet: many shared prefixes
        action = rng.random()
        if action < 0.45:
            match = cache.match(tokens)
            assert match.num_tokens == longest_cached_prefix(model, tokens)
            needed = -(-len(tokens) // BS) - len(match.blocks)
            cache.lock(match.node)  # before evicting to make room, or the match itself may go
            if needed > cache.pool.num_free:
                cache.evict(needed - cache.pool.num_free)
                model = tree_prefixes(cache)
                if needed > cache.pool.num_free:
                    cache.unlock(match.node)
                    continue
            cache.pool.retain(match.blocks)
            blocks = match.blocks + cache.pool.alloc(needed)
            node = cache.insert(tokens, blocks)
            cache.lock(node)
            cache.unlock(match.node)
            model |= {tuple(tokens[:end]) for end in range(BS, len(tokens) // BS * BS + 1, BS)}
            running.append((blocks, node))
        elif action < 0.8 and running:
            blocks, node = running.pop(rng.randrange(len(running)))
            cache.pool.release(blocks)
            cache.unlock(node)
        else:
            before = cache.pool.num_free
            freed = cache.evict(rng.randrange(1, 8))
            assert cache.pool.num_free == before + freed
            model = tree_prefixes(cache)
        cache.check(blocks for blocks, _ in running)
        assert tree_prefixes(cache) == model
    for blocks, node in running:
        cache.pool.release(blocks)
        cache.unlock(node)
    cache.clear()
    assert cache.pool.num_free == cache.pool.num_blocks
