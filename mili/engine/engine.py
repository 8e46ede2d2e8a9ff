"""The engine: requests in, streamed completions out, one `step()` at a time.

    engine = Engine.from_pretrained(model_dir, max_num_seqs=32)
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=20))
    while engine.has_unfinished():
        for out in engine.step(): print(out.outputs[0].delta, end="")

One step: with speculative decoding on, a proposer guesses the next tokens of the decoding sequences
(mili/engine/speculative.py); the scheduler picks a batch (plan), the model runner computes it, the sampler
picks one token for every sequence whose chunk reached its end (the verifier, for a chunk with guesses: the
kept guesses and one token more), and each such sequence takes its tokens (text, stop checks). Outputs are
deltas (mili/engine/outputs.py). Every step with work to do computes something or finishes something (see
scheduler.py). A failure anywhere in a step fails the requests of that step, with the error in their output,
and the engine goes on with the rest.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Hashable, Iterable, Sequence as Seq
from pathlib import Path

import numpy as np

from mili.engine.block_audit import audit_blocks
from mili.engine.block_pool import BlockPool
from mili.engine.config import EngineConfig
from mili.engine.model_runner import ModelRunner
from mili.engine.output_constraints import ThinkTokens, make_constraints, shape_rows
from mili.engine.outputs import RequestOutput
from mili.engine.radix_cache import RadixCache
from mili.engine.request import Request
from mili.engine.sampler import SampledToken, Sampler, finite_logits, log_softmax_rows, with_logprobs
from mili.engine.sampling_params import SamplingParams, Thinking
from mili.engine.scheduler import ScheduledChunk, Scheduler, StepPlan
from mili.engine.sequence import FinishReason, Sequence, SequenceStatus
from mili.engine.speculative import NgramLookup, Proposal, Proposer, SpeculationStats, SpeculativeConfig
from mili.engine.structured_output import GrammarBackend, StructuredOutputError
from mili.engine.verifier import verify
from mili.model_source import ModelSource
from mili.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot take (the message says why, `param` which parameter); nothing was queued."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, config: EngineConfig = EngineConfig(),
                 num_blocks: int | None = None, proposer: Proposer | None = None) -> None:
        """`num_blocks` limits the engine to the first blocks of the runner's KV cache (default: all);
        `proposer`: guesses for speculative decoding (default: what config.speculative asks for, built here
        for n-gram lookup; a draft model's proposer is built by from_pretrained, which loads it)."""
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        if num_blocks is not None and not 1 <= num_blocks <= runner.num_blocks:
            raise ValueError(f"num_blocks must be in [1, {runner.num_blocks}], got {num_blocks}")
        self.pool = BlockPool(num_blocks or runner.num_blocks)
        self.cache = RadixCache(self.pool, runner.block_size, enabled=config.enable_prefix_cache)
        self.scheduler = Scheduler(config.scheduler_config(runner.block_size), self.pool, self.cache)
        self.sampler = Sampler()
        self.grammars = GrammarBackend(tokenizer, runner.config.vocab_size)
        think = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
        self.think_tokens = ThinkTokens(*think) if None not in think else None
        self.max_model_len = config.context_limit(runner.config.max_position_embeddings,
                                                  self.pool.num_blocks * runner.block_size)
        # the checkpoint's suggested sampling settings (Qwen3: temperature 0.6, top_p 0.95, top_k 20), used
        # for whatever a request leaves unset, as transformers and vLLM do
        self.sampling_defaults = dict(runner.source.generation_config().sampling_defaults)
        self._requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.num_aborted = 0
        if proposer is not None and config.speculative is None:
            raise ValueError("a speculative proposer was given, but the engine config has no speculative settings")
        self.proposer = proposer if proposer is not None else make_proposer(config.speculative)
        self.speculation = SpeculationStats()

    @classmethod
    def from_pretrained(cls, model: str | Path | ModelSource, *, dtype: str | None = None, device: str = "cpu",
                        quantization: str | None = None, block_size: int = 16, num_kv_blocks: int | None = None,
                        kv_cache_bytes: float | None = None, float_activations: bool = False,
                        **engine_args: object) -> Engine:
        """`model`: a checkpoint folder, a GGUF file or an opened ModelSource (with its tokenizer override);
        `dtype`: auto (None), float32 or bfloat16; `quantization`: none (None), int8 or int4, and
        `float_activations` (see ModelRunner.from_pretrained); `engine_args`: EngineConfig's fields."""
        source = model if isinstance(model, ModelSource) else ModelSource.open(model)
        runner = ModelRunner.from_pretrained(source, dtype=dtype, device=device, quantization=quantization,
                                             block_size=block_size, num_blocks=num_kv_blocks,
                                             kv_cache_bytes=kv_cache_bytes, float_activations=float_activations)
        config = EngineConfig(**engine_args)
        proposer = None
        if config.speculative is not None and config.speculative.method == "draft":
            from mili.engine.draft_proposer import DraftProposer
            proposer = DraftProposer.from_pretrained(config.speculative, runner, dtype=dtype, quantization=quantization,
                                                     float_activations=float_activations)
        return cls(runner, source.tokenizer(), config, proposer=proposer)

    def default_sampling_params(self, **overrides: object) -> SamplingParams:
        """The checkpoint's sampling defaults (generation_config.json), then `overrides`."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})

    # ------------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None,
                    salt: Hashable = None) -> list[int]:
        """Queues a request; returns its prompt token ids. Raises RequestError for a request that cannot run.
        Without `params`, the checkpoint's sampling defaults apply."""
        request = self.prepare_request(request_id, prompt, params or self.default_sampling_params(), salt)
        self.enqueue(request)
        return list(request.prompt_ids)

    def prepare_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams,
                        salt: Hashable = None) -> Request:
        """Tokenizes and checks a request without touching the queues (safe from another thread)."""
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise RequestError("the prompt is empty: it needs at least one token", "prompt")
        vocab = self.runner.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"prompt token ids must lie in [0, {vocab})", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this engine's context is "
                               f"{self.max_model_len} tokens, and at least one must be left to generate", "prompt")
        for name, tokens in (("logit_bias", [t for t, _ in params.logit_bias]),
                             ("stop_token_ids", params.stop_token_ids)):
            if any(t >= vocab for t in tokens):
                raise RequestError(f"'{name}' names token ids beyond this model's vocabulary of {vocab}", name)
        if params.thinking is not Thinking.OFF and self.think_tokens is None:
            raise RequestError("this model's tokenizer has no <think> and </think> tokens: thinking cannot be tracked")
        try:
            return Request.create(request_id, prompt_ids, params, self.tokenizer, self._seq_ids, salt,
                                  rules=lambda stops: make_constraints(params, stops, self.think_tokens, self.grammars))
        except StructuredOutputError as exc:
            raise RequestError(str(exc)) from None

    def enqueue(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self.scheduler.add(request.sequences[0])

    def abort(self, request_id: str) -> bool:
        """Stops a request wherever it is and frees its blocks; False if it is unknown or already done."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return False
        request.pending_siblings = []
        for seq in request.sequences:
            if not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
        self.num_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def speculation_status(self) -> dict[str, object] | None:
        """Speculative decoding's settings and counters (/status, benchmarks); None when it is off."""
        config = self.config.speculative
        if config is None:
            return None
        return {"method": config.method, "num_speculative_tokens": config.num_speculative_tokens,
                "draft_model": config.draft_model, "max_batch_size": config.max_batch_size,
                **self.speculation.as_dict()}

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ one step

    def step(self) -> list[RequestOutput]:
        changed: dict[Request, dict[Sequence, None]] = {}
        proposals = self._propose()
        try:
            plan = self.scheduler.schedule(proposals)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: fail what is in flight, keep serving
            log.exception("scheduling failed; failing all %d requests in the engine", len(self._requests))
            self._fail(list(self._requests.values()), f"the scheduler failed: {exc}", changed)
            return self._outputs(changed)
        for seq in plan.cannot_fit:
            log.warning("request %s: %d tokens do not fit in the whole KV cache (%d blocks of %d tokens); "
                        "finishing it with 'length'", seq.request.request_id, seq.num_tokens,
                        self.pool.num_blocks, self.runner.block_size)
            self._finish(seq, FinishReason.LENGTH)
            changed.setdefault(seq.request, {})[seq] = None
        if plan.chunks:
            try:
                self._run(plan, changed)
            except Exception as exc:  # noqa: BLE001 - one bad step must not take the engine down
                requests = list({c.seq.request: None for c in plan.chunks})
                log.exception("a step failed; failing its %d request(s)", len(requests))
                self._fail(requests, f"the model step failed: {exc}", changed)
        elif not changed and self.config.debug_checks:
            self.check_blocks()
        return self._outputs(changed)

    def _propose(self) -> dict[int, Proposal]:
        """Guesses for the decoding sequences that may speculate, by seq_id (none while the batch is too big to
        gain from it). A failing proposer costs this step its speculation, nothing else."""
        if self.proposer is None:
            return {}
        running = self.scheduler.running
        try:
            self.proposer.keep_only({seq.seq_id for seq in running})
            seqs, limits = [], []
            candidates = [seq for seq in running if seq.params.speculative and seq.status is SequenceStatus.RUNNING
                          and seq.num_uncomputed == 1]
            if not candidates:
                return {}
            if len(running) > self.config.speculative.max_batch_size:
                self.speculation.skipped_busy_steps += 1
                return {}
            for seq in candidates:
                limit = min(seq.guess_depth.limit(self.config.speculative.num_speculative_tokens),
                            seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens - 1)
                if seq.constraints is not None and (rule_limit := seq.constraints.guess_limit()) is not None:
                    limit = min(limit, rule_limit)
                if limit > 0:
                    seqs.append(seq)
                    limits.append(limit)
            if not seqs:
                return {}
            proposals = {seq.seq_id: usable(seq, p) for seq, p in zip(seqs, self.proposer.propose(seqs, limits))}
            return {seq_id: p for seq_id, p in proposals.items() if p.tokens}
        except Exception:  # noqa: BLE001 - speculation is an optimisation: go on without it
            log.exception("the speculative proposer failed; this step decodes without guesses")
            self.speculation.proposer_failures += 1
            return {}

    def _run(self, plan: StepPlan, changed: dict[Request, dict[Sequence, None]]) -> None:
        logits = self.runner.run(plan.batch(self.runner.block_size))
        plain: list[ScheduledChunk] = []
        plain_rows: list[int] = []
        verifying: list[tuple[ScheduledChunk, int]] = []
        constrained = []
        row = 0
        for chunk in plan.chunks:  # logit rows in chunk order: k + 1 to verify, 1 to sample, a prompt's to score
            rows = chunk.num_logit_rows
            if chunk.scores_prompt:
                self._score_prompt(chunk.seq, logits[row:row + rows - (1 if chunk.samples else 0)])
                row += rows - 1
                rows = 1
            if chunk.proposal:
                verifying.append((chunk, row))
            elif chunk.samples:
                plain.append(chunk)
                plain_rows.append(row)
            else:
                row += rows
                continue
            seq = chunk.seq
            if seq.constraints is not None:
                guesses = chunk.proposal.tokens if chunk.proposal else []
                constrained.append((seq.constraints, row, guesses, seq.num_output_tokens))
            row += rows
        shaped, supports = shape_rows(logits, constrained, self.grammars)
        every_row = len(plain_rows) == len(logits)
        sampled = self.sampler.sample(shaped if every_row else shaped[plain_rows], [c.seq for c in plain],
                                      raw=None if shaped is logits else logits if every_row else logits[plain_rows],
                                      supports={i: supports[r] for i, r in enumerate(plain_rows) if r in supports})
        taken = {id(chunk): [token] for chunk, token in zip(plain, sampled)}
        for chunk, first in verifying:
            rows = slice(first, first + chunk.num_guesses + 1)
            verified = verify(shaped[rows], chunk.seq, chunk.proposal, raw=None if shaped is logits else logits[rows],
                              supports={j: supports[first + j] for j in range(chunk.num_guesses + 1)
                                        if first + j in supports})
            self.speculation.record(chunk.num_guesses, verified.accepted, len(verified.tokens))
            chunk.seq.guess_depth.record(chunk.num_guesses, verified.accepted)
            taken[id(chunk)] = verified.tokens
        for chunk in plan.chunks:
            self.scheduler.finish_chunk(chunk)
        now = time.monotonic()
        for chunk in plan.chunks:
            tokens = taken.get(id(chunk))
            if tokens is None:
                continue
            seq = chunk.seq
            for i, token in enumerate(tokens):
                # tokens before the last are accepted guesses: their K/V were computed in this step
                self._take_token(seq, token, now, computed=i < len(tokens) - 1)
                if seq.is_finished:
                    break
            if chunk.proposal and not seq.is_finished:
                self.scheduler.drop_unused_blocks(seq)
            changed.setdefault(seq.request, {})[seq] = None

    def _score_prompt(self, seq: Sequence, rows: np.ndarray) -> None:
        """Prompt logprobs from a chunk's rows (row j is after the token at num_computed + j, so it scores the
        next prompt token); rows of positions scored before a preemption are skipped."""
        request = seq.request
        scored, prompt, top_n = request.prompt_logprobs, request.prompt_ids, request.params.prompt_logprobs
        for j, row in enumerate(rows):
            target = seq.num_computed + j + 1
            if target == len(scored) and target < len(prompt):
                logprobs = log_softmax_rows(finite_logits(row[None]))[0]
                scored.append(with_logprobs(prompt[target], logprobs, top_n, ranked=True))

    def _take_token(self, seq: Sequence, sampled: SampledToken, now: float, computed: bool = False) -> None:
        """Appends a generated token (`computed`: its K/V are already in the cache) and checks the stops."""
        request = seq.request
        if seq.first_token_time is None:
            seq.first_token_time = now
            if request.pending_siblings:  # the shared prompt is cached now: the siblings reuse it
                for sibling in request.pending_siblings:
                    self.scheduler.add(sibling)
                request.pending_siblings = []
        seq.append(sampled)
        if computed:
            seq.num_computed += 1
        if seq.constraints is not None:
            seq.constraints.take(sampled.token)
            if seq.constraints.grammar_failed:  # the grammar hit llguidance's limits part-way (or a bug of ours)
                log.warning("request %s: its structured output failed: %s", request.request_id,
                            seq.constraints.grammar_failed)
                request.error = f"structured output failed: {seq.constraints.grammar_failed}"
                request.error_from_request = True
                self._finish(seq, FinishReason.ABORT, cache_computed=False)
                return
        reason = self._stop_reason(seq, sampled.token)
        if reason is not None:
            self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.request.stop_token_ids:
            seq.text.finish()  # the stop token counts as generated but adds no text (as in vLLM and OpenAI)
            return FinishReason.STOP
        if seq.text.add(token, check_stops=seq.num_output_tokens >= seq.params.min_tokens):
            return FinishReason.STOP
        if seq.constraints is not None and seq.constraints.grammar_done:  # complete (its stop token was ignored)
            seq.text.finish()
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.STOP if seq.text.finish() else FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason, cache_computed: bool = True) -> None:
        seq.finish(reason)
        self.scheduler.remove(seq, cache_computed)

    def _fail(self, requests: Iterable[Request], message: str, changed: dict[Request, dict[Sequence, None]]) -> None:
        """Ends `requests` with `message` as their error; K/V of their last step is not cached (unsound)."""
        for request in requests:
            request.error = message
            request.pending_siblings = []
            for seq in request.sequences:
                if not seq.is_finished:
                    self._finish(seq, FinishReason.ABORT, cache_computed=False)
            changed.setdefault(request, {}).update(dict.fromkeys(request.sequences))

    def _outputs(self, changed: dict[Request, dict[Sequence, None]]) -> list[RequestOutput]:
        outputs = []
        for request, seqs in changed.items():
            out = request.output(sorted(seqs, key=lambda s: s.index))
            outputs.append(out)
            if out.finished:
                self._requests.pop(request.request_id, None)
        return outputs

    def check_blocks(self) -> None:
        """Audits the block bookkeeping (AssertionError if broken): every block has one owner, nothing leaked."""
        audit_blocks(self.pool, self.cache, self.scheduler.all_sequences())


def usable(seq: Sequence, proposal: Proposal) -> Proposal:
    """`proposal` cut where `seq`'s output rules would change part-way through its rows (a think tag)."""
    if seq.constraints is None:
        return proposal
    tokens = seq.constraints.usable_guesses(proposal.tokens)
    if len(tokens) == len(proposal.tokens):
        return proposal
    return Proposal(tokens, None if proposal.draft_probs is None else proposal.draft_probs[:len(tokens)])


def make_proposer(config: SpeculativeConfig | None) -> Proposer | None:
    """The proposer `config` asks for that needs no model of its own (n-gram lookup); None otherwise."""
    if config is None:
        return None
    if config.method == "ngram":
        return NgramLookup(config)
    raise ValueError(f"speculative method {config.method!r} needs its proposer built with its model "
                     f"(Engine.from_pretrained builds a draft model's)")
