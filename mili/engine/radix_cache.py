"""RadixAttention-style prefix cache: a radix tree over token ids at KV-block granularity.

Each edge holds whole blocks: a label of `k * block_size` token ids and the `k` KV blocks that hold those
tokens' keys and values. The tree OWNS the blocks on its edges (see block_pool.py: one owner per block):
a sequence that reuses a cached prefix does not take the blocks, it `acquire`s the node where its match
ends, which locks that node and every ancestor, so nothing it reads can be evicted; `release` unlocks.

- `match` finds the longest cached prefix in whole blocks, never the whole prompt (at least one token is
  always left to compute: its logits are needed). It only reads the tree.
- `acquire` turns a match into a lock (splitting an edge when the match ends inside it).
- `insert` adopts a sequence's blocks for the part of its tokens not cached yet, and returns the tree's
  blocks for the whole prefix: where the tree already had a block, the sequence's own copy is a duplicate
  that the sequence gives back to the pool.
- `evict` frees unlocked leaves, least recently used first.
- Requests with different `salt`s never share blocks: each salt has its own tree.
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
    blocks: list[int]        # the KV blocks of those tokens, one per block, owned by the tree
    parent: RadixNode | None
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)  # keyed by their first block
    lock_count: int = 0      # sequences using this node or a descendant
    last_access: int = 0

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class PrefixMatch:
    node: RadixNode            # the deepest node the match reaches
    blocks_in_node: int        # how many of `node`'s blocks it covers (fewer than all: ends inside the edge)
    blocks: tuple[int, ...]    # cached blocks covering the first `num_tokens` tokens
    num_tokens: int


@dataclass(frozen=True)
class CacheUsage:
    cached_blocks: int     # blocks the tree holds
    evictable_blocks: int  # of those, in unlocked nodes: freed by eviction


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

    # ------------------------------------------------------------------ lookups (read only)

    def match(self, tokens: Sequence[int], salt: Hashable = None) -> PrefixMatch:
        """The longest cached prefix of `tokens` in whole blocks, leaving at least one token uncached."""
        node = self._roots.get(salt) or RadixNode((), [], None)
        if not self.enabled:
            return PrefixMatch(node, 0, (), 0)
        limit = (len(tokens) - 1) // self.block_size * self.block_size
        blocks: list[int] = []
        matched = 0
        while matched < limit:
            child = node.children.get(tuple(tokens[matched:matched + self.block_size]))
            if child is None:
                break
            common = self._common_blocks(child.tokens, tokens[matched:limit])
            blocks.extend(child.blocks[:common])
            matched += common * self.block_size
            if common < len(child.blocks):
                return PrefixMatch(child, common, tuple(blocks), matched)
            node = child
        return PrefixMatch(node, len(node.blocks), tuple(blocks), matched)

    def _common_blocks(self, label: Sequence[int], tokens: Sequence[int]) -> int:
        """How many whole blocks `label` and `tokens` share from their start."""
        bs = self.block_size
        count = 0
        while (count + 1) * bs <= min(len(label), len(tokens)) and \
                tuple(label[count * bs:(count + 1) * bs]) == tuple(tokens[count * bs:(count + 1) * bs]):
            count += 1
        return count

    # ------------------------------------------------------------------ locks

    def acquire(self, match: PrefixMatch) -> RadixNode:
        """Locks the match's end (its blocks can no longer be evicted); returns the node to `release`."""
        node = match.node
        if match.blocks_in_node < len(node.blocks):
            node = self._split(node, match.blocks_in_node)
        self._touch(node)
        self.lock(node)
        return node

    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_count += 1
            node = node.parent

    def release(self, node: RadixNode) -> None:
        while node is not None:
            if node.lock_count <= 0:
                raise ValueError("unlocking a prefix-cache node that is not locked")
            node.lock_count -= 1
            node = node.parent

    def _touch(self, node: RadixNode) -> None:
        now = next(self._clock)
        while node is not None:
            node.last_access = now
            node = node.parent

    def _split(self, node: RadixNode, keep_blocks: int) -> RadixNode:
        """Splits `node`'s edge after `keep_blocks` blocks; returns the new upper node. Locks on `node`
        are locks on its ancestors too, so the upper part keeps the same count."""
        cut = keep_blocks * self.block_size
        parent = node.parent
        if parent is None or not 0 < keep_blocks < len(node.blocks):
            raise ValueError(f"cannot split an edge of {len(node.blocks)} blocks after {keep_blocks}")
        upper = RadixNode(node.tokens[:cut], node.blocks[:keep_blocks], parent,
                          lock_count=node.lock_count, last_access=node.last_access)
        parent.children[node.tokens[:self.block_size]] = upper
        node.tokens, node.blocks, node.parent = node.tokens[cut:], node.blocks[keep_blocks:], upper
        upper.children[node.tokens[:self.block_size]] = node
        return upper

    # ------------------------------------------------------------------ updates

    def insert(self, tokens: Sequence[int], blocks: Sequence[int],
               salt: Hashable = None) -> tuple[RadixNode, list[int]]:
        """Caches the whole blocks of `tokens` (their K/V in `blocks`). Returns the node where they end and
        the tree's blocks for them, in order. Blocks of `blocks` that appear there now belong to the tree;
        the others at the same positions were duplicates of what the tree already held."""
        node = self.root(salt)
        if not self.enabled:
            return node, []
        num_blocks = min(len(tokens) // self.block_size, len(blocks))
        usable = num_blocks * self.block_size
        now = next(self._clock)
        tree_blocks: list[int] = []
        done = 0
        while done < usable:
            key = tuple(tokens[done:done + self.block_size])
            child = node.children.get(key)
            if child is None:
                adopted = list(blocks[done // self.block_size:num_blocks])
                child = RadixNode(tuple(tokens[done:usable]), adopted, node, last_access=now)
                node.children[key] = child
                return child, tree_blocks + adopted
            common = self._common_blocks(child.tokens, tokens[done:usable])
            if common < len(child.blocks):
                child = self._split(child, common)
            child.last_access = now
            tree_blocks.extend(child.blocks)
            done += len(child.tokens)
            node = child
        return node, tree_blocks

    def evict(self, num_blocks: int) -> int:
        """Drops unlocked leaves, least recently used first, until `num_blocks` blocks are free again
        (or nothing evictable is left); returns how many blocks it freed."""
        order = itertools.count()  # tie-break equal access times without comparing nodes
        heap = [(leaf.last_access, next(order), leaf) for leaf in self._leaves() if leaf.lock_count == 0]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None  # roots are never leaves here
            del parent.children[leaf.tokens[:self.block_size]]
            self.pool.free(leaf.blocks)
            freed += len(leaf.blocks)
            if not parent.is_root and not parent.children and parent.lock_count == 0:
                heapq.heappush(heap, (parent.last_access, next(order), parent))
        return freed

    def clear(self) -> int:
        """Evicts everything unlocked; returns how many blocks it freed."""
        return self.evict(self.pool.num_blocks)

    # ------------------------------------------------------------------ accounting

    def nodes(self) -> Iterable[RadixNode]:
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _leaves(self) -> Iterable[RadixNode]:
        return (n for n in self.nodes() if not n.children and not n.is_root)

    def usage(self) -> CacheUsage:
        cached = evictable = 0
        for node in self.nodes():
            cached += len(node.blocks)
            if node.lock_count == 0:
                evictable += len(node.blocks)
        return CacheUsage(cached, evictable)

    def path_blocks(self, node: RadixNode) -> list[int]:
        """The blocks from the root down to `node`, in order."""
        parts: list[list[int]] = []
        while node is not None:
            parts.append(node.blocks)
            node = node.parent
        return [block for part in reversed(parts) for block in part]
