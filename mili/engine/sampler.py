"""The sampler: one token per batch row from the model's logits, under each row's SamplingParams.

Order of operations (transformers' and vLLM's): logprobs are taken from the raw logits (the model's own
distribution); then repetition / presence / frequency penalties; then greedy argmax, or temperature, top-k,
top-p and min-p, and one draw from the request's own random generator. A request with a seed owns a
generator seeded from it, so its tokens do not depend on what else shares the batch.

Greedy rows without penalties are one argmax over the whole batch, and logprobs one log-softmax over the
rows that ask for them; rows that sample are handled one by one with whole-vocabulary numpy operations (no
Python loop over tokens). Top-p never sorts the
whole vocabulary unless it must: it looks at the most likely few hundred tokens first, which almost always
already hold the nucleus, and widens the search only when they do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mili.engine.sampling_params import SamplingParams

NUCLEUS_FIRST_LOOK = 512


class SamplingRow(Protocol):
    """What the sampler reads of one row's sequence (mili.engine.sequence.Sequence is one)."""

    @property
    def params(self) -> SamplingParams: ...
    @property
    def prompt_array(self) -> np.ndarray: ...       # distinct prompt token ids (repetition penalty)
    generator: np.random.Generator
    output_counts: dict[int, int]                  # generated token -> how often (penalties)


@dataclass(frozen=True)
class SampledToken:
    token: int
    logprob: float | None                               # of the chosen token, under the raw distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()    # the `params.logprobs` most likely tokens
    rank: int | None = None                             # 1 + how many tokens were more likely (prompt logprobs)


def request_generator(seed: int | None, sibling: int = 0) -> np.random.Generator:
    """A request's random stream: from its seed (each of n siblings its own), or fresh entropy."""
    return np.random.default_rng(None if seed is None else [seed, sibling])


