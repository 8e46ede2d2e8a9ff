"""Small drivers of the model runner and the engine for tests: greedy decoding, per-sequence runs, running an
engine until every request has finished."""

from __future__ import annotations

import numpy as np

from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.engine import Engine
from mili.engine.model_runner import ModelRunner
from mili.engine.outputs import RequestOutput


def run_chunk(runner: ModelRunner, token_ids, start: int, blocks: list[int],
              logits: LogitRows = LogitRows.ALL) -> np.ndarray:
    """One sequence's chunk alone in a batch; returns its logits rows."""
    return runner.run(Batch.from_chunks([SequenceChunk(np.asarray(token_ids), start, blocks, logits)],
                                        runner.block_size))


def greedy_generate(runner: ModelRunner, prompt: np.ndarray, new_tokens: int,
                    blocks: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Prefill, then one decode step per token; returns the tokens and each step's logits."""
    logits = [run_chunk(runner, prompt, 0, blocks, LogitRows.LAST)[0]]
    tokens = [int(np.argmax(logits[-1]))]
    while len(tokens) < new_tokens:
        position = len(prompt) + len(tokens) - 1
        logits.append(run_chunk(runner, [tokens[-1]], position, blocks, LogitRows.LAST)[0])
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, logits


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest reference magnitude."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def run_all(engine: Engine) -> dict[str, RequestOutput]:
    """Steps the engine until every request has finished; their last outputs by request id. The block
    bookkeeping is checked after every step, not just at the end."""
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.check_blocks()
    return finished
