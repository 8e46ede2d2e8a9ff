"""The scheduler: which sequences run in the next step, and how many tokens each.

Each step fills a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`):
1. running decodes first (one token each), in arrival order;
2. then prefill chunks: running sequences part-way through their prompt, then waiting ones. A waiting
   sequence first takes the longest cached prefix from the radix cache; a prompt longer than the budget
   left is cut into chunks that run over several steps (chunked prefill, mixed with the decodes).
Waiting sequences go first-come first-served, except that among those that arrived within `aging_s` of
the oldest, the one with the longest cached prefix goes first (it costs the least); nothing waits more
than `aging_s` behind a younger request.

When the pool runs out of blocks, the radix cache evicts unlocked prefixes; when that is not enough, the
newest running sequence is preempted by recompute: its blocks go back, it returns to the front of the
waiting queue, and when resumed it re-matches its cached prefix, so the recompute is mostly cache hits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.block_pool import BlockPool
from mili.engine.radix_cache import RadixCache
from mili.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    block_size: int = 16
    aging_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int       # tokens of this sequence that run in the step
    samples: bool         # the chunk reaches the sequence's end: a token is sampled from its last row


@dataclass(frozen=True)
class StepPlan:
    chunks: list[ScheduledChunk]
    batch: Batch


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, cache: RadixCache) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue changes

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def release(self, seq: Sequence) -> None:
        """Gives back everything `seq` holds: caches what it computed, frees its blocks, unlocks its prefix."""
        if seq.blocks and seq.num_computed:
            self.cache.insert(seq.token_ids[:seq.num_computed], seq.blocks, seq.salt)
        self._drop_cached_prefix(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or aborted sequence out of the queues and releases its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def all_sequences(self) -> Iterable[Sequence]:
        return [*self.running, *self.waiting]

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepPlan | None:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []

        for seq in list(self.running):  # decodes (and running prefills, below) keep their order
            if budget == 0 or len(chunks) == self.config.max_num_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1:
                continue
            if self._grow(seq, 1, chunks):
                chunks.append(ScheduledChunk(seq, 1, True))
                budget -= 1

        for seq in [s for s in self.running if s.num_uncomputed > 1]:  # unfinished prefills
            if budget == 0 or len(chunks) == self.config.max_num_seqs:
                break
            budget -= self._schedule_prefill(seq, budget, chunks)

        while self.waiting and budget > 0 and len(chunks) < self.config.max_num_seqs:
            seq = self._next_waiting()
            self._take_cached_prefix(seq)
            taken = self._schedule_prefill(seq, budget, chunks)
            if taken == 0:  # no room even after eviction: keep it waiting, at the front
                self._drop_cached_prefix(seq)
                self.waiting.appendleft(seq)
                break
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            budget -= taken

        if not chunks:
            return None
        batch = Batch.from_chunks([
            SequenceChunk(c.seq.token_ids[c.seq.num_computed:c.seq.num_computed + c.num_tokens], c.seq.num_computed,
                          c.seq.blocks, LogitRows.LAST if c.samples else LogitRows.NONE)
            for c in chunks], self.config.block_size)
        return StepPlan(chunks, batch)

    def _next_waiting(self) -> Sequence:
        """FCFS, but a request that shares a long cached prefix may overtake ones that arrived within
        `aging_s` of the oldest waiting request."""
        oldest = min(self.waiting, key=lambda s: s.arrival_time)  # the front may hold a younger, preempted one
        window = [s for s in self.waiting if s.arrival_time - oldest.arrival_time <= self.config.aging_s]
        if time.monotonic() - oldest.arrival_time > self.config.aging_s or len(window) == 1:
            chosen = oldest
        else:
            chosen = max(window, key=lambda s: (self.cache.match(s.token_ids, s.salt).num_tokens, -s.arrival_time))
        self.waiting.remove(chosen)
        return chosen

    def _take_cached_prefix(self, seq: Sequence) -> None:
        match = self.cache.match(seq.token_ids, seq.salt)
        self.cache.lock(match.node)
        self.pool.retain(match.blocks)
        seq.cache_node, seq.blocks, seq.num_computed = match.node, list(match.blocks), match.num_tokens
        if seq.num_preemptions == 0:
            seq.num_cached = match.num_tokens

    def _drop_cached_prefix(self, seq: Sequence) -> None:
        """Releases the sequence's blocks and lock without caching anything."""
        self.pool.release(seq.blocks)
        seq.blocks = []
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
            seq.cache_node = None
        seq.num_computed = 0

    def _schedule_prefill(self, seq: Sequence, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Schedules as much of `seq`'s uncomputed tokens as the budget and the pool allow; returns how many."""
        count = min(seq.num_uncomputed, budget)
        while count > 0 and not self._grow(seq, count, chunks, preempt=False):
            count = count // 2  # a smaller chunk may fit where the whole one does not
        if count == 0:
            return 0
        chunks.append(ScheduledChunk(seq, count, count == seq.num_uncomputed))
        return count

    def _grow(self, seq: Sequence, new_tokens: int, chunks: list[ScheduledChunk], preempt: bool = True) -> bool:
        """Makes `seq`'s blocks cover `new_tokens` more tokens: allocates, evicting cached prefixes and
        (for decodes) preempting newer sequences when needed. False if it cannot."""
        needed = -(-(seq.num_computed + new_tokens) // self.config.block_size) - len(seq.blocks)
        if needed <= 0:
            return True
        if needed > self.pool.num_free:
            self.cache.evict(needed - self.pool.num_free)
        while preempt and needed > self.pool.num_free:
            victim = self._newest_preemptible(seq, chunks)
            if victim is None:
                break
            self._preempt(victim)
            self.cache.evict(max(0, needed - self.pool.num_free))
        if needed > self.pool.num_free:
            if preempt:  # not even alone could it grow: preempt it instead
                self._preempt(seq)
            return False
        seq.blocks.extend(self.pool.alloc(needed))
        return True

    def _newest_preemptible(self, keep: Sequence, chunks: list[ScheduledChunk]) -> Sequence | None:
        scheduled = {id(c.seq) for c in chunks}
        for seq in reversed(self.running):
            if seq is not keep and id(seq) not in scheduled:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: caches what it computed, frees its blocks, back to the front of the queue."""
        self.running.remove(seq)
        self.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ after the step

    def finish_chunk(self, chunk: ScheduledChunk) -> None:
        """Marks a chunk's tokens computed. A prompt that just finished goes into the prefix cache at once
        (its whole blocks), so requests arriving meanwhile share it; the sequence then locks that node."""
        seq = chunk.seq
        seq.num_computed += chunk.num_tokens
        if chunk.samples and not seq.output_ids:
            node = self.cache.insert(seq.token_ids[:seq.num_computed], seq.blocks, seq.salt)
            self.cache.lock(node)
            if seq.cache_node is not None:
                self.cache.unlock(seq.cache_node)
            seq.cache_node = node
