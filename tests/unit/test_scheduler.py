"""Scheduler decisions without a model: budgets, cache-aware ordering with aging, chunking, preemption."""

from __future__ import annotations

import time

import numpy as np

from mili.engine.block_pool import BlockPool
from mili.engine.radix_cache import RadixCache
from mili.engine.sampling_params import SamplingParams
from mili.engine.scheduler import Scheduler, SchedulerConfig
from mili.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks: int = 64, **config) -> Scheduler:
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(block_size=BS, **config), pool, RadixCache(pool, BS))


def seq(seq_id: int, tokens: list[int], arrived_ago: float = 0.0) -> Sequence:
    s = Sequence(seq_id, f"r{seq_id}", tokens, SamplingParams.greedy(), np.random.default_rng(0))
    s.arrival_time = time.monotonic() - arrived_ago
    return s


def complete(scheduler: Scheduler, plan) -> None:
    """Pretends the step ran: every chunk computed, one token appended where one was sampled."""
    for chunk in plan.chunks:
        scheduler.finish_chunk(chunk)
        if chunk.samples:
            chunk.seq.output_ids.append(1)


def test_budget_splits_a_long_prompt_into_chunks_and_decodes_go_first():
    scheduler = make(max_num_batched_tokens=10)
    long, short = seq(0, list(range(23))), seq(1, [5, 6, 7])
    scheduler.add(long)
    plan = scheduler.schedule()
    assert [(c.seq.seq_id, c.num_tokens, c.samples) for c in plan.chunks] == [(0, 10, False)]
    complete(scheduler, plan)
    scheduler.add(short)
    plan = scheduler.schedule()  # the running prefill continues before the waiting one starts
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(0, 10)]
    complete(scheduler, plan)
    plan = scheduler.schedule()
    assert [(c.seq.seq_id, c.num_tokens, c.samples) for c in plan.chunks] == [(0, 3, True), (1, 3, True)]
    complete(scheduler, plan)
    plan = scheduler.schedule()  # now both decode, one token each
    assert [(c.seq.seq_id, c.num_tokens) for c in plan.chunks] == [(0, 1), (1, 1)]
    assert plan.batch.positions.tolist() == [23, 3]


def test_a_cached_prefix_may_jump_the_queue_but_not_past_the_aging_limit():
    scheduler = make(aging_s=5.0)
    shared = list(range(40))
    warm = seq(0, shared + [1])
    scheduler.add(warm)
    complete(scheduler, scheduler.schedule())
    scheduler.remove(warm)  # finished: its prompt stays cached
    cold, hit = seq(1, list(range(100, 130)), arrived_ago=1.0), seq(2, shared + [2], arrived_ago=0.5)
    scheduler.add(cold)
    scheduler.add(hit)
    assert scheduler._next_waiting() is hit  # younger, but 40 of its tokens are cached
    scheduler.waiting.appendleft(hit)
    cold.arrival_time -= 10  # now it has waited past the aging limit
    assert scheduler._next_waiting() is cold


def test_out_of_blocks_preempts_the_newest_and_keeps_the_books_straight():
    scheduler = make(num_blocks=6, max_num_batched_tokens=64)
    first, second = seq(0, list(range(12))), seq(1, list(range(50, 62)))
    scheduler.add(first)
    scheduler.add(second)
    complete(scheduler, scheduler.schedule())  # 3 blocks each: the pool is full
    assert scheduler.pool.num_free == 0
    plan = scheduler.schedule()  # `first` needs a 4th block to decode: `second` is preempted for it
    assert (plan.chunks[0].seq, plan.chunks[0].num_tokens) == (first, 1) and len(first.blocks) == 4
    assert second.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert all(c.seq is not second or c.num_tokens > 1 for c in plan.chunks)  # if it runs again, it recomputes
    scheduler.cache.check(s.blocks for s in scheduler.all_sequences())
