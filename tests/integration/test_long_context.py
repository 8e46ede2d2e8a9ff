"""Whole-model properties at long contexts on a tiny checkpoint (issue 27): a position's logits are the same bits
whether it is reached by a full prefill, by a short chunk over cached blocks (a prefix-cache hit), by decode steps,
or in a batch with other sequences — at 20,004 tokens (above 16K: more than 64 softmax parts) and 32,600 (near
32K), the two lengths where a prefix-cache hit once disagreed with a miss.

The run is bfloat16: its projections go through MILI's linear op, whose rows are bit-identical whatever the batch
(tests/kernels/test_linear.py), as attention's now are; a float32 run multiplies through MAX's matmul, which makes
no such promise on every CPU.

One prefill of 32,600 random tokens (in two chunks, ending at each length) is the reference of every test; it is
the costly part (~1 TFLOP of attention), so the module builds it once. The seed is printed; replay with
MILI_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import numpy as np
import pytest

from mili.checkpoints import cached_checkpoint
from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.model_runner import ModelRunner
from tests.integration.helpers import run_chunk

CHECKPOINT = "tiny-tied-gqa2-d64-bf16"  # 4 query heads over 2 KV heads: chunks of up to 8 tokens split
CONTEXTS = (20_004, 32_600)
SPARE_BLOCKS = 64
VOCAB_SAMPLE = 151_000


@dataclass
class LongPrompt:
    """A prompt prefilled once, its blocks, and the logits of the prefill's last row at each of CONTEXTS."""

    runner: ModelRunner
    prompt: np.ndarray
    blocks: list[int]
    logits: dict[int, np.ndarray]
    spare: list[int]

    def cached_blocks(self, context: int) -> int:
        """Whole blocks a prefix-cache hit would reuse for a prompt of `context` tokens (never all of it)."""
        return (context - 1) // self.runner.block_size

    def take_spare(self) -> int:
        return self.spare.pop()

    def hit_table(self, context: int) -> list[int]:
        """The prompt's cached blocks, then a fresh block for the tokens the hit computes."""
        return self.blocks[:self.cached_blocks(context)] + [self.take_spare()]


@pytest.fixture(scope="module")
def long_prompt() -> LongPrompt:
    seed = int(os.environ.get("MILI_TEST_SEED") or secrets.randbits(32))
    print(f"long-context prompt: seed {seed} (replay with MILI_TEST_SEED={seed})")
    rng = np.random.default_rng(seed)
    block_size = 16
    prompt_blocks = -(-max(CONTEXTS) // block_size)
    num_blocks = prompt_blocks + SPARE_BLOCKS
    runner = ModelRunner.from_pretrained(cached_checkpoint(CHECKPOINT), dtype="bfloat16", block_size=block_size,
                                         num_blocks=num_blocks)
    order = [int(b) for b in rng.permutation(num_blocks)]
    prompt = rng.integers(0, VOCAB_SAMPLE, max(CONTEXTS))
    blocks, spare = order[:prompt_blocks], order[prompt_blocks:]
    logits, start = {}, 0
    for context in CONTEXTS:
        logits[context] = run_chunk(runner, prompt[start:context], start, blocks, LogitRows.LAST)[0]
        start = context
    return LongPrompt(runner, prompt, blocks, logits, spare)


def test_a_prefix_cache_hit_gives_the_bits_of_the_full_prefill(long_prompt: LongPrompt):
    lp, compared = long_prompt, 0
    for context in CONTEXTS:
        cached = lp.cached_blocks(context) * lp.runner.block_size
        hit = run_chunk(lp.runner, lp.prompt[cached:context], cached, lp.hit_table(context), LogitRows.LAST)
        assert 1 <= context - cached <= 8  # the hit computes a short chunk: its keys are split into parts
        np.testing.assert_array_equal(hit[0], lp.logits[context], err_msg=f"context {context}")
        compared += 1
    assert compared == len(CONTEXTS)


def test_decode_steps_give_the_bits_of_a_chunk_and_of_the_full_prefill(long_prompt: LongPrompt):
    """From the last cached block on, every position is computed once by decode steps and once inside a chunk
    (logits of all its rows); the last position also by the full prefill."""
    lp, compared = long_prompt, 0
    for context in CONTEXTS:
        cached = lp.cached_blocks(context) * lp.runner.block_size
        chunk = run_chunk(lp.runner, lp.prompt[cached:context], cached, lp.hit_table(context), LogitRows.ALL)
        table = lp.hit_table(context)
        for i, position in enumerate(range(cached, context)):
            decoded = run_chunk(lp.runner, lp.prompt[position:position + 1], position, table, LogitRows.LAST)[0]
            np.testing.assert_array_equal(decoded, chunk[i], err_msg=f"decode at position {position}")
            compared += 1
        np.testing.assert_array_equal(decoded, lp.logits[context], err_msg=f"last decode of {context}")
    assert compared == sum(context - lp.cached_blocks(context) * lp.runner.block_size for context in CONTEXTS)


def test_each_long_sequence_gets_its_solo_bits_in_a_mixed_batch(long_prompt: LongPrompt, rng):
    """A decode at each long context, a prefix-cache hit, and an unrelated short prefill, in one shuffled batch."""
    lp, bs = long_prompt, long_prompt.runner.block_size
    chunks: list[SequenceChunk] = []
    for context in CONTEXTS:
        cached = lp.cached_blocks(context) * bs
        table = lp.hit_table(context)
        run_chunk(lp.runner, lp.prompt[cached:context - 1], cached, table, LogitRows.NONE)
        chunks.append(SequenceChunk(lp.prompt[context - 1:context], context - 1, table))  # a decode
    hit_context = CONTEXTS[0]
    cached = lp.cached_blocks(hit_context) * bs
    chunks.append(SequenceChunk(lp.prompt[cached:hit_context], cached, lp.hit_table(hit_context), LogitRows.ALL))
    short = rng.integers(0, VOCAB_SAMPLE, 37)
    chunks.append(SequenceChunk(short, 0, [lp.take_spare() for _ in range(-(-len(short) // bs))]))
    alone = run_chunk(lp.runner, short, 0, [lp.take_spare() for _ in range(-(-len(short) // bs))],
                      LogitRows.LAST)[0]

    order = rng.permutation(len(chunks))
    mixed = lp.runner.run(Batch.from_chunks([chunks[i] for i in order], bs))
    rows = {}
    at = 0
    for i in order:
        count = len(chunks[i].token_ids) if chunks[i].logits is LogitRows.ALL else 1
        rows[int(i)] = mixed[at:at + count]
        at += count
    assert at == len(mixed)
    expected = [lp.logits[CONTEXTS[0]], lp.logits[CONTEXTS[1]], lp.logits[hit_context], alone]
    for i, logits in enumerate(expected):
        np.testing.assert_array_equal(rows[i][-1], logits, err_msg=f"sequence {i} of the batch")
    assert len(rows) == len(expected) == len(chunks)
