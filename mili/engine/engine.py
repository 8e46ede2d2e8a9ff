"""The engine: requests in, streamed completions out, one `step()` at a time.

    engine = Engine.from_pretrained(model_dir, max_num_seqs=32)
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=20))
    while engine.has_unfinished():
        for out in engine.step(): ...

Each step asks the scheduler for a batch, runs it on the model runner, samples one token for every
sequence whose chunk reached its end, and updates text and stop conditions. A failure inside a step fails
the requests of that batch (their outputs carry the error) and the engine goes on with the rest.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Hashable, Sequence as Seq
from dataclasses import dataclass, field

from mili.engine.block_pool import BlockPool
from mili.engine.model_runner import ModelRunner
from mili.engine.output import CompletionState
from mili.engine.radix_cache import RadixCache
from mili.engine.sampler import SampledToken, Sampler, request_generator
from mili.engine.sampling_params import SamplingParams
from mili.engine.scheduler import Scheduler, SchedulerConfig
from mili.engine.sequence import FinishReason, Sequence, SequenceStatus
from mili.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (the message says why); nothing was queued."""


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_cache: bool = True
    debug_checks: bool = False  # verify the block bookkeeping whenever the engine goes idle
    max_model_len: int | None = None  # context limit (prompt + output); default: the model's positions

    def scheduler_config(self, block_size: int) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, block_size)


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
    text: str                      # everything so far
    delta: str                     # what is new since the previous output of this request
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[SampledToken] | None


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    error: str | None = None


