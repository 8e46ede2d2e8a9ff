"""Turning sampled tokens into a completion's text, and deciding when it stops.

A completion stops at EOS (unless `ignore_eos`), at a stop token id, at `max_tokens`, at the context limit,
or when its text contains a stop string. Stop strings are never part of the output, even when a stop string
is spread over several tokens: text that could still turn out to be the start of a stop string is held
back from the stream until the next tokens settle it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from mili.detokenizer import IncrementalDetokenizer
from mili.engine.sampler import SampledToken
from mili.engine.sampling_params import SamplingParams
from mili.engine.sequence import FinishReason
from mili.tokenizer import Tokenizer


def held_back_length(text: str, stops: Collection[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class CompletionState:
    """The text side of one sequence: everything decoded, what was streamed, and the logprobs."""

    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_token_ids: frozenset[int]
    text: str = ""            # decoded so far (stop string excluded once found)
    streamed: int = 0         # characters of `text` already handed out
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)

    @classmethod
    def create(cls, params: SamplingParams, tokenizer: Tokenizer) -> CompletionState:
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(tokenizer.eos_token_ids)
        return cls(params, IncrementalDetokenizer(tokenizer, params.skip_special_tokens), frozenset(stops))

    def add(self, sampled: SampledToken, room_left: int) -> FinishReason | None:
        """Takes one sampled token; returns why the completion ends, if it does. `room_left` is how many
        more tokens the context allows after this one."""
        token = sampled.token
        if token in self.stop_token_ids:
            # the stop token counts as generated but adds no text (as in vLLM and OpenAI)
            self.token_ids.append(token)
            self._keep_logprob(sampled)
            self.text += self.detokenizer.finish()
            return FinishReason.STOP
        self.token_ids.append(token)
        self._keep_logprob(sampled)
        searched_from = max(0, len(self.text) - max((len(s) for s in self.params.stop), default=0))
        self.text += self.detokenizer.add(token)
        for stop in self.params.stop:
            found = self.text.find(stop, searched_from)
            if found != -1:
                self.text = self.text[:found]
                return FinishReason.STOP
        if len(self.token_ids) >= self.params.max_tokens or room_left <= 0:
            self.text += self.detokenizer.finish()
            self._cut_at_stop_string()
            return FinishReason.LENGTH
        return None

    def _cut_at_stop_string(self) -> None:
        for stop in self.params.stop:
            found = self.text.find(stop)
            if found != -1:
                self.text = self.text[:found]

    def _keep_logprob(self, sampled: SampledToken) -> None:
        if self.params.logprobs is not None:
            self.logprobs.append(sampled)

    def take_delta(self, finished: bool) -> str:
        """New text to stream: all of it when finished, else all but what a stop string might still claim."""
        end = len(self.text) if finished else len(self.text) - held_back_length(self.text, self.params.stop)
        delta = self.text[self.streamed:max(end, self.streamed)]
        self.streamed += len(delta)
        return delta
