"""A Sequence: one completion being generated, and the one home of its state.

It holds its tokens (prompt then output, one list), how many of them have K/V in the cache, its KV block
table (a leading part owned by the prefix cache and locked through `cache_node`, the rest its own), its
sampling state (random generator, token counts for penalties, logprobs, how well its speculative guesses
fare), its text (decoded, cut at stop strings, streamed in deltas) and its timings. A Request with n > 1 has
n sequences sharing the prompt.
The scheduler moves sequences between states; nothing here knows about HTTP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from mili.engine.completion_text import CompletionText
from mili.engine.radix_cache import RadixNode
from mili.engine.sampler import SampledToken
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import GuessDepth

if TYPE_CHECKING:
    from mili.engine.output_constraints import OutputConstraints
    from mili.engine.request import Request


class SequenceStatus(Enum):
    WAITING = "waiting"    # not scheduled yet, or preempted (its KV given back; recomputed when resumed)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens, the context limit, or a KV cache too small for the sequence
    ABORT = "abort"      # the client gave up, or the step that ran it failed


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int                    # which of the request's n completions
    token_ids: list[int]          # the prompt, then each generated token (appended in place)
    generator: np.random.Generator
    text: CompletionText
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0         # leading tokens whose K/V are in this sequence's blocks
    num_cached: int = 0           # prompt tokens served by the prefix cache when first scheduled
    blocks: list[int] = field(default_factory=list)  # the block table
    num_shared_blocks: int = 0    # leading blocks owned by the prefix cache (locked via cache_node)
    cache_node: RadixNode | None = None
    output_counts: dict[int, int] = field(default_factory=dict)  # generated token -> times (penalties)
    logprobs: list[SampledToken] = field(default_factory=list)
    num_sent: int = 0             # generated tokens already handed out in an output
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    guess_depth: GuessDepth = field(default_factory=GuessDepth)  # speculative decoding: how deep to guess
    constraints: OutputConstraints | None = None  # logit bias, min tokens, think block, structured output

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_array(self) -> np.ndarray:
        return self.request.prompt_array

    @property
    def scores_prompt(self) -> bool:
        """This sequence computes its prompt's logprobs (the first of a request that asks for them, until done):
        logits at every prompt row, no prefix-cache hits past the rows already scored."""
        scored = self.request.prompt_logprobs
        return scored is not None and self.index == 0 and len(scored) < self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.token_ids) - self.num_computed

    @property
    def priority(self) -> tuple[float, int]:
        """Older requests first; siblings of one request in order. Preemption only takes from later ones."""
        return self.request.arrival_time, self.seq_id

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, sampled: SampledToken) -> None:
        self.token_ids.append(sampled.token)
        self.output_counts[sampled.token] = self.output_counts.get(sampled.token, 0) + 1
        if self.params.logprobs is not None:
            self.logprobs.append(sampled)

    def finish(self, reason: FinishReason) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.monotonic()
