"""A Sequence: one completion being generated (a request with n > 1 has n of them, sharing the prompt).

It carries its token ids, how many of them have K/V in the cache, the KV blocks it holds a reference to,
the prefix-cache node it keeps locked, and its sampling state. The scheduler moves it between states;
nothing here knows about HTTP or text.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from mili.engine.radix_cache import RadixNode
from mili.engine.sampler import SamplingRow
from mili.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"    # not scheduled yet, or preempted (its KV freed; recomputed when resumed)
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or the context limit
    ABORT = "abort"      # the client gave up, or the step that ran it failed


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: np.random.Generator
    salt: Hashable = None
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0        # leading tokens whose K/V are in this sequence's blocks
    num_cached: int = 0          # of the prompt, how many came from the prefix cache (first schedule)
    blocks: list[int] = field(default_factory=list)
    cache_node: RadixNode | None = None  # locked while this sequence uses cached blocks
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    def __post_init__(self) -> None:
        self.sampling_row = SamplingRow(self.params, self.generator, np.asarray(self.prompt_ids, np.int64),
                                        self.output_ids)  # shares output_ids: always current

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
