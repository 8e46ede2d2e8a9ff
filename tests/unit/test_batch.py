"""Batch.from_chunks: the flat arrays the graph reads, built from per-sequence chunks."""

from __future__ import annotations

import numpy as np
import pytest

from mili.engine.batch import Batch, LogitRows, SequenceChunk


def test_mixed_chunks_give_positions_slots_and_logit_rows():
    bs = 4
    chunks = [
        SequenceChunk([5, 6, 7, 8, 9], start=0, block_table=[7, 2], logits=LogitRows.LAST),  # prefill
        SequenceChunk([11], start=6, block_table=[3, 0, 9], logits=LogitRows.LAST),            # decode
        SequenceChunk([1, 2, 3], start=2, block_table=[4, 6], logits=LogitRows.ALL),           # verify
        SequenceChunk([8, 8], start=4, block_table=[1, 5], logits=LogitRows.NONE),             # mid-prompt chunk
    ]
    batch = Batch.from_chunks(chunks, bs)
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 11, 1, 2, 3, 8, 8]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 6, 2, 3, 4, 4, 5]
    assert batch.query_start.tolist() == [0, 5, 6, 9, 11]
    assert batch.context_lens.tolist() == [5, 7, 5, 6]
    assert batch.block_tables.tolist() == [[7, 2], [3, 0], [4, 6], [1, 5]]  # trimmed to what each needs
    # slot = block_table[position // bs] * bs + position % bs
    assert batch.slot_mapping.tolist() == [28, 29, 30, 31, 8, 2, 18, 19, 24, 20, 21]
    assert batch.logits_indices.tolist() == [4, 5, 6, 7, 8]
    assert all(a.dtype == np.int32 for a in batch.arrays())


def test_too_few_blocks_is_an_error_naming_the_sequence():
    with pytest.raises(ValueError, match="sequence 1 has 1 KV blocks for 5 tokens"):
        Batch.from_chunks([SequenceChunk([1], 0, [0]), SequenceChunk([1, 2], 3, [1])], block_size=4)


@pytest.mark.parametrize("chunks, message", [
    ([], "at least one sequence"),
    ([SequenceChunk([], 0, [0])], "at least one new token"),
    ([SequenceChunk([1], -1, [0])], "negative position"),
])
def test_malformed_batches_are_rejected(chunks, message):
    with pytest.raises(ValueError, match=message):
        Batch.from_chunks(chunks, block_size=4)
