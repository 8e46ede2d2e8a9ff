"""The scheduler: which sequences run in the next step, and how many tokens each.

Each step fills a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`):
1. running decodes first (one token each, plus the tokens a speculative proposer guessed for them, as far as
   the budget and the free blocks allow: guesses never evict or preempt anything), oldest first;
2. then prefill chunks: running sequences part-way through their prompt, then waiting ones. A waiting
   sequence first takes the longest cached prefix from the radix cache; a prompt longer than the budget
   left is cut into chunks that run over several steps (chunked prefill, mixed with the decodes).
Waiting sequences go first-come first-served, except that among the first few that arrived within
`aging_s` of the oldest, the one with the longest cached prefix goes first (it costs the least); nothing
waits more than `aging_s` behind a younger request.

Blocks: when the pool runs out, the radix cache evicts unlocked prefixes; when that is not enough, the
sequence preempts the newest sequence that is younger than itself and not in this step (recompute
preemption: its computed blocks go to the prefix cache, the rest back to the pool, and it waits at its
place in the queue; when resumed it re-matches its cached prefix, so the recompute is mostly cache hits).
Preemption only ever goes from older to younger, so the oldest running sequence can always take every
block it needs, and every step with work to do computes something: the engine caps the context at what
the KV cache holds, so a sequence always fits alone. One that would not (a pool shrunk below the context)
is handed back in `StepPlan.cannot_fit` for the engine to finish with "length".
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.block_pool import BlockPool
from mili.engine.radix_cache import RadixCache, RadixNode
from mili.engine.sequence import Sequence, SequenceStatus
from mili.engine.speculative import Proposal

WAITING_LOOKAHEAD = 8  # waiting sequences compared for a cached prefix per step (bounds the host work)


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
    num_tokens: int       # tokens of this sequence that run in the step (guesses included)
    samples: bool         # the chunk reaches the sequence's end: a token is sampled from its last row
    proposal: Proposal | None = None  # guessed tokens verified after the real ones (logits at every row)
    scores_prompt: bool = False  # logits at every row: the prompt's logprobs (the last row samples, if `samples`)

    @property
    def num_guesses(self) -> int:
        return len(self.proposal.tokens) if self.proposal else 0

    @property
    def num_logit_rows(self) -> int:
        if self.proposal or self.scores_prompt:
            return self.num_tokens
        return 1 if self.samples else 0


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    cannot_fit: list[Sequence] = field(default_factory=list)  # longer than the whole KV cache: finish them
    budget: int = 0
    _scheduled: set[int] = field(default_factory=set)  # ids of the chunks' sequences: `in` is O(1)

    def add(self, seq: Sequence, num_tokens: int, proposal: Proposal | None = None) -> None:
        chunk = ScheduledChunk(seq, num_tokens + (len(proposal.tokens) if proposal else 0),
                               num_tokens == seq.num_uncomputed, proposal, seq.scores_prompt)
        self.chunks.append(chunk)
        self._scheduled.add(seq.seq_id)
        self.budget -= chunk.num_tokens

    def __contains__(self, seq: Sequence) -> bool:
        return seq.seq_id in self._scheduled

    def batch(self, block_size: int) -> Batch:
        return Batch.from_chunks([_sequence_chunk(c) for c in self.chunks], block_size)


def _sequence_chunk(chunk: ScheduledChunk) -> SequenceChunk:
    seq, start = chunk.seq, chunk.seq.num_computed
    real = seq.token_ids[start:start + chunk.num_tokens - chunk.num_guesses]
    if chunk.proposal:
        return SequenceChunk(real + chunk.proposal.tokens, start, seq.blocks, LogitRows.ALL)
    if chunk.scores_prompt:
        return SequenceChunk(real, start, seq.blocks, LogitRows.ALL)
    return SequenceChunk(real, start, seq.blocks, LogitRows.LAST if chunk.samples else LogitRows.NONE)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, cache: RadixCache) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self.waiting: list[Sequence] = []  # by priority (oldest first)
        self.running: list[Sequence] = []  # by priority
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue changes

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, cache_computed: bool = True) -> None:
        """Takes a finished or aborted sequence out of the queues and gives back its blocks (its computed
        blocks into the prefix cache, unless `cache_computed` is False: their K/V may be unsound)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_blocks(seq, cache_computed)

    def all_sequences(self) -> Iterable[Sequence]:
        return [*self.running, *self.waiting]

    # ------------------------------------------------------------------ one step

    def schedule(self, proposals: dict[int, Proposal] | None = None) -> StepPlan:
        """The next step. `proposals`: guessed tokens by seq_id, for decoding sequences (speculative decoding)."""
        plan = StepPlan(budget=self.config.max_num_batched_tokens)
        proposals = proposals or {}

        for seq in list(self.running):  # decodes first, oldest first
            if self._full(plan):
                break
            if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed == 1 and self._reserve(seq, 1, plan):
                plan.add(seq, 1, self._fit_guesses(seq, proposals.get(seq.seq_id), plan.budget - 1))

        for seq in list(self.running):  # then unfinished prefills (or recomputes), oldest first
            if self._full(plan):
                break
            if seq.status is SequenceStatus.RUNNING and seq.num_uncomputed > 1:
                self._schedule_prefill(seq, plan)

        while self.waiting and not self._full(plan):
            seq = self._next_waiting()
            self._admit(seq)
            if not self._schedule_prefill(seq, plan):
                self._send_back(seq)  # no room even after eviction: it waits at its place
                break
        return plan

    def _full(self, plan: StepPlan) -> bool:
        return plan.budget == 0 or len(plan.chunks) == self.config.max_num_seqs

    def _next_waiting(self) -> Sequence:
        """FCFS, but a sequence that shares a long cached prefix may overtake ones that arrived within
        `aging_s` of the oldest waiting sequence (only the first few are compared)."""
        oldest = self.waiting[0]
        window = [s for s in self.waiting[:WAITING_LOOKAHEAD]
                  if s.request.arrival_time - oldest.request.arrival_time <= self.config.aging_s]
        chosen = oldest
        if len(window) > 1 and time.monotonic() - oldest.request.arrival_time <= self.config.aging_s:
            chosen = max(window, key=lambda s: (self.cache.match(s.token_ids, s.request.salt).num_tokens,
                                                [-p for p in s.priority]))
        self.waiting.remove(chosen)
        return chosen

    def _admit(self, seq: Sequence) -> None:
        """Moves a waiting sequence to running, holding its longest cached prefix (for one that scores its prompt,
        only as far as the rows already scored: the others need their logits)."""
        tokens = seq.token_ids[:len(seq.request.prompt_logprobs) - 1] if seq.scores_prompt else seq.token_ids
        match = self.cache.match(tokens, seq.request.salt)
        if match.num_tokens:
            seq.cache_node = self.cache.acquire(match)
            seq.blocks = list(match.blocks)
            seq.num_shared_blocks = len(match.blocks)
            seq.num_computed = match.num_tokens
        if seq.num_preemptions == 0:
            seq.num_cached = match.num_tokens
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.priority)

    def _send_back(self, seq: Sequence) -> None:
        """Undoes `_admit` for a sequence that got no blocks (nothing of it was computed)."""
        self.running.remove(seq)
        self._release_blocks(seq, cache_computed=False)
        seq.status = SequenceStatus.WAITING
        self.add(seq)

    def _schedule_prefill(self, seq: Sequence, plan: StepPlan) -> bool:
        """Schedules as many of `seq`'s uncomputed tokens as the budget and the pool allow; False if none."""
        count = min(seq.num_uncomputed, plan.budget)
        if not self._reserve(seq, count, plan):
            # everything evictable and preemptible is gone: take what the free blocks still hold
            room = (len(seq.blocks) + self.pool.num_free) * self.config.block_size - seq.num_computed
            count = min(count, room)
            if count < 1 or not self._reserve(seq, count, plan):
                return False
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        plan.add(seq, count)
        return True

    def _reserve(self, seq: Sequence, new_tokens: int, plan: StepPlan) -> bool:
        """Makes `seq`'s blocks cover `new_tokens` more tokens: allocates, evicting cached prefixes and
        preempting younger sequences not in `plan` when needed. False if it cannot."""
        total = -(-(seq.num_computed + new_tokens) // self.config.block_size)
        needed = total - len(seq.blocks)
        if needed <= 0:
            return True
        if total > self.pool.num_blocks:  # not even alone: the engine finishes it
            if seq not in plan.cannot_fit:
                plan.cannot_fit.append(seq)
            return False
        while self.pool.num_free < needed:
            if self.cache.evict(needed - self.pool.num_free):
                continue
            victim = self._youngest_preemptible(seq, plan)
            if victim is None:
                return False
            self._preempt(victim)
        seq.blocks.extend(self.pool.alloc(needed))
        return True

    def _fit_guesses(self, seq: Sequence, proposal: Proposal | None, budget: int) -> Proposal | None:
        """As many of `proposal`'s tokens as the budget and the FREE blocks allow (a guess is never worth an
        eviction or a preemption), their blocks allocated; None if none fit. `seq`'s next token is reserved."""
        if not proposal or not proposal.tokens or budget < 1:
            return None
        room = (len(seq.blocks) + self.pool.num_free) * self.config.block_size - seq.num_computed - 1
        count = min(len(proposal.tokens), budget, room)
        if count < 1:
            return None
        total = -(-(seq.num_computed + 1 + count) // self.config.block_size)
        seq.blocks.extend(self.pool.alloc(max(0, total - len(seq.blocks))))
        if count == len(proposal.tokens):
            return proposal
        probs = proposal.draft_probs
        return Proposal(proposal.tokens[:count], None if probs is None else probs[:count])

    def _youngest_preemptible(self, keep: Sequence, plan: StepPlan) -> Sequence | None:
        for seq in reversed(self.running):
            if seq.priority <= keep.priority:
                return None
            if seq not in plan:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: its computed blocks go to the prefix cache, it waits at its place."""
        self.running.remove(seq)
        self._release_blocks(seq, cache_computed=True)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def _release_blocks(self, seq: Sequence, cache_computed: bool) -> None:
        """Gives back everything `seq` holds: computed whole blocks to the prefix cache (when allowed),
        its other private blocks to the pool, its lock on the cached prefix."""
        private_from = seq.num_shared_blocks
        if cache_computed and seq.num_computed >= self.config.block_size:
            private_from = max(private_from, len(self._cache_prefix(seq, seq.num_computed)[1]))
        self.pool.free(seq.blocks[private_from:])
        if seq.cache_node is not None:
            self.cache.release(seq.cache_node)
        seq.blocks, seq.num_shared_blocks, seq.cache_node, seq.num_computed = [], 0, None, 0

    def _cache_prefix(self, seq: Sequence, num_tokens: int) -> tuple[RadixNode, list[int]]:
        """Hands the whole blocks of `seq`'s first `num_tokens` tokens to the prefix cache and re-points
        its block table at the cache's blocks (freeing its duplicates). Returns the node where they end
        (not locked: the caller decides) and the cache's blocks for them."""
        node, tree_blocks = self.cache.insert(seq.token_ids[:num_tokens], seq.blocks, seq.request.salt)
        for i in range(seq.num_shared_blocks, len(tree_blocks)):
            if seq.blocks[i] != tree_blocks[i]:
                self.pool.free([seq.blocks[i]])  # the cache already held these tokens: ours is a duplicate
                seq.blocks[i] = tree_blocks[i]
        return node, tree_blocks

    # ------------------------------------------------------------------ after the step

    def drop_unused_blocks(self, seq: Sequence) -> None:
        """After a verify step: gives back the blocks past the sequence's tokens, which held only rejected
        guesses (their slots in kept blocks are simply overwritten later; they never reach the prefix cache,
        which only takes computed tokens)."""
        keep = max(seq.num_shared_blocks, -(-seq.num_tokens // self.config.block_size))
        if len(seq.blocks) > keep:
            self.pool.free(seq.blocks[keep:])
            del seq.blocks[keep:]

    def finish_chunk(self, chunk: ScheduledChunk) -> None:
        """Marks a chunk's tokens computed. A prompt that just finished goes into the prefix cache at once
        (its whole blocks), so requests arriving meanwhile share it; the sequence then locks that node."""
        seq = chunk.seq
        seq.num_computed += chunk.num_tokens - chunk.num_guesses  # guesses count once accepted (engine)
        if chunk.samples and seq.num_output_tokens == 0 and self.cache.enabled:
            node, tree_blocks = self._cache_prefix(seq, seq.num_computed)
            if len(tree_blocks) > seq.num_shared_blocks:
                self.cache.lock(node)
                if seq.cache_node is not None:
                    self.cache.release(seq.cache_node)
                seq.cache_node, seq.num_shared_blocks = node, len(tree_blocks)
