"""A stand-in for the model runner that checks the KV bookkeeping for real, in microseconds per step.

`FakeRunner` keeps a fake KV cache (one token id per slot). Each step stores every new token at its
slot, then computes the logits of a position from what the block table says the cache holds for
positions 0..p: a hash of that context picks the favourite next token. If the scheduler or the prefix
cache ever hands a sequence a block holding someone else's tokens (or a stale one), the logits differ
from `reference_next_token(tokens)`, computed from the true token list: the engine's output then
differs from `reference_completion`, and the property tests fail.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mili.config import GenerationConfig
from mili.engine.batch import Batch

VOCAB = 64


@dataclass(frozen=True)
class FakeModelConfig:
    vocab_size: int = VOCAB
    max_position_embeddings: int = 4096


def context_logits(context: np.ndarray, vocab: int = VOCAB) -> np.ndarray:
    """Logits after `context`: peaked on a token chosen by a hash of the whole context."""
    digest = hashlib.blake2b(np.asarray(context, np.int64).tobytes(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    logits = rng.standard_normal(vocab).astype(np.float32)
    logits[rng.integers(vocab)] += 4.0
    return logits


def reference_next_token(context: list[int]) -> int:
    return int(np.argmax(context_logits(np.asarray(context))))


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int = 4, model_dir: Path | None = None,
                 max_positions: int = 4096, vocab_size: int = VOCAB) -> None:
        """`vocab_size`: the logits' width (Qwen3's 151,936 to run beside the real tokenizer)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.config = FakeModelConfig(vocab_size=vocab_size, max_position_embeddings=max_positions)
        # a folder without generation_config.json: no sampling defaults
        self.source = SimpleNamespace(generation_config=lambda: GenerationConfig.from_pretrained(
            model_dir or Path("/nonexistent")))
        self.kv = np.full(num_blocks * block_size, -1, np.int64)
        self.dtype = SimpleNamespace(name="fake")  # what `mili serve` logs about a runner
        self.startup = SimpleNamespace(weights_s=0.0, compile_s=0.0)
        self.steps = 0
        self.fail_at_step: int | None = None  # the step (1-based) that raises, to test failure handling
        self.step_delay_s = 0.0               # to make requests last long enough to disconnect mid-way

    def run(self, batch: Batch) -> np.ndarray:
        self.steps += 1
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.steps == self.fail_at_step:
            raise RuntimeError("injected model failure")
        self.kv[batch.slot_mapping] = batch.input_ids
        rows = []
        for row in batch.logits_indices:
            seq = int(np.searchsorted(batch.query_start, row, side="right") - 1)
            length = int(batch.positions[row]) + 1
            positions = np.arange(length)
            blocks = batch.block_tables[seq, positions // self.block_size]
            context = self.kv[blocks * self.block_size + positions % self.block_size]
            rows.append(context_logits(context, self.config.vocab_size))
        return np.stack(rows) if rows else np.zeros((0, self.config.vocab_size), np.float32)


class FakeTokenizer:
    """Token t is the letter chr(ord('a') + t % 26) (plus a digit for t >= 26): enough text for stop strings."""

    eos_token_ids = frozenset({VOCAB - 1})

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + t % 26) + ("" if t < 26 else str(t // 26)) for t in token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode([token_id]).encode()

    def token_to_id(self, token: str) -> int | None:
        return None  # no <think> tokens
