"""What the engine hands out after a step: per request, what is NEW for each of its completions.

Outputs are deltas, so a step costs the host work in proportion to the batch, not to how long the
completions already are: `delta` text, `delta_token_ids` and `delta_logprobs` cover the tokens generated
since the request's previous output. A completion that has finished also carries its whole `text`,
`token_ids` and `logprobs`, and a finished request's output lists every completion. `merge` joins two
consecutive outputs of one request (for a reader that fell behind, or to collect a whole result).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mili.engine.sampler import SampledToken


@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    queue_s: float | None          # arrival -> first scheduled
    ttft_s: float | None           # arrival -> first token
    time_per_output_token_s: float | None
    e2e_s: float | None            # arrival -> last sequence finished
    cached_tokens: int             # prompt tokens served from the prefix cache
    preemptions: int


@dataclass(frozen=True)
class CompletionOutput:
    index: int
    delta: str                                  # text new since the previous output
    delta_token_ids: list[int]
    delta_logprobs: list[SampledToken] | None  # None unless the request asked for logprobs
    finish_reason: str | None
    num_tokens: int                             # generated so far, in all
    # the whole completion, once it has finished
    text: str | None = None
    token_ids: list[int] | None = None
    logprobs: list[SampledToken] | None = None
    num_reasoning_tokens: int = 0               # generated inside the think block (tags included)

    def merge(self, later: CompletionOutput) -> CompletionOutput:
        logprobs = None if self.delta_logprobs is None else self.delta_logprobs + (later.delta_logprobs or [])
        return replace(later, delta=self.delta + later.delta, delta_token_ids=self.delta_token_ids +
                       later.delta_token_ids, delta_logprobs=logprobs)


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]   # the completions with news, by index (all of them when finished)
    finished: bool
    metrics: RequestMetrics
    error: str | None = None                # why the request failed (it then finishes with "abort")
    prompt_logprobs: list[SampledToken | None] | None = None  # once the prompt is scored (params.prompt_logprobs)
    error_from_request: bool = False        # the error is the request's (its grammar failed), not the engine's

    def merge(self, later: RequestOutput) -> RequestOutput:
        """This output followed by `later` (of the same request) as one output."""
        mine = {c.index: c for c in self.outputs}
        for c in later.outputs:
            mine[c.index] = mine[c.index].merge(c) if c.index in mine else c
        return replace(later, outputs=[mine[i] for i in sorted(mine)], error=later.error or self.error,
                       prompt_logprobs=later.prompt_logprobs or self.prompt_logprobs)
