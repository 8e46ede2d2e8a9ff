"""What one sequence's next tokens may be, beyond what the model prefers: the rules that shape its logits.

- `logit_bias`: added to the named tokens' logits (OpenAI's rule);
- `min_tokens`: stop tokens (EOS included) are barred until that many tokens were generated (the engine checks
  no stop string before then either, as vLLM);
- the think block: where the output may open with `<think>` (or starts inside one the prompt opened), its
  tokens are counted (usage's reasoning_tokens), a thinking budget forces `</think>` once it is spent, and
  structured output applies only after the block (the answer must match the schema, the thoughts need not);
- structured output: an llguidance matcher allows exactly the tokens that keep the text inside the grammar,
  and finishes the sequence when the grammar is complete.

`shape_rows` applies these to a copy of a step's logits: one mask per row, also for the rows of a speculative
verification (row j is the distribution after the first j guesses; a guess the rules forbid gets probability 0
there, so verification rejects it). Logprobs stay the model's own (taken from the raw logits). A row a mask left
few tokens comes with those tokens, so the sampler draws over them alone.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from mili.engine.sampling_params import SamplingParams, Thinking
from mili.engine.structured_output import GrammarBackend, unpack_mask

if TYPE_CHECKING:
    import llguidance


SMALL_SUPPORT = 4  # a mask that allows under a quarter of the vocabulary hands the sampler its tokens


class Phase(Enum):
    MAY_OPEN = "may_open"   # no token yet: the output may open a think block
    THINKING = "thinking"   # inside the think block
    ANSWER = "answer"       # after it (or there is none)


@dataclass(frozen=True)
class ThinkTokens:
    start: int  # <think>
    end: int    # </think>


class OutputConstraints:
    """One sequence's rules and their state (phase, tokens thought, the grammar matcher)."""

    def __init__(self, params: SamplingParams, stop_token_ids: frozenset[int], think: ThinkTokens | None,
                 matcher: llguidance.LLMatcher | None) -> None:
        self.params = params
        self.think = think
        self.matcher = matcher
        self.phase = {Thinking.OFF: Phase.ANSWER, Thinking.MAY_OPEN: Phase.MAY_OPEN,
                      Thinking.OPEN: Phase.THINKING}[params.thinking]
        self.num_thinking_tokens = 0  # output tokens inside the think block, its tags included
        self.grammar_done = False     # the matcher took a stop token: the text is complete
        self.grammar_failed: str | None = None
        self._stop_ids = np.array(sorted(stop_token_ids), np.int64)
        bias = params.logit_bias
        self._bias_ids = np.array([t for t, _ in bias], np.int64)
        self._bias_values = np.array([b for _, b in bias], np.float32)

    @property
    def uses_grammar(self) -> bool:
        return self.matcher is not None and self.phase is not Phase.THINKING

    def grammar_row_request(self, row: int, guesses: Seq[int]) -> tuple[llguidance.LLMatcher, int, list[int]] | None:
        """What the grammar engine must fill for this sequence's rows from `row`: None when no row needs it."""
        if not self.uses_grammar or self.grammar_done:
            return None
        return self.matcher, row, list(guesses)

    def guess_limit(self) -> int | None:
        """How many speculative guesses this sequence's rules allow now (None: no limit). Every verified row must
        be under the same rules: no guessing before the first token (it may open a think block), and none that
        would reach a spent thinking budget. Guessed think tags are cut off by `usable_guesses`."""
        if self.phase is Phase.MAY_OPEN:
            return 0
        budget = self.params.thinking_token_budget
        if self.phase is Phase.THINKING and budget is not None:
            return max(0, budget - self._thought() - 1)
        return None

    def usable_guesses(self, guesses: list[int]) -> list[int]:
        """`guesses` up to the first think tag (a tag would change the rules part-way through the rows)."""
        if self.think is None:
            return guesses
        for i, token in enumerate(guesses):
            if token == self.think.start or token == self.think.end:
                return guesses[:i]
        return guesses

    def _thought(self) -> int:
        """Tokens thought so far, the tags not counted (what the budget bounds)."""
        return max(0, self.num_thinking_tokens - (1 if self.params.thinking is Thinking.MAY_OPEN else 0))

    def shape(self, row: np.ndarray, offset: int, grammar_words: np.ndarray | None,
              num_output: int) -> np.ndarray | None:
        """Applies the rules to `row` (one logit row, in place) for the token `offset` places after the next
        (rows of a verification); `grammar_words` is the grammar's mask for it, when the grammar applies.
        Returns the tokens the row still allows (ascending) when they are few, for the sampler; else None."""
        if len(self._bias_ids):
            row[self._bias_ids] += self._bias_values
        if self.phase is Phase.THINKING and self.params.thinking_token_budget is not None \
                and self._thought() + offset >= self.params.thinking_token_budget:
            keep = row[self.think.end]
            row[:] = -np.inf
            row[self.think.end] = keep if np.isfinite(keep) else 0.0
            return np.array([self.think.end])
        allowed = None
        if grammar_words is not None:
            allowed = unpack_mask(grammar_words, len(row)).copy()
            if self.phase is Phase.MAY_OPEN:
                allowed[self.think.start] = True
        if num_output + offset < self.params.min_tokens and len(self._stop_ids):
            if allowed is None:
                row[self._stop_ids] = -np.inf
            else:
                barred = allowed.copy()
                barred[self._stop_ids] = False
                if barred.any():  # a complete grammar allows only stop tokens: the grammar wins
                    allowed = barred
        if allowed is None:
            return None
        np.putmask(row, ~allowed, -np.inf)
        count = int(np.count_nonzero(allowed))
        return np.flatnonzero(allowed) if count * SMALL_SUPPORT < len(row) else None

    def take(self, token: int) -> None:
        """Advances the rules' state past a generated token."""
        think = self.think
        if self.phase is Phase.MAY_OPEN:
            if think is not None and token == think.start:
                self.phase = Phase.THINKING
                self.num_thinking_tokens = 1
                return
            self.phase = Phase.ANSWER
        elif self.phase is Phase.THINKING:
            self.num_thinking_tokens += 1
            if think is not None and token == think.end:
                self.phase = Phase.ANSWER
            return
        if self.matcher is not None and not self.grammar_done and self.grammar_failed is None:
            if not self.matcher.consume_token(token):
                self.grammar_failed = self.matcher.get_error() or f"token {token} is outside the grammar"
            elif self.matcher.is_stopped():
                self.grammar_done = True


