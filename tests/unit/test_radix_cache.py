"""RadixCache on its own: match/insert/split/evict/lock, salts, and a randomised run against a simple model."""

from __future__ import annotations

import random

import pytest

from mili.engine.block_pool import BlockPool
from mili.engine.block_audit import audit_blocks
from mili.engine.radix_cache import RadixCache

BS = 4


def cache_with(num_blocks: int = 32, enabled: bool = True) -> RadixCache:
    return RadixCache(BlockPool(num_blocks), BS, enabled)


def start_request(cache: RadixCache, tokens: list[int], salt=None):
    """What the scheduler does: lock the cached prefix, allocate private blocks for the rest."""
    match = cache.match(tokens, salt)
    node = cache.acquire(match) if match.num_tokens else None
    blocks = list(match.blocks) + cache.pool.alloc(-(-len(tokens) // BS) - len(match.blocks))
    return node, blocks, len(match.blocks)


def end_request(cache: RadixCache, tokens: list[int], node, blocks: list[int], shared: int, salt=None) -> list[int]:
    """What the scheduler does when a request ends: cache its whole blocks (the tree adopts them or already
    has them: then ours are duplicates), free the rest, unlock. Returns the blocks now holding its prefix."""
    _, tree_blocks = cache.insert(tokens, blocks, salt)
    duplicates = [b for b, t in zip(blocks[shared:len(tree_blocks)], tree_blocks[shared:]) if b != t]
    cache.pool.free(duplicates + blocks[len(tree_blocks):])
    if node is not None:
        cache.release(node)
    return tree_blocks


def finish_request(cache: RadixCache, tokens: list[int], salt=None) -> list[int]:
    blocks = end_request(cache, tokens, *start_request(cache, tokens, salt), salt=salt)
    audit_blocks(cache.pool, cache, [])
    return blocks


def test_match_never_covers_the_whole_prompt_and_does_not_change_the_tree():
    cache = cache_with()
    tokens = list(range(12))                        # exactly three blocks
    finish_request(cache, tokens)
    nodes_before = [(n.tokens, n.last_access) for n in cache.nodes()]
    match = cache.match(tokens)
    assert match.num_tokens == 8 and len(match.blocks) == 2  # the last block is recomputed
    assert cache.match(tokens + [99]).num_tokens == 12
    assert [(n.tokens, n.last_access) for n in cache.nodes()] == nodes_before  # match only reads


def test_partial_match_splits_an_edge_only_when_acquired():
    cache = cache_with()
    first = finish_request(cache, list(range(16)))
    other = list(range(8)) + [50, 51, 52, 53, 54, 55, 56, 57, 58]
    match = cache.match(other)
    assert match.num_tokens == 8 and list(match.blocks) == first[:2] and match.blocks_in_node == 2
    assert sum(1 for _ in cache.nodes()) == 2       # root + one edge: not split yet
    node = cache.acquire(match)
    assert node.blocks == first[:2] and node.lock_count == 1 and sum(1 for _ in cache.nodes()) == 3
    cache.release(node)
    finish_request(cache, other)
    assert list(cache.match(list(range(16)) + [1]).blocks) == first  # both branches still there
    assert cache.match(other + [1]).num_tokens == 16
    assert cache.usage().cached_blocks == 4 + 2


def test_insert_of_an_already_cached_prefix_keeps_the_trees_blocks():
    cache = cache_with()
    tokens = list(range(9))
    kept = finish_request(cache, tokens)
    blocks = cache.pool.alloc(3)  # the same tokens computed again without using the cache
    assert end_request(cache, tokens, None, blocks, 0) == kept  # ours were duplicates: freed
    audit_blocks(cache.pool, cache, [])
    assert cache.pool.num_free == cache.pool.num_blocks - 2


def test_lru_eviction_spares_locked_and_recent_prefixes():
    cache = cache_with(num_blocks=6)
    old, mid, new = [1] * 8, [2] * 8, [3] * 8
    for tokens in (old, mid, new):
        finish_request(cache, tokens)
    assert cache.pool.num_free == 0
    held = cache.acquire(cache.match(mid + [0]))
    cache.release(cache.acquire(cache.match(old + [0])))  # touching `old` makes `new` the least recently used
    assert cache.evict(2) == 2
    assert cache.match(new + [0]).num_tokens == 0
    assert cache.match(old + [0]).num_tokens == 8
    assert cache.evict(10) == 2             # only `old` is left to evict; `mid` is locked
    assert cache.match(mid + [0]).num_tokens == 8
    cache.release(held)
    assert cache.evict(10) == 2 and cache.pool.num_free == 6


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


def test_audit_catches_a_leaked_block_and_a_stray_lock():
    cache = cache_with()
    finish_request(cache, list(range(9)))
    lost = cache.pool.alloc(1)  # owned by nobody the audit is told about
    with pytest.raises(AssertionError, match="1 KV blocks have no owner"):
        audit_blocks(cache.pool, cache, [])
    cache.pool.free(lost)
    cache.lock(cache.acquire(cache.match(list(range(9)))))
    with pytest.raises(AssertionError, match="locks"):
        audit_blocks(cache.pool, cache, [])


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


def test_random_operations_agree_with_a_set_of_prefixes(seed):
    """Requests starting and ending, and evictions, in random order; after every step the tree matches
    exactly what a plain set of cached prefixes says, and every block has one owner."""
    rng = random.Random(seed)
    cache = cache_with(num_blocks=40)
    model: set[tuple[int, ...]] = set()
    running = []  # (tokens, node, blocks, shared)
    for _ in range(2000):
        tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 24))]  # tiny alphabet: many shared prefixes
        action = rng.random()
        if action < 0.45:
            match = cache.match(tokens)
            assert match.num_tokens == longest_cached_prefix(model, tokens), seed
            needed = -(-len(tokens) // BS) - len(match.blocks)
            node = cache.acquire(match) if match.num_tokens else None  # before evicting, or the match may go
            if needed > cache.pool.num_free:
                cache.evict(needed - cache.pool.num_free)
                model = tree_prefixes(cache)
            if needed > cache.pool.num_free:
                if node is not None:
                    cache.release(node)
                continue
            running.append((tokens, node, list(match.blocks) + cache.pool.alloc(needed), len(match.blocks)))
        elif action < 0.8 and running:
            tokens, node, blocks, shared = running.pop(rng.randrange(len(running)))
            end_request(cache, tokens, node, blocks, shared)
            model |= {tuple(tokens[:end]) for end in range(BS, len(tokens) // BS * BS + 1, BS)}
        else:
            before = cache.pool.num_free
            freed = cache.evict(rng.randrange(1, 8))
            assert cache.pool.num_free == before + freed
            model = tree_prefixes(cache)
        assert tree_prefixes(cache) == model, seed
    for tokens, node, blocks, shared in running:
        end_request(cache, tokens, node, blocks, shared)
    audit_blocks(cache.pool, cache, [])
    cache.clear()
    assert cache.pool.num_free == cache.pool.num_blocks
