"""The free list of KV-cache blocks.

Every block has exactly one owner at any time: this pool (free), the radix prefix cache (a cached prefix,
shared by whoever locks it), or one sequence (its private blocks). Ownership moves, it is never shared,
so there are no reference counts to keep consistent: `alloc` hands blocks out, `free` takes them back, and
freeing a block that is already free is an error caught at once.
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
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = bytearray(b"\x01") * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def is_free(self, block: int) -> bool:
        return bool(self._is_free[block])

    def alloc(self, count: int) -> list[int]:
        """`count` free blocks, now owned by the caller."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            raise OutOfBlocks(f"asked for {count} KV blocks, {len(self._free)} free of {self.num_blocks}")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._is_free[block] = 0
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        """Takes blocks back from their owner."""
        for block in blocks:
            if self._is_free[block]:
                raise ValueError(f"KV block {block} freed twice")
            self._is_free[block] = 1
            self._free.append(block)