def apply_penalties(row: np.ndarray, params: SamplingParams, prompt: np.ndarray, output_counts: dict[int, int]) -> None:
    """In place: transformers' repetition penalty over prompt and output tokens, then OpenAI's presence and
    frequency penalties over output tokens. `prompt`: the prompt's distinct token ids; `output_counts`:
    each generated token's count (kept up to date as tokens are appended, so no step re-counts)."""
    tokens = np.fromiter(output_counts.keys(), np.int64, len(output_counts))
    if params.repetition_penalty != 1.0:  # may overflow to +-inf: finite_logits tidies up after
        seen = np.union1d(prompt, tokens)
        values = row[seen]
        with np.errstate(over="ignore"):
            row[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_counts and (params.presence_penalty or params.frequency_penalty):
        counts = np.fromiter(output_counts.values(), np.float64, len(output_counts))
        row[tokens] -= params.frequency_penalty * counts + params.presence_penalty


def _candidates(probs: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Token ids that may hold the kept set (in no order): the top k, or enough to cover top-p."""
    vocab = len(probs)
    if params.top_k:
        k = min(params.top_k, vocab)
    elif params.top_p < 1.0:
        k = min(NUCLEUS_FIRST_LOOK, vocab)
        while k < vocab:
            top = np.argpartition(-probs, k - 1)[:k]
            if probs[top].sum() >= params.top_p * probs.sum():
                break
            k = min(vocab, k * 8)
    else:
        k = vocab
    return np.argpartition(-probs, k - 1)[:k] if k < vocab else np.arange(vocab)


def kept_distribution(row: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw may pick from `row` (finite or -inf penalised logits, not all -inf) under
    temperature, top-k, top-p and min-p, with their probabilities (summing to 1): most likely first when top-k
    or top-p cut by rank, in vocabulary order otherwise (sorting 151k probabilities took longer than a step).
    Never empty: the most likely token always stays (its probability is exp(0) = 1 before normalising,
    and a temperature >= GREEDY_BELOW keeps every scaled logit finite in float64)."""
    if 0 < params.top_k < len(row):
        # the top k by logit are the top k by probability, and top-k renormalises over them: nothing outside
        # them reaches the draw, so only they are exponentiated (Qwen3's defaults: 20 of 151,936)
        top = np.argpartition(-row, params.top_k - 1)[:params.top_k]
        return _cut(top, _exp_scaled(row[top], params.temperature), params, renormalise_over_kept=True)
    probs = _exp_scaled(row, params.temperature)
    if not params.top_k and params.top_p >= 1.0:  # nothing cuts by rank: no sort of the whole vocabulary
        if params.min_p == 0.0:
            return np.arange(len(probs)), probs / probs.sum()
        ids = np.flatnonzero(probs >= params.min_p)  # the most likely token's is 1: min-p is against 1
        return ids, probs[ids] / probs[ids].sum()
    ids = _candidates(probs, params)
    # renormalised over the top-k set, or over the whole vocabulary without top-k (the candidates for
    # top-p alone are only the head of it: their own sum would overstate each token's share)
    return _cut(ids, probs[ids], params, renormalise_over_kept=bool(params.top_k), total=probs.sum())


def _exp_scaled(logits: np.ndarray, temperature: float) -> np.ndarray:
    """exp((logits - max) / temperature) in float64: the most likely token's is exp(0) = 1."""
    shifted = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # large gaps over a small temperature go to -inf: probability 0
        return np.exp((shifted - shifted.max()) / temperature)


def _cut(ids: np.ndarray, probs: np.ndarray, params: SamplingParams, renormalise_over_kept: bool,
         total: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-p and min-p over candidates `ids` with unnormalised `probs`, most likely first after sorting; their
    shares are of the candidates' own sum (top-k) or of `total` (the whole vocabulary's)."""
    order = np.argsort(-probs, kind="stable")
    ids, kept = ids[order], probs[order]
    kept = kept / (kept.sum() if renormalise_over_kept else total)
    if params.top_p < 1.0:
        # the smallest most-likely prefix whose mass reaches top_p (at least one token)
        cutoff = int(np.searchsorted(np.cumsum(kept), params.top_p, side="left")) + 1
        ids, kept = ids[:cutoff], kept[:cutoff]
    if params.min_p > 0.0:
        keep = kept >= params.min_p * kept[0]
        ids, kept = ids[keep], kept[keep]
    return ids, kept / kept.sum()


def sample_row(row: np.ndarray, params: SamplingParams, generator: np.random.Generator,
               support: np.ndarray | None = None) -> int:
    """One token from `row` (penalised logits): argmax when greedy, else one draw from the kept set. `support`:
    the only tokens the row allows, ascending (the rest are -inf: a grammar's mask): the draw then looks at those
    alone, which gives the same distribution at a fraction of the cost of the whole vocabulary."""
    if params.is_greedy:
        return int(np.argmax(row))
    if support is not None:
        ids, probs = kept_distribution(row[support], params)
        return int(support[ids[draw_index(probs, generator)]])
    ids, probs = kept_distribution(row, params)
    return int(ids[draw_index(probs, generator)])


def draw_index(probs: np.ndarray, generator: np.random.Generator) -> int:
    """Where one draw from `probs` (summing to 1) lands: one uniform from `generator`, inverted through the CDF."""
    choice = int(np.searchsorted(np.cumsum(probs), generator.random(), side="right"))
    return min(choice, len(probs) - 1)


def finite_logits(logits: np.ndarray) -> np.ndarray:
    """`logits` with NaN read as "never" (-inf) and +inf as the largest float, so every later step is
    defined; a row with nothing left (all -inf) becomes uniform. Returns `logits` itself when all is finite."""
    if np.isfinite(logits).all():
        return logits
    cleaned = np.nan_to_num(logits, nan=-np.inf, posinf=np.finfo(logits.dtype).max, neginf=-np.inf)
    cleaned[np.isneginf(cleaned).all(axis=1)] = 0.0
    return cleaned


class Sampler:
    def sample(self, logits: np.ndarray, rows: Sequence[SamplingRow], raw: np.ndarray | None = None,
               supports: dict[int, np.ndarray] | None = None) -> list[SampledToken]:
        """One token per row of `logits` [len(rows), vocab] (float32, not modified). Total: any logits,
        NaN and infinities included, and any valid SamplingParams give a token. `raw`: the model's own logits
        where `logits` were shaped (bias, masks): logprobs are always the model's distribution. `supports`: by
        row, the few tokens a mask left (see sample_row)."""
        if len(logits) != len(rows):
            raise ValueError(f"{len(logits)} logit rows for {len(rows)} requests")
        argmax = logits.argmax(axis=1)  # greedy rows without penalties need nothing else: one pass for all
        # argmax lands on any NaN or +inf, and on -inf only when the whole row is -inf: checking the chosen
        # values costs O(rows), where checking every logit cost as much as the argmax itself
        if not np.isfinite(logits[np.arange(len(logits)), argmax]).all():
            logits = finite_logits(logits)
            argmax = logits.argmax(axis=1)
        wants_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs = {}
        if wants_logprobs:  # the model's own distribution: `logits` (made finite above) unless they were shaped
            own = logits[wants_logprobs] if raw is None else finite_logits(raw[wants_logprobs])
            logprobs = dict(zip(wants_logprobs, log_softmax_rows(own)))
        results = []
        for i, request in enumerate(rows):
            params = request.params
            if params.is_greedy and not params.has_penalties:
                token = int(argmax[i])
            else:
                row = penalised_row(logits[i], params, request.prompt_array, request.output_counts)
                token = sample_row(row, params, request.generator, supports.get(i) if supports else None)
            results.append(with_logprobs(token, logprobs.get(i), params.logprobs or 0))
        return results


def penalised_row(row: np.ndarray, params: SamplingParams, prompt: np.ndarray,
                  output_counts: dict[int, int]) -> np.ndarray:
    """`row` (finite logits) under the request's penalties: a float64 copy (wide enough that penalties cannot
    overflow) when it has any, else `row` itself."""
    if not params.has_penalties:
        return row
    row = row.astype(np.float64)
    apply_penalties(row, params, prompt, output_counts)
    return finite_logits(row[None])[0]


def log_softmax_rows(rows: np.ndarray) -> np.ndarray:
    shifted = rows.astype(np.float64) - rows.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def with_logprobs(token: int, logprobs: np.ndarray | None, top_n: int, ranked: bool = False) -> SampledToken:
    """`token` with its logprob and the `top_n` most likely tokens' under `logprobs` (and its rank, if `ranked`)."""
    if logprobs is None:
        return SampledToken(token, None)
    top: tuple[tuple[int, float], ...] = ()
    if top_n:
        best = np.argpartition(-logprobs, top_n - 1)[:top_n]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple((int(t), float(logprobs[t])) for t in best)
    rank = int(np.count_nonzero(logprobs > logprobs[token])) + 1 if ranked else None
    return SampledToken(token, float(logprobs[token]), top, rank)
