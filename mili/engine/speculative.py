"""Speculative decoding: what is configured, what a proposer hands the engine, and what it achieved.

A proposer guesses the next few tokens of a decoding sequence; the target model runs the sequence's last token
and the guesses in one step (a chunk of k + 1 tokens with logits at every row) and mili/engine/verifier.py keeps
the longest prefix the target agrees with, plus one token of the target's own. Decode is memory-bound, so the
extra rows cost far less than the steps they save when guesses are good. Proposers:
- "ngram": prompt lookup (mili/engine/ngram_proposer.py), free to run, strong when the output repeats its input;
- "draft": a smaller Qwen3 with the same tokenizer (mili/engine/draft_proposer.py).
Speculation turns itself off while more than `max_batch_size` sequences run: a big batch already reads the
weights once for many tokens, and the extra rows would then cost real compute.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np

from mili.engine.ngram_proposer import NgramProposer

if TYPE_CHECKING:
    from mili.engine.sequence import Sequence

METHODS = ("ngram", "draft")
# Measured (benchmarks/speculative.py, benchmarks/NOTES.md): on 2 cores a verify step of 5 rows costs ~1.5x a
# decode step at batch 1, while at 8+ sequences the step is no longer bound by the weight stream.
DEFAULT_MAX_BATCH_SIZE = 4


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str                        # "ngram" or "draft"
    num_speculative_tokens: int = 4    # k: most tokens proposed per sequence and step
    draft_model: str | None = None     # checkpoint folder of the draft model ("draft")
    ngram_min: int = 2                 # shortest suffix that counts as a match ("ngram")
    ngram_max: int = 4
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # speculate only while at most this many sequences run

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs a draft model (--draft-model)")
        if self.method != "draft" and self.draft_model:
            raise ValueError("a draft model was given, but the speculative method is not 'draft'")
        if self.max_batch_size < 1:
            raise ValueError(f"the speculation batch-size limit must be at least 1, got {self.max_batch_size}")
        NgramProposer(self.ngram_min, self.ngram_max, self.num_speculative_tokens)  # checks the n-gram sizes


@dataclass
class GuessDepth:
    """How many tokens to guess for one sequence, from how its guesses fared: an average of its acceptance rates
    (recent steps weigh most) sets the depth to the run of accepted guesses it predicts plus one; a sequence
    whose guesses keep failing stops guessing for a pause of 8 steps, then tries again; each further failure in
    a row doubles the pause (up to 128 steps), a kept guess resets it. Bad guesses cost a verify step ~1.1-1.7x a
    decode step (and a draft model its own steps), so they must not go on for long."""

    DECAY: ClassVar[float] = 0.5
    GIVE_UP_BELOW: ClassVar[float] = 0.15
    FIRST_PAUSE: ClassVar[int] = 8
    LONGEST_PAUSE: ClassVar[int] = 128

    acceptance: float = 1.0  # start optimistic: the first guesses are how we learn
    paused_steps: int = 0
    next_pause: int = FIRST_PAUSE

    def limit(self, k: int) -> int:
        """Tokens to guess this step (0 while paused)."""
        if self.paused_steps:
            self.paused_steps -= 1
            return 0
        expected_run = self.acceptance / max(1e-9, 1.0 - self.acceptance)  # geometric: mean accepted run
        return max(1, min(k, 1 + int(expected_run)))

    def record(self, proposed: int, accepted: int) -> None:
        self.acceptance = self.DECAY * self.acceptance + (1 - self.DECAY) * accepted / proposed
        if accepted:
            self.next_pause = self.FIRST_PAUSE
        if self.acceptance < self.GIVE_UP_BELOW:
            self.paused_steps, self.acceptance = self.next_pause, 0.5
            self.next_pause = min(self.LONGEST_PAUSE, 2 * self.next_pause)


@dataclass(frozen=True)
class Proposal:
    """Guessed next tokens of one sequence. `draft_probs[j]` is the distribution token j was drawn from, as
    (token ids, probabilities); None when every token is certain (n-gram lookup, greedy drafts): q is one-hot."""

    tokens: list[int]
    draft_probs: list[tuple[np.ndarray, np.ndarray]] | None = None


class Proposer(Protocol):
    def propose(self, seqs: Seq[Sequence], limits: Seq[int]) -> list[Proposal]:
        """A proposal of at most limits[i] tokens for each decoding sequence seqs[i] (empty when no guess)."""
        ...

    def keep_only(self, alive: set[int]) -> None:
        """Drops whatever is kept for sequences whose seq_id is not in `alive` (finished, aborted, preempted)."""
        ...


class NgramLookup:
    """The Proposer face of NgramProposer: one suffix search per sequence, nothing kept between steps."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.ngram = NgramProposer(config.ngram_min, config.ngram_max, config.num_speculative_tokens)

    def propose(self, seqs: Seq[Sequence], limits: Seq[int]) -> list[Proposal]:
        return [Proposal(self.ngram.propose(seq.token_ids)[:limit]) for seq, limit in zip(seqs, limits)]

    def keep_only(self, alive: set[int]) -> None:
        pass


@dataclass
class SpeculationStats:
    """Counters since start: what was proposed, verified and accepted (/metrics, /status, benchmarks)."""

    verify_steps: int = 0     # sequence-steps that verified at least one proposed token
    proposed: int = 0         # proposed tokens the target verified
    accepted: int = 0         # of those, kept
    emitted: int = 0          # tokens those sequence-steps produced (accepted + the target's own)
    skipped_busy_steps: int = 0  # steps in which speculation was off because too many sequences ran
    proposer_failures: int = 0   # steps whose proposer raised (they ran without guesses; the log has why)

    def record(self, proposed: int, accepted: int, emitted: int) -> None:
        self.verify_steps += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step produced on average (accepted guesses + the target's own token; 1 = no gain)."""
        return self.emitted / self.verify_steps if self.verify_steps else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"verify_steps": self.verify_steps, "proposed_tokens": self.proposed,
                "accepted_tokens": self.accepted, "emitted_tokens": self.emitted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4),
                "skipped_busy_steps": self.skipped_busy_steps, "proposer_failures": self.proposer_failures}
