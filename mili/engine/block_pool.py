"""A fixed pool of KV-cache blocks with reference counts.

Every block is either free (on the free list, count 0) or held by one or more owners: running sequences
and the radix prefix cache each hold one reference per block they use. `alloc` and `release` are O(1) per
block. The pool never decides what to evict; the radix cache does, and releases its references here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the caller may evict or preempt, then retry)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def alloc(self, count: int) -> list[int]:
        """`count` fresh blocks, each with one reference (the caller's)."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            raise OutOfBlocks(f"asked for {count} KV blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    def retain(self, blocks: Iterable[int]) -> None:
        """One more reference to each of `blocks` (all must be in use)."""
        for block in blocks:
            if self._ref_counts[block] <= 0:
                raise ValueError(f"block {block} is free; only blocks in use can be shared")
            self._ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drops one reference to each of `blocks`; a block whose last reference goes is free again."""
        for block in blocks:
            count = self._ref_counts[block]
            if count <= 0:
                raise ValueError(f"block {block} released more often than it was taken")
            self._ref_counts[block] = count - 1
            if count == 1:
                self._free.append(block)