@dataclass(eq=False)
class PreparedRequest:
    """A checked, tokenized request and the state of its completions."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence]
    completions: list[CompletionState]
    pending_siblings: list[Sequence] = field(default_factory=list)  # n > 1: wait for the shared prompt
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 num_blocks: int | None = None) -> None:
        """`num_blocks` limits the engine to the first blocks of the runner's KV cache (default: all)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        if num_blocks is not None and not 1 <= num_blocks <= runner.num_blocks:
            raise ValueError(f"num_blocks must be in [1, {runner.num_blocks}], got {num_blocks}")
        self.pool = BlockPool(num_blocks or runner.num_blocks)
        self.cache = RadixCache(self.pool, runner.block_size, enabled=config.enable_prefix_cache)
        self.scheduler = Scheduler(config.scheduler_config(runner.block_size), self.pool, self.cache)
        self.sampler = Sampler()
        self.max_model_len = min(runner.config.max_position_embeddings,
                                 config.max_model_len or runner.config.max_position_embeddings)
        self._requests: dict[str, PreparedRequest] = {}
        self._seq_ids = itertools.count()
        self.num_aborted = 0

    @classmethod
    def from_pretrained(cls, model_dir: str, *, dtype: str | None = None, device: str = "cpu", block_size: int = 16,
                        num_kv_blocks: int | None = None, kv_cache_bytes: int | None = None,
                        **engine_args: object) -> Engine:
        runner = ModelRunner.from_pretrained(model_dir, dtype=dtype, device=device, block_size=block_size,
                                             num_blocks=num_kv_blocks, kv_cache_bytes=kv_cache_bytes)
        return cls(runner, Tokenizer.from_pretrained(model_dir), EngineConfig(**engine_args))

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams,
                    salt: Hashable = None) -> list[int]:
        """Queues a request; returns its prompt token ids. Raises RequestError for a request that cannot run."""
        request = self.prepare_request(request_id, prompt, params, salt)
        self.enqueue(request)
        return list(request.prompt_ids)

    def prepare_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams,
                        salt: Hashable = None) -> PreparedRequest:
        """Tokenizes and checks a request without touching the queues (safe from another thread)."""
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise RequestError("the prompt is empty: it needs at least one token")
        vocab = self.runner.config.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise RequestError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                               f"{self.max_model_len} tokens, and at least one must be left to generate")
        blocks_needed = -(-(len(prompt_ids) + 1) // self.runner.block_size)
        if blocks_needed > self.pool.num_blocks:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens, more than the whole KV cache holds "
                               f"({self.pool.num_blocks * self.runner.block_size} tokens)")
        sequences = [Sequence(next(self._seq_ids), request_id, list(prompt_ids), params,
                              request_generator(params.seed, sibling), salt) for sibling in range(params.n)]
        return PreparedRequest(request_id, list(prompt_ids), params, sequences,
                               [CompletionState.create(params, self.tokenizer) for _ in sequences])

    def enqueue(self, request: PreparedRequest) -> None:
        if request.request_id in self._requests:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self.scheduler.add(request.sequences[0])
        request.pending_siblings = request.sequences[1:]

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees its blocks; False if it is unknown or already done."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
        self.num_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan is None:
            self._check_when_idle()
            return []
        touched: dict[str, PreparedRequest] = {}
        try:
            logits = self.runner.run(plan.batch)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the engine down
            log.exception("step failed; failing its %d request(s)", len(plan.chunks))
            for chunk in plan.chunks:
                request = self._requests.get(chunk.seq.request_id)
                if request is not None:
                    request.error = f"the model step failed: {exc}"
                    self._finish_request(request, FinishReason.ABORT)
                    touched[request.request_id] = request
            return self._outputs(touched)

        sampling = [c for c in plan.chunks if c.samples]
        sampled = self.sampler.sample(logits, [c.seq.sampling_row for c in sampling])
        for chunk in plan.chunks:
            self.scheduler.finish_chunk(chunk)
        now = time.monotonic()
        for chunk, token in zip(sampling, sampled):
            seq = chunk.seq
            request = self._requests[seq.request_id]
            touched[request.request_id] = request
            if seq.first_token_time is None:
                seq.first_token_time = now
                self._release_siblings(request)
            seq.output_ids.append(token.token)
            completion = request.completions[request.sequences.index(seq)]
            reason = completion.add(token, room_left=self.max_model_len - seq.num_tokens)
            if reason is not None:
                self._finish(seq, reason)
        return self._outputs(touched)

    def _release_siblings(self, request: PreparedRequest) -> None:
        """n > 1: the first sequence's prompt is now cached; its siblings start and reuse it."""
        for sibling in request.pending_siblings:
            self.scheduler.add(sibling)
        request.pending_siblings = []

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finish_time = time.monotonic()
        self.scheduler.remove(seq)

    def _finish_request(self, request: PreparedRequest, reason: FinishReason) -> None:
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, reason)
        request.pending_siblings = []

    def _outputs(self, touched: dict[str, PreparedRequest]) -> list[RequestOutput]:
        outputs = []
        for request in touched.values():
            finished = request.finished
            completions = [
                CompletionOutput(
                    index=i, text=state.text, delta=state.take_delta(seq.is_finished), token_ids=list(state.token_ids),
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    logprobs=list(state.logprobs) if request.params.logprobs is not None else None)
                for i, (seq, state) in enumerate(zip(request.sequences, request.completions))]
            outputs.append(RequestOutput(request.request_id, request.prompt_ids, completions, finished,
                                         self._metrics(request), request.error))
            if finished:
                self._requests.pop(request.request_id, None)
        return outputs

    @staticmethod
    def _metrics(request: PreparedRequest) -> RequestMetrics:
        first = request.sequences[0]
        generated = sum(len(s.output_ids) for s in request.sequences)
        end = max((s.finish_time for s in request.sequences if s.finish_time), default=None)
        per_token = None
        if end is not None and first.first_token_time is not None and generated > 1:
            per_token = (end - first.first_token_time) / (generated - 1)
        return RequestMetrics(
            arrival_time=first.arrival_time,
            queue_s=None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time,
            ttft_s=None if first.first_token_time is None else first.first_token_time - first.arrival_time,
            time_per_output_token_s=per_token,
            e2e_s=None if end is None else end - first.arrival_time,
            cached_tokens=first.num_cached,
            preemptions=sum(s.num_preemptions for s in request.sequences),
        )

    def check_blocks(self) -> None:
        """Verifies the block bookkeeping (AssertionError if broken): every block's references are the
        sequences and the prefix cache holding it, and nothing leaked."""
        self.cache.check(seq.blocks for seq in self.scheduler.all_sequences())

    def _check_when_idle(self) -> None:
        if self.config.debug_checks:
            self.check_blocks()
