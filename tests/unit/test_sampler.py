"""The sampler against transformers' own logits processors (the reference), plus seeds and logprobs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mili.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_penalties,
    kept_distribution,
    request_generator,
)
from mili.engine.sampling_params import SamplingParams

VOCAB = 151_936


@dataclass
class Row:
    """A SamplingRow without a whole engine Sequence."""

    params: SamplingParams
    generator: np.random.Generator
    prompt_array: np.ndarray
    output_counts: dict[int, int]


def row_for(params: SamplingParams, seed: int | None = None, prompt=(), output=()) -> SamplingRow:
    return Row(params, request_generator(seed if seed is not None else params.seed),
               np.unique(np.asarray(prompt, np.int64)), dict(Counter(int(t) for t in output)))


def reference_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """transformers' warpers in generate()'s order -> probabilities over the vocabulary."""
    scores = torch.tensor(logits[None], dtype=torch.float64)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=40),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=0.6, top_k=200, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, top_p=0.95, min_p=0.02),
], ids=str)
@pytest.mark.parametrize("spread", [1.0, 8.0])  # flat logits (top-p must widen past its first look) and peaked
def test_kept_distribution_matches_transformers_warpers(params, spread, rng):
    logits = (rng.standard_normal(VOCAB) * spread).astype(np.float32)
    ids, probs = kept_distribution(logits, params)
    expected = reference_distribution(logits, params)
    assert set(ids.tolist()) == set(np.flatnonzero(expected > 0).tolist())
    np.testing.assert_allclose(probs, expected[ids], rtol=1e-9, atol=1e-12)
    if params.top_k or params.top_p < 1.0:
        assert np.all(np.diff(probs) <= 1e-15)  # most likely first where a rank cut was made


def test_top_p_counts_the_tail_beyond_the_first_look(rng):
    """A head that holds most of the mass, and a long tail that still holds some: the nucleus must be
    measured against the whole vocabulary, so it reaches further into the head than the head alone says."""
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    head = rng.choice(VOCAB, 40, replace=False)
    logits[head] = np.linspace(12.0, 9.0, 40, dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    ids, probs = kept_distribution(logits, params)
    expected = reference_distribution(logits, params)
    assert set(ids.tolist()) == set(np.flatnonzero(expected > 0).tolist())
    np.testing.assert_allclose(probs, expected[ids], rtol=1e-9, atol=1e-12)


def test_draws_follow_the_distribution():
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 3.0], np.float32)
    params = SamplingParams(temperature=0.8, top_k=4)
    expected = reference_distribution(logits, params)
    row = row_for(params, seed=7)
    draws = 20_000
    counts = np.bincount([Sampler().sample(logits[None], [row])[0].token for _ in range(draws)], minlength=6)
    assert counts[expected == 0].sum() == 0
    stderr = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(counts / draws - expected) <= 5 * stderr + 1e-12), (counts / draws, expected)


def test_greedy_is_argmax_for_the_whole_batch(rng):
    logits = rng.standard_normal((5, 1000)).astype(np.float32)
    tokens = [t.token for t in Sampler().sample(logits, [row_for(SamplingParams.greedy())] * 5)]
    assert tokens == logits.argmax(axis=1).tolist()


def test_repetition_penalty_matches_transformers(rng):
    logits = rng.standard_normal(VOCAB).astype(np.float32) * 3
    prompt, output = rng.integers(0, VOCAB, 50), rng.integers(0, VOCAB, 20).tolist()
    params = SamplingParams(repetition_penalty=1.3)
    ours = logits.copy()
    apply_penalties(ours, params, np.unique(prompt), dict(Counter(output)))
    history = torch.tensor(np.concatenate([prompt, output])[None])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(history, torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_presence_and_frequency_penalties_follow_openai():
    logits = np.zeros(10, np.float32)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, params, np.array([9]), {3: 3, 7: 1})
    expected = np.zeros(10)
    expected[3] = -(3 * 0.25 + 0.5)
    expected[7] = -(1 * 0.25 + 0.5)  # prompt-only token 9 is untouched
    np.testing.assert_allclose(logits, expected)


def test_seeded_requests_repeat_whatever_shares_the_batch(rng):
    mine = rng.standard_normal((12, 500)).astype(np.float32)      # the seeded request's logits per step
    others = rng.standard_normal((12, 3, 500)).astype(np.float32)  # its neighbours', different every run
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def tokens_of_seeded(neighbours: list[SamplingParams], position: int) -> list[int]:
        params = neighbours[:position] + [seeded] + neighbours[position:]
        rows = [row_for(p) for p in params]
        tokens = []
        for step in range(len(mine)):
            logits = np.concatenate([others[step, :position], mine[step][None], others[step, position:len(neighbours)]])
            tokens.append(Sampler().sample(logits, rows)[position].token)
        return tokens

    alone = tokens_of_seeded([], 0)
    assert tokens_of_seeded([SamplingParams(temperature=1.0)], 1) == alone
    assert tokens_of_seeded([SamplingParams(temperature=2.0, top_k=3), SamplingParams(temperature=0.5, seed=5),
                             SamplingParams.greedy()], 2) == alone
    reseeded = row_for(SamplingParams(temperature=1.0, top_p=0.9, seed=99))
    other = [Sampler().sample(mine[step][None], [reseeded])[0].token for step in range(len(mine))]
    assert other != alone  # a different seed gives a different stream (12 draws among hundreds of tokens)


def test_logprobs_are_the_raw_log_softmax_with_sorted_alternatives(rng):
    logits = rng.standard_normal((2, 3000)).astype(np.float32)
    params = SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0)
    out = Sampler().sample(logits, [row_for(params, prompt=[1, 2]), row_for(SamplingParams.greedy())])
    reference = torch.log_softmax(torch.tensor(logits[0], dtype=torch.float64), dim=-1).numpy()
    assert out[0].logprob == pytest.approx(reference[out[0].token], abs=1e-9)
    assert [t for t, _ in out[0].top_logprobs] == np.argsort(-reference)[:5].tolist()
    assert [lp for _, lp in out[0].top_logprobs] == pytest.approx(np.sort(reference)[::-1][:5].tolist(), abs=1e-9)
    assert out[1].logprob is None and out[1].top_logprobs == ()


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"seed": -1}, "seed"), ({"logprobs": 21}, "logprobs"),
    ({"stop": ("",)}, "stop"), ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"temperature": True}, "temperature"),
])
def test_bad_parameters_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        SamplingParams(**kwargs)


def test_stop_accepts_one_string_or_a_list():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"], stop_token_ids=[5]) == SamplingParams(stop=("a", "b"), stop_token_ids=(5,))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-308, min_p=0.1), SamplingParams(temperature=5e-324),
    SamplingParams(temperature=1e-5, top_p=0.5), SamplingParams(temperature=100, top_k=3, min_p=1.0),
    SamplingParams(temperature=0.7, repetition_penalty=1e-300), SamplingParams(temperature=0.7, repetition_penalty=100,
                                                                               frequency_penalty=2, presence_penalty=-2),
    SamplingParams.greedy(repetition_penalty=1e-300, logprobs=3),
])
def test_every_sampling_path_is_total_on_hostile_logits(params, rng):
    """The reproduced crash: temperature 1e-308 with min_p overflowed and raised, killing the engine loop.
    No valid SamplingParams and no logits (huge, NaN, inf, all -inf) may raise or give a token outside
    the vocabulary."""
    big = np.finfo(np.float32).max
    with np.errstate(over="ignore"):  # some of these overflow to +-inf on purpose
        huge = rng.standard_normal(50).astype(np.float32) * np.float32(1e38)
    rows = [huge,
            np.full(50, big, np.float32), np.full(50, -np.inf, np.float32), np.full(50, np.nan, np.float32),
            np.where(rng.random(50) < 0.5, np.inf, -np.inf).astype(np.float32),
            np.where(rng.random(50) < 0.5, np.nan, rng.standard_normal(50)).astype(np.float32)]
    logits = np.stack(rows)
    out = Sampler().sample(logits, [row_for(params, seed=1, prompt=[1, 2, 3], output=[4, 4, 5]) for _ in rows])
    assert all(0 <= s.token < 50 for s in out)
    assert out[1].token == 0 or not params.is_greedy or params.has_penalties  # all equal: the first, like argmax
    assert out[4].token in np.flatnonzero(np.isposinf(rows[4])).tolist() or params.has_penalties


def test_tiny_temperatures_are_greedy():
    logits = np.random.default_rng(3).standard_normal((1, 1000)).astype(np.float32)
    for temperature in (1e-308, 1e-6, 9.9e-6):
        assert SamplingParams(temperature=temperature).is_greedy
        out = Sampler().sample(logits, [row_for(SamplingParams(temperature=temperature, min_p=0.1), seed=0)])
        assert out[0].token == int(np.argmax(logits[0]))
    assert not SamplingParams(temperature=1e-5).is_greedy


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8),
    SamplingParams(temperature=1.3, min_p=0.05), SamplingParams(temperature=0.6, top_p=0.95, top_k=20),
    SamplingParams(temperature=0.8, repetition_penalty=1.3, presence_penalty=0.5),
])
def test_a_masked_row_draws_the_same_token_from_its_support_alone(params, rng):
    """What a grammar's mask leaves, handed to the sampler as `supports`, draws exactly what the whole masked row
    draws with the same random stream (the support path skips the vocabulary's -inf entries)."""
    drawn = 0
    for _ in range(40):
        logits = rng.standard_normal((1, VOCAB)).astype(np.float32) * 3
        support = np.sort(rng.choice(VOCAB, int(rng.integers(1, 3000)), replace=False))
        masked = np.full_like(logits, -np.inf)
        masked[0, support] = logits[0, support]
        seed = int(rng.integers(1 << 30))
        prompt, output = rng.integers(0, VOCAB, 20), rng.integers(0, VOCAB, 10)
        whole = Sampler().sample(masked, [row_for(params, seed, prompt, output)])[0].token
        alone = Sampler().sample(masked, [row_for(params, seed, prompt, output)], supports={0: support})[0].token
        assert whole == alone and whole in set(support.tolist())
        drawn += 1
    assert drawn == 40
