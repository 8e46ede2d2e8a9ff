"""Verification of proposed tokens against the target model's logits: lossless speculative decoding.

The target scored the sequence's last token and the k guesses in one step, so row j of its logits is the
distribution of the token after guess j - 1 (row 0: after the last real token). Going along the rows, each
row's distribution p is the request's own, computed exactly as plain decoding would (penalties over the output
so far, guesses accepted in this step included; then temperature, top-k, top-p, min-p), and:
- greedy: guess j is kept while it is p's argmax; the first row that disagrees gives its argmax;
- a guess that was certain (q one-hot: n-gram lookup): the standard rule (keep with probability
  min(1, p(d) / q(d)) = p(d), else draw from max(p - q, 0), i.e. p without d) is exactly "draw the target's own
  token with the request's generator and keep the guess if they agree" (keep with probability p(d); otherwise
  the draw is distributed as p given that it is not d). That form takes one random draw per emitted token, as
  plain decoding does, so a seeded request gives the same tokens with speculation on or off;
- a guess drawn from a draft distribution q: kept with probability min(1, p(d) / q(d)); on rejection one draw
  from max(p - q, 0), renormalised;
- when every guess is kept, one more token from the last row (the bonus).
Either way the output is distributed exactly as the target's own sampling (Leviathan et al. 2023, Chen et al.
2023). Logprobs are the raw distribution's, as for plain sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mili.engine.sampler import (SampledToken, SamplingRow, draw_index, finite_logits, kept_distribution,
                                 log_softmax_rows, penalised_row, sample_row, with_logprobs)
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import Proposal


@dataclass(frozen=True)
class Verified:
    tokens: list[SampledToken]  # the kept guesses, then the target's own token (1 to k + 1 tokens)
    accepted: int               # how many guesses were kept


def residual_distribution(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """max(p - q, 0), renormalised (dense, over the vocabulary); p itself where p <= q everywhere (then the
    rejection that asks for it has probability 0: it is reached only through rounding)."""
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def _dense(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    dense = np.zeros(vocab, np.float64)
    dense[ids] = probs
    return dense


def verify(logits: np.ndarray, seq: SamplingRow, proposal: Proposal, raw: np.ndarray | None = None,
           supports: dict[int, np.ndarray] | None = None) -> Verified:
    """The tokens `seq` takes from one verify step: `logits` [k + 1, vocab] are the target's rows for the last
    real token and the k = len(proposal.tokens) guesses (shaped by the request's output rules, if any: `raw`
    are then the model's own, for logprobs; `supports` by row the few tokens a mask left, as for sampling)."""
    guesses = proposal.tokens
    if len(logits) != len(guesses) + 1:
        raise ValueError(f"{len(logits)} logit rows to verify {len(guesses)} proposed tokens")
    params = seq.params
    if not np.isfinite(logits).all():
        logits = finite_logits(logits)
    logprobs = None
    if params.logprobs is not None:  # the model's own rows: `logits` (made finite above) unless they were shaped
        logprobs = log_softmax_rows(logits if raw is None else finite_logits(raw))
    counts = dict(seq.output_counts) if params.has_penalties else seq.output_counts
    tokens: list[SampledToken] = []
    for j in range(len(guesses) + 1):
        row = penalised_row(logits[j], params, seq.prompt_array, counts)
        if j == len(guesses) or params.is_greedy or proposal.draft_probs is None:
            token = sample_row(row, params, seq.generator, supports.get(j) if supports else None)
        else:
            token = _verify_drafted(row, params, guesses[j], proposal.draft_probs[j], seq.generator)
        tokens.append(with_logprobs(token, None if logprobs is None else logprobs[j], params.logprobs or 0))
        if j == len(guesses) or token != guesses[j]:
            break
        if params.has_penalties:
            counts[token] = counts.get(token, 0) + 1
    return Verified(tokens, len(tokens) - 1)


def _verify_drafted(row: np.ndarray, params: SamplingParams, guess: int, draft: tuple[np.ndarray, np.ndarray],
                    generator: np.random.Generator) -> int:
    """The standard rule for a guess drawn from the draft's q: keep it with probability min(1, p/q), else draw
    from the residual max(p - q, 0)."""
    ids, probs = kept_distribution(row, params)
    q_ids, q_probs = draft
    p_guess = float(probs[ids == guess].sum())
    q_guess = float(q_probs[q_ids == guess].sum())
    if generator.random() * q_guess < p_guess:
        return guess
    vocab = len(row)
    return draw_index(residual_distribution(_dense(ids, probs, vocab), _dense(q_ids, q_probs, vocab)), generator)
