"""The Batch: the flat arrays that cross from the host to the compiled graph, the only thing that does.

A step runs a ragged batch of sequences; each contributes `q_len >= 1` new tokens: a prefill, a chunk of
one, a decode token, or k+1 tokens to verify. `Batch.from_chunks` builds every array with numpy from one
`SequenceChunk` per sequence, with no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np


class LogitRows(Enum):
    """Which of a chunk's new tokens need logits."""

    LAST = "last"  # the next token after the chunk (prefill's end, decode)
    ALL = "all"    # every position (speculative verification, scoring a prompt)
    NONE = "none"  # a prefill chunk that does not reach the prompt's end


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's share of a step: `token_ids` at positions `start, start + 1, ...` (`start` tokens
    of the sequence are already in the KV cache), its KV pages in order, and which rows need logits."""

    token_ids: Sequence[int] | np.ndarray
    start: int
    block_table: Sequence[int] | np.ndarray
    logits: LogitRows = LogitRows.LAST

    @property
    def context_len(self) -> int:
        return self.start + len(self.token_ids)


@dataclass(frozen=True)
class Batch:
    """Graph inputs for one step, all int32 (T new tokens, B sequences, L logit rows)."""

    input_ids: np.ndarray       # [T]
    positions: np.ndarray       # [T]
    query_start: np.ndarray     # [B + 1] prefix sums of the sequences' new-token counts
    context_lens: np.ndarray    # [B] cached + new tokens per sequence
    block_tables: np.ndarray    # [B, max_blocks] physical KV block ids, padded with 0
    slot_mapping: np.ndarray    # [T] block * block_size + offset where each new token's K/V go
    logits_indices: np.ndarray  # [L] rows of the T tokens whose logits the step returns

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays in the graph's input order (mili.model.qwen3.BATCH_INPUTS)."""
        return (self.input_ids, self.positions, self.query_start, self.context_lens, self.block_tables,
                self.slot_mapping, self.logits_indices)

    @classmethod
    def from_chunks(cls, chunks: Sequence[SequenceChunk], block_size: int) -> Batch:
        if not chunks:
            raise ValueError("a batch needs at least one sequence")
        q_lens = np.array([len(c.token_ids) for c in chunks], np.int64)
        if (q_lens < 1).any():
            raise ValueError("every sequence in a batch needs at least one new token")
        starts = np.array([c.start for c in chunks], np.int64)
        if (starts < 0).any():
            raise ValueError("a chunk cannot start at a negative position")
        context_lens = starts + q_lens
        needed_blocks = -(-context_lens // block_size)
        max_blocks = int(needed_blocks.max())
        block_tables = np.zeros((len(chunks), max_blocks), np.int32)
        for row, (chunk, needed) in enumerate(zip(chunks, needed_blocks.tolist())):
            if len(chunk.block_table) < needed:
                raise ValueError(f"sequence {row} has {len(chunk.block_table)} KV blocks for {context_lens[row]} "
                                 f"tokens; needs {needed} of {block_size} tokens")
            block_tables[row, :needed] = chunk.block_table[:needed]

        query_start = np.concatenate([[0], np.cumsum(q_lens)])
        seq_of_token = np.repeat(np.arange(len(chunks)), q_lens)
        positions = starts[seq_of_token] + (np.arange(query_start[-1]) - query_start[seq_of_token])
        slots = block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
        input_ids = np.concatenate([np.asarray(c.token_ids, np.int64) for c in chunks])
        logits_indices = np.concatenate([_logit_rows(c.logits, query_start[i], q_lens[i])
                                         for i, c in enumerate(chunks)])
        return cls(
            input_ids=input_ids.astype(np.int32),
            positions=positions.astype(np.int32),
            query_start=query_start.astype(np.int32),
            context_lens=context_lens.astype(np.int32),
            block_tables=block_tables,
            slot_mapping=slots.astype(np.int32),
            logits_indices=logits_indices.astype(np.int32),
        )


def _logit_rows(which: LogitRows, first: int, count: int) -> np.ndarray:
    if which is LogitRows.LAST:
        return np.array([first + count - 1])
    if which is LogitRows.ALL:
        return np.arange(first, first + count)
    return np.zeros(0, np.int64)
