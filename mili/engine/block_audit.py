"""A full audit of the KV block bookkeeping, for tests and debug mode (the engine runs it when idle with
`debug_checks`, the tests after every step): every block has exactly one owner, and every lock in the
prefix cache belongs to a sequence that reads that prefix."""

from __future__ import annotations

from collections.abc import Iterable

from mili.engine.block_pool import BlockPool
from mili.engine.radix_cache import RadixCache
from mili.engine.sequence import Sequence


def audit_blocks(pool: BlockPool, cache: RadixCache, sequences: Iterable[Sequence]) -> None:
    """Raises AssertionError naming the first broken rule."""
    owner: dict[int, str] = {b: "the free list" for b in range(pool.num_blocks) if pool.is_free(b)}

    def claim(block: int, who: str) -> None:
        if block in owner:
            raise AssertionError(f"KV block {block} is owned by {owner[block]} and by {who}")
        owner[block] = who

    expected_locks: dict[int, int] = {}
    for node in cache.nodes():
        if not node.is_root and len(node.tokens) != len(node.blocks) * cache.block_size:
            raise AssertionError("a prefix-cache edge is not a whole number of blocks")
        for block in node.blocks:
            claim(block, "the prefix cache")
    for seq in sequences:
        shared = seq.blocks[:seq.num_shared_blocks]
        if seq.cache_node is None:
            if shared:
                raise AssertionError(f"sequence {seq.seq_id} uses cached blocks without a lock")
        else:
            if cache.path_blocks(seq.cache_node) != shared:
                raise AssertionError(f"sequence {seq.seq_id}'s shared blocks are not its locked prefix")
            node = seq.cache_node
            while node is not None:
                expected_locks[id(node)] = expected_locks.get(id(node), 0) + 1
                node = node.parent
        for block in seq.blocks[seq.num_shared_blocks:]:
            claim(block, f"sequence {seq.seq_id}")
        if len(seq.blocks) * cache.block_size < seq.num_computed:
            raise AssertionError(f"sequence {seq.seq_id} has fewer blocks than computed tokens")
    if len(owner) != pool.num_blocks:
        raise AssertionError(f"{pool.num_blocks - len(owner)} KV blocks have no owner (leaked)")
    for node in cache.nodes():
        if node.lock_count != expected_locks.get(id(node), 0):
            raise AssertionError(f"a prefix-cache node has {node.lock_count} locks, sequences hold "
                                 f"{expected_locks.get(id(node), 0)}")
