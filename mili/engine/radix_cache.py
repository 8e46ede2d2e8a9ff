"""RadixAttention-style prefix cache: a radix tree over token ids at KV-block granularity.

Each edge holds whole blocks: a label of `k * block_size` token ids and the `k` KV blocks that hold those
tokens' keys and values. The tree owns one pool reference per block it holds. A request that reuses a
cached prefix `lock`s the node where its match ends (so nothing on the path can be evicted) and takes its
own references to the blocks; when it finishes, `insert` adds what it computed and it unlocks.

- `match` finds the longest cached prefix in whole blocks, and never the whole prompt: at least one token
  is always left to compute (its logits are needed). A match that ends inside an edge splits it.
- `evict` frees unlocked leaves, least recently used first, until enough blocks are free. Lock a match
  before evicting to make room for the rest of its request, or the match itself may be evicted.
- Requests with different `salt`s never share blocks: each salt has its own tree.
- `check` verifies the bookkeeping against the pool (tests, and the engine in debug mode).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from mili.engine.block_pool import BlockPool


@dataclass(eq=False)
class RadixNode:
    tokens: tuple[int, ...]  # this edge's label: a whole number of blocks' tokens (empty at a root)
    blocks: list[int]        # the KV blocks of those tokens, one per block
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)  # keyed by their first block
    lock_count: int = 0      # requests using this node or a descendant
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class PrefixMatch:
    node: RadixNode      # where the match ends: lock it while the blocks are in use
    blocks: list[int]    # cached blocks covering the first `num_tokens` tokens
    num_tokens: int


@dataclass(frozen=True)
class CacheUsage:
    cached_blocks: int     # blocks the tree holds
    evictable_blocks: int  # held by the tree alone, in unlocked nodes: freed by eviction


class RadixCache:
    def __init__(self, pool: BlockPool, block_size: int, enabled: bool = True) -> None:
        self.pool = pool
        self.block_size = block_size
        self.enabled = enabled
        self._roots: dict[Hashable, RadixNode] = {}
        self._clock = itertools.count(1)

    def root(self, salt: Hashable = None) -> RadixNode:
        if salt not in self._roots:
            self._roots[salt] = RadixNode((), [], None)
        return self._roots[salt]

    # ------------------------------------------------------------------ lookups

    def match(self, tokens: Sequence[int], salt: Hashable = None) -> PrefixMatch:
        """The longest cached prefix of `tokens` in whole blocks, leaving at least one token uncached."""
        node = self.root(salt)
        if not self.enabled:
            return PrefixMatch(node, [], 0)
        limit = (len(tokens) - 1) // self.block_size * self.block_size
        blocks: list[int] = []
        now = next(self._clock)
        node.last_access = now
        matched = 0
        while matched < limit:
            child = node.children.get(tuple(tokens[matched:matched + self.block_size]))
            if child is None:
                break
            common = self._common_blocks(child.tokens, tokens[matched:limit])
            if common < len(child.blocks):
                child = self._split(child, common)
            child.last_access = now
            blocks.extend(child.blocks)
            matched += len(child.tokens)
            node = child
        return PrefixMatch(node, blocks, matched)

    def _common_blocks(self, label: Sequence[int], tokens: Sequence[int]) -> int:
        """How many whole blocks `label` and `tokens` share from their start."""
        bs = self.block_size
        count = 0
        while (count + 1) * bs <= min(len(label), len(tokens)) and \
                tuple(label[count * bs:(count + 1) * bs]) == tuple(tokens[count * bs:(count + 1) * bs]):
            count += 1
        return count

    def _split(self, node: RadixNode, keep_blocks: int) -> RadixNode:
        """Splits `node`'s edge after `keep_blocks` blocks; returns the new upper node."""
        cut = keep_blocks * self.block_size
        upper = RadixNode(node.tokens[:cut], node.blocks[:keep_blocks], node.parent,
                          lock_count=node.lock_count, last_access=node.last_access)
        assert node.parent is not None
        node.parent.children[node.tokens[:self.block_size]] = upper
        node.tokens, node.blocks, node.parent = node.tokens[cut:], node.blocks[keep_blocks:], upper
        upper.children[node.tokens[:self.block_size]] = node
        return upper

    # ------------------------------------------------------------------ updates

    def insert(self, tokens: Sequence[int], blocks: Sequence[int], salt: Hashable = None) -> RadixNode:
        """Caches the whole blocks of `tokens` (KV in `blocks`); returns the node where they end.

        Parts already cached keep the tree's blocks (the caller still holds, and later releases, its own
        copies); new parts are added with one new pool reference per block.
        """
        node = self.root(salt)
        if not self.enabled:
            return node
        usable = min(len(tokens) // self.block_size, len(blocks)) * self.block_size
        now = next(self._clock)
        done = 0
        while done < usable:
            key = tuple(tokens[done:done + self.block_size])
            child = node.children.get(key)
            if child is None:
                first = done // self.block_size
                new_blocks = list(blocks[first:usable // self.block_size])
                self.pool.retain(new_blocks)
                child = RadixNode(tuple(tokens[done:usable]), new_blocks, node, last_access=now)
                node.children[key] = child
                return child
            common = self._common_blocks(child.tokens, tokens[done:usable])
            if common < len(child.blocks):
                child = self._split(child, common)
            child.last_access = now
            done += len(child.tokens)
            node = child
        return node

    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not None:
            if node.lock_count <= 0:
                raise ValueError("unlocking a prefix-cache node that is not locked")
            node.lock_count -= 1
            node = node.parent

    def evict(self, num_blocks: int) -> int:
        """Drops unlocked leaves, least recently used first, until `num_blocks` blocks became free
        (or nothing evictable is left); returns how many blocks it freed."""
        order = itertools.count()  # tie-break equal access times without comparing nodes
        heap = [(leaf.last_access, next(order), leaf) for leaf in self._leaves() if leaf.lock_count == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.tokens[:self.block_size]]
            before = self.pool.num_free
            self.pool.release(leaf.blocks)
            freed += self.pool.num_free - before
            if not parent.is_root and not parent.children and parent.lock_count == 0:
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return freed

    def clear(self) -> None:
        """Evicts everything unlocked."""
        self.evict(self.pool.num_blocks)

    # ------------------------------------------------------------------ accounting

    def _nodes(self) -> Iterable[RadixNode]:
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self) -> Iterable[RadixNode]:
        return (n for n in self._nodes() if not n.children and not n.is_root)

    def usage(self) -> CacheUsage:
        cached = evictable = 0
        for node in self._nodes():
            cached += len(node.blocks)
            if node.lock_count == 0:
                evictable += sum(self.pool.ref_count(b) == 1 for b in node.blocks)
        return CacheUsage(cached, evictable)

    def check(self, request_blocks: Iterable[Sequence[int]] = ()) -> None:
        """Raises AssertionError unless the bookkeeping holds: every block's pool reference count is the
        number of requests holding it plus one if the tree holds it; no block is in the tree twice; a
        cached block a request uses is in a locked node; and free + evictable + locked == total."""
        expected = [0] * self.pool.num_blocks
        held_by_requests: set[int] = set()
        for blocks in request_blocks:
            for block in blocks:
                expected[block] += 1
                held_by_requests.add(block)
        in_tree: set[int] = set()
        evictable = 0
        for node in self._nodes():
            if not node.is_root:
                assert len(node.tokens) == len(node.blocks) * self.block_size > 0, "edge not in whole blocks"
                assert node.parent is not None and node.parent.children.get(node.tokens[:self.block_size]) is node
            assert node.lock_count >= sum(c.lock_count for c in node.children.values()), "lock counts broken"
            for block in node.blocks:
                assert block not in in_tree, f"block {block} is in the prefix cache twice"
                in_tree.add(block)
                expected[block] += 1
                if node.lock_count == 0:
                    assert block not in held_by_requests, f"block {block} is used by a request but not locked"
                    evictable += 1
        for block, count in enumerate(expected):
            assert self.pool.ref_count(block) == count, (
                f"block {block}: pool counts {self.pool.ref_count(block)} references, owners hold {count}")
        locked = len(held_by_requests | in_tree) - evictable
        assert self.pool.num_free + evictable + locked == self.pool.num_blocks, "blocks lost or double-counted"