def make_constraints(params: SamplingParams, stop_token_ids: frozenset[int], think: ThinkTokens | None,
                     grammars: GrammarBackend) -> OutputConstraints | None:
    """The rules a sequence with `params` needs (None when its logits need no shaping and nothing is counted).
    Compiles its grammar (StructuredOutputError if it does not): call off the step loop."""
    if not (params.structured_output or params.logit_bias or params.min_tokens
            or params.thinking is not Thinking.OFF):
        return None
    matcher = grammars.matcher(params.structured_output) if params.structured_output else None
    return OutputConstraints(params, stop_token_ids, think if params.thinking is not Thinking.OFF else None, matcher)


def shape_rows(logits: np.ndarray, rows: list[tuple[OutputConstraints, int, list[int], int]],
               grammars: GrammarBackend) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """`logits` with the rules applied to the rows of constrained sequences: for each (constraints, first row,
    guesses, tokens generated so far), rows first .. first + len(guesses). Returns a shaped copy (the raw
    logits stay for logprobs), or `logits` itself when no row is constrained; and by row, the few tokens a
    row still allows (see OutputConstraints.shape)."""
    supports: dict[int, np.ndarray] = {}
    if not rows:
        return logits, supports
    shaped = logits.copy()
    requests = [r for c, first, guesses, _ in rows if (r := c.grammar_row_request(first, guesses)) is not None]
    words = None
    if requests:
        words = np.full((len(logits), grammars.words), -1, np.int32)
        grammars.fill_masks(requests, words)
    for constraints, first, guesses, num_output in rows:
        grammar = words is not None and constraints.uses_grammar and not constraints.grammar_done
        for offset in range(len(guesses) + 1):
            support = constraints.shape(shaped[first + offset], offset, words[first + offset] if grammar else None,
                                        num_output)
            if support is not None:
                supports[first + offset] = support
    return shaped, supports
