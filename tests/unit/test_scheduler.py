"""Scheduler decisions without a model: budgets, cache-aware ordering with aging, chunking, preemption,
and the two ways the old scheduler stalled for good."""

from __future__ import annotations

import time

from mili.engine.block_audit import audit_blocks
from mili.engine.block_pool import BlockPool
from mili.engine.radix_cache import RadixCache
from mili.engine.request import Request
from mili.engine.sampler import SampledToken
from mili.engine.sampling_params import SamplingParams
from mili.engine.scheduler import Scheduler, SchedulerConfig
from mili.engine.sequence import Sequence
from tests.engine_fakes import FakeTokenizer

BS = 4


def make(num_blocks: int = 64, **config) -> Scheduler:
    pool = BlockPool(num_blocks)
    return Scheduler(SchedulerConfig(block_size=BS, **config), pool, RadixCache(pool, BS))


def seq(seq_id: int, tokens: list[int], arrived_ago: float = 0.0) -> Sequence:
    request = Request.create(f"r{seq_id}", tokens, SamplingParams.greedy(), FakeTokenizer(), iter([seq_id]))
    request.arrival_time = time.monotonic() - arrived_ago
    return request.sequences[0]


def complete(scheduler: Scheduler, plan) -> None:
    """Pretends the step ran: every chunk computed, one token appended where one was sampled."""
    for chunk in plan.chunks:
        scheduler.finish_chunk(chunk)
        if chunk.samples:
            chunk.seq.append(SampledToken(1, None))
    audit_blocks(scheduler.pool, scheduler.cache, scheduler.all_sequences())


def test_budget_splits_a_long_prompt_into_chunks_and_decodes_go_first():
    scheduler = make(max_num_batched_tokens=10)
    long, short = seq(0, list(range(23)), arrived_ago=1), seq(1, [5, 6, 7])
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
    assert plan.batch(BS).positions.tolist() == [23, 3]


def test_a_cached_prefix_may_jump_the_queue_but_not_past_the_aging_limit():
    scheduler = make(aging_s=5.0)
    shared = list(range(40))
    warm = seq(0, shared + [1], arrived_ago=2.0)
    scheduler.add(warm)
    complete(scheduler, scheduler.schedule())
    scheduler.remove(warm)  # finished: its prompt stays cached
    cold, hit = seq(1, list(range(100, 130)), arrived_ago=1.0), seq(2, shared + [2], arrived_ago=0.5)
    scheduler.add(cold)
    scheduler.add(hit)
    assert scheduler._next_waiting() is hit  # younger, but 40 of its tokens are cached
    scheduler.add(hit)
    cold.request.arrival_time -= 10  # now it has waited past the aging limit
    assert scheduler._next_waiting() is cold


def test_out_of_blocks_preempts_the_youngest_and_keeps_the_books_straight():
    scheduler = make(num_blocks=6, max_num_batched_tokens=64)
    first, second = seq(0, list(range(12)), arrived_ago=1), seq(1, list(range(50, 62)))
    scheduler.add(first)
    scheduler.add(second)
    complete(scheduler, scheduler.schedule())  # 3 blocks each: the pool is full
    assert scheduler.pool.num_free == 0
    plan = scheduler.schedule()  # `first` needs a 4th block to decode: `second` is preempted for it
    assert (plan.chunks[0].seq, plan.chunks[0].num_tokens) == (first, 1) and len(first.blocks) == 4
    assert second.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert all(c.seq is not second or c.num_tokens > 1 for c in plan.chunks)  # if it runs again, it recomputes
    complete(scheduler, plan)


def test_two_half_prefilled_prompts_that_fill_the_pool_do_not_stall():
    """The old scheduler never preempted for a prefill chunk: two half-computed prompts holding the whole
    pool waited for each other forever. Now the older one takes the younger's blocks."""
    scheduler = make(num_blocks=8, max_num_batched_tokens=64, max_num_seqs=2)
    older, younger = seq(0, list(range(30)), arrived_ago=1), seq(1, list(range(100, 130)))
    for s in (older, younger):  # the state the old scheduler could reach: 16 of 30 tokens computed each
        scheduler.add(s)
        scheduler._admit(scheduler._next_waiting())
        s.blocks, s.num_computed = scheduler.pool.alloc(4), 16
    assert scheduler.pool.num_free == 0
    plan = scheduler.schedule()
    assert [(c.seq, c.num_tokens, c.samples) for c in plan.chunks] == [(older, 14, True)]
    assert younger.num_preemptions == 1 and younger in scheduler.waiting
    complete(scheduler, plan)


def test_a_sequence_longer_than_the_whole_pool_is_handed_back_not_kept_waiting():
    """The old scheduler preempted such a sequence and then kept it at the head of the queue forever."""
    scheduler = make(num_blocks=4)
    grows = seq(0, list(range(15)))
    scheduler.add(grows)
    complete(scheduler, scheduler.schedule())
    complete(scheduler, scheduler.schedule())  # 17 tokens, 16 computed: the pool's 4 blocks are full
    plan = scheduler.schedule()
    assert plan.cannot_fit == [grows] and not plan.chunks
