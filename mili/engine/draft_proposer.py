"""Draft-model proposer: a smaller Qwen3 with the target's tokenizer guesses the next k tokens.

It has its own model runner and its own KV cache and block pool, so nothing of the target's bookkeeping (prefix
cache, preemption, block ownership) reaches it. Per sequence it keeps a block table and how far its K/V are
valid: after each proposal it has computed the sequence's tokens and all guesses but the last, and on the next
call it keeps what the target accepted (the common prefix of its guesses and the sequence's new tokens) and
recomputes the rest. A preempted, finished or aborted sequence's draft state is dropped (keep_only); a resumed
one is caught up in one chunk, prefix-cache hits of the target included. One proposal is one catch-up step
(every new token of every sequence, logits of the last) and k - 1 single-token steps, all sequences batched.

Greedy requests take the draft's argmax (q one-hot); sampled ones draw from the draft's distribution under the
request's temperature, top-k, top-p and min-p, from a random stream of the draft's own (seeded from the
request's seed), and hand q to the verifier for the rejection rule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import numpy as np

from mili.engine.batch import Batch, SequenceChunk
from mili.engine.block_pool import BlockPool
from mili.engine.sampler import draw_index, finite_logits, kept_distribution
from mili.engine.sequence import Sequence
from mili.engine.speculative import Proposal, SpeculativeConfig

log = logging.getLogger(__name__)

DRAFT_STREAM = 1  # the draft's random stream of a seeded request: [seed, sibling, DRAFT_STREAM]


@dataclass
class DraftState:
    """One sequence's K/V in the draft's cache: positions [0, num_computed) hold the sequence's tokens; then
    the draft's own last guesses (`guesses`), valid as far as the target accepts them."""

    generator: np.random.Generator
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    guesses: list[int] = field(default_factory=list)

    def sync(self, token_ids: list[int]) -> None:
        """Keeps the K/V of the guesses the target accepted; the rest is recomputed. The last token is always
        left to compute (its logits give the first guess)."""
        valid = 0
        for guess, token in zip(self.guesses, token_ids[self.num_computed:len(token_ids) - 1]):
            if guess != token:
                break
            valid += 1
        # never past the last token: a proposal the target did not verify (its sequence was preempted, or the
        # step had no budget for it) leaves the sequence's tokens as they were
        self.num_computed = min(self.num_computed + valid, len(token_ids) - 1)
        self.guesses = []


