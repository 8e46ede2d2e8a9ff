"""A Request: one prompt, its sampling parameters, and its n completions (Sequences).

Siblings (n > 1) share the prompt: only the first is scheduled at once; the others start when the first
has its prompt in the prefix cache, so they reuse its KV blocks instead of computing them again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mili.engine.completion_text import CompletionText
from mili.engine.output_constraints import OutputConstraints
from mili.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from mili.engine.sampler import SampledToken, request_generator
from mili.engine.sampling_params import SamplingParams
from mili.engine.sequence import Sequence
from mili.tokenizer import Tokenizer


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    salt: Hashable = None
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    pending_siblings: list[Sequence] = field(default_factory=list)  # n > 1: wait for the shared prompt
    stop_token_ids: frozenset[int] = frozenset()
    # params.prompt_logprobs: each prompt token's logprob as its row is computed (the first has none: None)
    prompt_logprobs: list[SampledToken | None] | None = None
    error: str | None = None
    error_from_request: bool = False  # the request's own input failed it (its grammar), not the engine
    _distinct_prompt: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def create(cls, request_id: str, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer,
               seq_ids: Iterator[int], salt: Hashable = None,
               rules: Callable[[frozenset[int]], OutputConstraints | None] = lambda stops: None) -> Request:
        """`seq_ids` hands out the sequence ids (unique in the engine; they order siblings); `rules(stop ids)`
        makes each sequence's output constraints (mili/engine/output_constraints.py)."""
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(tokenizer.eos_token_ids))
        request = cls(request_id, tuple(prompt_ids), params, salt, stop_token_ids=frozenset(stops),
                      prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        request.sequences = [
            Sequence(next(seq_ids), request, i, list(prompt_ids), request_generator(params.seed, i),
                     CompletionText(tokenizer, params.stop, params.skip_special_tokens, params.include_stop),
                     constraints=rules(request.stop_token_ids))
            for i in range(params.n)]
        request.pending_siblings = request.sequences[1:]
        return request

    @property
    def prompt_array(self) -> np.ndarray:
        """The prompt's distinct token ids (for the repetition penalty), computed once."""
        if self._distinct_prompt is None:
            self._distinct_prompt = np.unique(np.asarray(self.prompt_ids, np.int64))
        return self._distinct_prompt

    @property
    def finished(self) -> bool:
        return not self.pending_siblings and all(s.is_finished for s in self.sequences)

    def output(self, changed: list[Sequence]) -> RequestOutput:
        """What is new for the `changed` sequences (all of them once the request has finished)."""
        finished = self.finished
        scored = self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(self.prompt_ids)
        return RequestOutput(self.request_id, list(self.prompt_ids),
                             [_completion(s) for s in (self.sequences if finished else changed)],
                             finished, self.metrics(), self.error, list(self.prompt_logprobs) if scored else None,
                             self.error_from_request)

    def metrics(self) -> RequestMetrics:
        first = self.sequences[0]
        generated = sum(s.num_output_tokens for s in self.sequences)
        end = max((s.finish_time for s in self.sequences if s.finish_time), default=None)
        per_token = None
        if end is not None and first.first_token_time is not None and generated > 1:
            per_token = (end - first.first_token_time) / (generated - 1)
        return RequestMetrics(
            arrival_time=self.arrival_time,
            queue_s=None if first.first_scheduled_time is None else first.first_scheduled_time - self.arrival_time,
            ttft_s=None if first.first_token_time is None else first.first_token_time - self.arrival_time,
            time_per_output_token_s=per_token,
            e2e_s=None if end is None else end - self.arrival_time,
            cached_tokens=first.num_cached,
            preemptions=sum(s.num_preemptions for s in self.sequences),
        )


def _completion(seq: Sequence) -> CompletionOutput:
    start = seq.num_prompt_tokens + seq.num_sent
    new_tokens = seq.token_ids[start:]
    wants_logprobs = seq.params.logprobs is not None
    new_logprobs = seq.logprobs[seq.num_sent:] if wants_logprobs else None
    seq.num_sent = seq.num_output_tokens
    whole = seq.is_finished
    return CompletionOutput(
        index=seq.index, delta=seq.text.take_delta(), delta_token_ids=new_tokens, delta_logprobs=new_logprobs,
        finish_reason=seq.finish_reason.value if seq.finish_reason else None, num_tokens=seq.num_output_tokens,
        num_reasoning_tokens=seq.constraints.num_thinking_tokens if seq.constraints else 0,
        text=seq.text.text if whole else None, token_ids=seq.output_ids if whole else None,
        logprobs=list(seq.logprobs) if whole and wants_logprobs else None)