class DraftProposer:
    def __init__(self, runner, num_speculative_tokens: int) -> None:
        """`runner`: the draft's ModelRunner (or anything with its run/num_blocks/block_size/config)."""
        self.runner = runner
        self.k = num_speculative_tokens
        self.pool = BlockPool(runner.num_blocks)
        self.states: dict[int, DraftState] = {}

    @classmethod
    def from_pretrained(cls, config: SpeculativeConfig, target, *, dtype: str | None = None,
                        quantization: str | None = None, float_activations: bool = False) -> DraftProposer:
        """Loads `config.draft_model` beside the `target` runner: same device, dtype, weight format and block
        size, as many KV blocks as the target has (a draft's block is a fraction of the target's)."""
        from mili.engine.model_runner import ModelRunner
        from mili.model_source import ModelSource

        draft = ModelSource.open(config.draft_model)
        draft_config = draft.config
        if draft_config.vocab_size != target.config.vocab_size:
            raise ValueError(f"the draft model {config.draft_model} has a vocabulary of {draft_config.vocab_size} "
                             f"tokens, the target {target.config.vocab_size}: a draft must share the target's "
                             f"tokenizer (pick a smaller Qwen3 of the same family)")
        log.info("loading the draft model %s (%d layers) for speculative decoding", config.draft_model,
                 draft_config.num_hidden_layers)
        runner = ModelRunner.from_pretrained(draft, dtype=dtype, device=target.device_name,
                                             quantization=quantization, block_size=target.block_size,
                                             num_blocks=target.num_blocks, float_activations=float_activations)
        return cls(runner, config.num_speculative_tokens)

    def keep_only(self, alive: set[int]) -> None:
        for seq_id in [s for s in self.states if s not in alive]:
            self._drop(seq_id)

    def _drop(self, seq_id: int) -> None:
        state = self.states.pop(seq_id)
        self.pool.free(state.blocks)

    def _state(self, seq: Sequence) -> DraftState:
        state = self.states.get(seq.seq_id)
        if state is None:
            seed = seq.params.seed
            generator = np.random.default_rng(None if seed is None else [seed, seq.index, DRAFT_STREAM])
            state = self.states[seq.seq_id] = DraftState(generator)
        return state

    def _reserve(self, state: DraftState, positions: int, keep: set[int]) -> bool:
        """Blocks for `positions` tokens, taking them from sequences outside `keep` if the pool runs short."""
        needed = -(-positions // self.runner.block_size) - len(state.blocks)
        if needed <= 0:
            return True
        for seq_id in [s for s in self.states if s not in keep]:
            if self.pool.num_free >= needed:
                break
            self._drop(seq_id)
        if self.pool.num_free < needed:
            return False
        state.blocks.extend(self.pool.alloc(needed))
        return True

    def propose(self, seqs: Seq[Sequence], limits: Seq[int]) -> list[Proposal]:
        try:
            return self._propose(seqs, limits)
        except Exception:
            for seq_id in list(self.states):  # a failed step leaves K/V half-written: start over
                self._drop(seq_id)
            raise

    def _propose(self, seqs: Seq[Sequence], limits: Seq[int]) -> list[Proposal]:
        proposals = [Proposal([]) for _ in seqs]
        keep = {seq.seq_id for seq in seqs}
        positions = self.runner.config.max_position_embeddings
        active: list[tuple[int, Sequence, DraftState, int]] = []  # (index, seq, state, guesses to make)
        for i, (seq, limit) in enumerate(zip(seqs, limits)):
            limit = min(limit, self.k, positions - seq.num_tokens + 1)
            state = self._state(seq)
            state.sync(seq.token_ids)
            # K/V for the tokens and all guesses but the last
            if limit > 0 and self._reserve(state, seq.num_tokens + limit - 1, keep):
                active.append((i, seq, state, limit))
        guesses: dict[int, list[int]] = {i: [] for i, *_ in active}
        probs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i, *_ in active}
        chunks = [SequenceChunk(seq.token_ids[state.num_computed:], state.num_computed, state.blocks)
                  for _, seq, state, _ in active]
        for step in range(max((limit for *_, limit in active), default=0)):
            logits = self.runner.run(Batch.from_chunks(chunks, self.runner.block_size))
            if not np.isfinite(logits).all():
                logits = finite_logits(logits)
            chunks, still = [], []
            for row, (i, seq, state, limit) in zip(logits, active):
                token = self._choose(row, seq, state, probs[i])
                guesses[i].append(token)
                if step + 1 < limit:  # this guess runs through the draft for the next one
                    chunks.append(SequenceChunk([token], seq.num_tokens + step, state.blocks))
                    still.append((i, seq, state, limit))
            active = still
        for i, seq in enumerate(seqs):
            if i in guesses:
                state = self.states[seq.seq_id]
                state.num_computed = seq.num_tokens
                state.guesses = guesses[i][:-1]  # the last guess never ran through the draft
                proposals[i] = Proposal(guesses[i], None if seq.params.is_greedy else probs[i])
        return proposals

    @staticmethod
    def _choose(row: np.ndarray, seq: Sequence, state: DraftState,
                probs: list[tuple[np.ndarray, np.ndarray]]) -> int:
        """The draft's guess from its logits: argmax for greedy requests, else a draw from q (recorded)."""
        params = seq.params
        if params.is_greedy:
            return int(np.argmax(row))
        ids, q = kept_distribution(row, params)
        probs.append((ids, q))
        return int(ids[draw_index(q, state.generator)])
