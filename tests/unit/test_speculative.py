"""Speculative decoding on the fake model (tests/engine_fakes.py): lossless, leak-free, exactly distributed.

- Random workloads (those of test_engine_properties: tiny pools, preemption, prefix sharing, n > 1, stop tokens,
  seeded sampling, logprobs) run once without speculation and once with it (n-gram lookup with random k and
  n-gram sizes, a guesser that knows the greedy continuation but garbles some of it, or a draft model): every
  completion must be the same tokens with the same finish reason and logprobs (greedy always; seeded sampling
  too for proposers whose guesses are certain, where verification takes one draw per token as plain decoding).
  The same workloads with aborts mid-way drain with no leaked block, target's or draft's.
- Sampling: the tokens generated with a draft model whose distribution differs from the target's follow the
  target's exact distribution (chi-square goodness of fit, first and second generated token, with temperature,
  top-k, top-p, min-p and penalties), and the same test rejects a verifier with a wrong residual.

Seeds are printed; replay with MILI_TEST_SEED=<seed>.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from scipy.stats import chisquare

from mili.engine import verifier
from mili.engine.config import EngineConfig
from mili.engine.draft_proposer import DraftProposer
from mili.engine.engine import Engine
from mili.engine.sampler import kept_distribution, penalised_row
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import GuessDepth, NgramLookup, Proposal, SpeculativeConfig
from tests.engine_fakes import VOCAB, FakeRunner, FakeTokenizer, context_logits, reference_next_token
from tests.unit.test_engine_properties import Planned, random_workload, run_workload


def replay_seed() -> int:
    seed = int(os.environ.get("MILI_TEST_SEED", np.random.SeedSequence().entropy % (1 << 32)))
    print(f"seed {seed} (replay: MILI_TEST_SEED={seed})")
    return seed


class GarblingOracle:
    """Guesses the greedy continuation (computed from the true tokens), each guess garbled with some probability:
    long accepted runs, and rejections at every depth."""

    def __init__(self, rng: np.random.Generator, k: int, garble: float) -> None:
        self.rng, self.k, self.garble = rng, k, garble

    def propose(self, seqs, limits) -> list[Proposal]:
        proposals = []
        for seq, limit in zip(seqs, limits):
            context, guesses = list(seq.token_ids), []
            for _ in range(min(limit, int(self.rng.integers(0, self.k + 1)))):
                token = reference_next_token(context)
                if self.rng.random() < self.garble:
                    token = int(self.rng.integers(VOCAB))
                guesses.append(token)
                context.append(token)
            proposals.append(Proposal(guesses))
        return proposals

    def keep_only(self, alive: set[int]) -> None:
        pass


class SkewedDraftRunner(FakeRunner):
    """A draft model for the fake target: the target's logits plus a fixed random skew per token (so q is close
    to p, but not equal), or entirely its own logits (`unrelated`)."""

    def __init__(self, num_blocks: int, block_size: int, skew: float, seed: int, max_positions: int = 4096) -> None:
        super().__init__(num_blocks, block_size, max_positions=max_positions)
        self.offset = np.random.default_rng(seed).standard_normal(VOCAB).astype(np.float32) * skew

    def run(self, batch):
        return super().run(batch) + self.offset


def make_proposer(kind: str, rng: np.random.Generator, runner: FakeRunner, k: int):
    if kind == "ngram":
        config = SpeculativeConfig("ngram", k, ngram_min=int(rng.integers(1, 3)), ngram_max=int(rng.integers(2, 5)))
        return config, NgramLookup(config)
    if kind == "oracle":
        return SpeculativeConfig("ngram", k), GarblingOracle(rng, k, float(rng.choice([0.0, 0.2, 0.6])))
    draft = SkewedDraftRunner(int(rng.integers(2, 40)), runner.block_size, float(rng.choice([0.0, 1.0])),
                              int(rng.integers(1 << 30)), runner.config.max_position_embeddings)
    return SpeculativeConfig("draft", k, draft_model="fake"), DraftProposer(draft, k)


def twin(engine: Engine, config: SpeculativeConfig | None, proposer) -> Engine:
    runner = engine.runner
    fresh = FakeRunner(runner.num_blocks, runner.block_size, max_positions=runner.config.max_position_embeddings)
    return Engine(fresh, FakeTokenizer(), dataclasses.replace(engine.config, speculative=config), proposer=proposer)


def comparable(planned: list[Planned], rng: np.random.Generator) -> list[Planned]:
    """The workload without its aborts (step timing differs with speculation), some requests asking for logprobs
    and stop strings, all of them allowed to speculate."""
    out = []
    for p in planned:
        params = dataclasses.replace(p.params, logprobs=int(rng.integers(0, 3)) if rng.random() < 0.3 else None,
                                     stop=("ab",) if rng.random() < 0.1 else ())
        out.append(dataclasses.replace(p, params=params, abort_at_step=None))
    return out


@pytest.mark.parametrize("kind", ["ngram", "oracle", "draft"])
def test_speculation_changes_no_token(kind):
    seed = replay_seed()
    rng = np.random.default_rng(seed)
    workloads = int(os.environ.get("MILI_TEST_WORKLOADS", 150))
    compared = proposed = accepted = 0
    for index in range(workloads):
        base, planned = random_workload(rng)
        planned = comparable(planned, rng)
        k = int(rng.integers(1, 9))
        config, proposer = make_proposer(kind, rng, base.runner, k)
        config = dataclasses.replace(config, max_batch_size=int(rng.choice([1, 4, 64])))
        spec = twin(base, config, proposer)
        try:
            expected = run_workload(base, planned)
            got = run_workload(spec, planned)
            assert spec.speculation.proposer_failures == 0
            if kind == "draft":
                proposer.keep_only(set())
                assert proposer.pool.num_free == proposer.pool.num_blocks, "draft KV blocks leaked"
            for p in planned:
                exact = p.params.is_greedy or kind != "draft"  # a sampled draft guess takes extra draws
                for want, have in zip(expected[p.request_id].outputs, got[p.request_id].outputs):
                    if exact:
                        assert have.token_ids == want.token_ids, (p, k)
                        assert have.finish_reason == want.finish_reason
                        assert have.logprobs == want.logprobs
                        assert have.text == want.text
                        compared += len(want.token_ids)
        except AssertionError as exc:
            raise AssertionError(f"workload {index} of seed {seed} ({kind}, k={k}): {exc}") from exc
        proposed += spec.speculation.proposed
        accepted += spec.speculation.accepted
    print(f"{kind}: compared {compared} tokens; {accepted} of {proposed} proposed tokens accepted")
    assert compared > 10 * workloads
    assert proposed > workloads and proposed > accepted  # guesses were verified and rejected, many times
    if kind != "ngram":  # the fake model never repeats itself: n-gram guesses are almost always wrong
        assert accepted > workloads


@pytest.mark.parametrize("kind", ["ngram", "oracle", "draft"])
def test_aborts_and_preemption_leak_nothing(kind):
    seed = replay_seed()
    rng = np.random.default_rng(seed)
    for index in range(100):
        base, planned = random_workload(rng)
        config, proposer = make_proposer(kind, rng, base.runner, int(rng.integers(1, 9)))
        engine = twin(base, dataclasses.replace(config, max_batch_size=64), proposer)
        try:
            run_workload(engine, planned)  # drains, audits blocks every step, checks the pool is whole at the end
            assert engine.speculation.proposer_failures == 0
            if kind == "draft":
                proposer.keep_only(set())
                assert proposer.pool.num_free == proposer.pool.num_blocks, "draft KV blocks leaked"
        except AssertionError as exc:
            raise AssertionError(f"workload {index} of seed {seed} ({kind}): {exc}") from exc


def test_opted_out_and_busy_engines_do_not_speculate():
    config = SpeculativeConfig("ngram", 4, ngram_min=1, max_batch_size=2)
    engine = Engine(FakeRunner(64, 4), FakeTokenizer(), EngineConfig(speculative=config))
    repeat = [1, 2, 3, 4] * 8
    engine.add_request("off", repeat, SamplingParams.greedy(max_tokens=12, ignore_eos=True, speculative=False))
    while engine.has_unfinished():
        engine.step()
    assert engine.speculation.proposed == 0
    engine.add_request("on", repeat, SamplingParams.greedy(max_tokens=12, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.speculation.proposed > 0  # the same request may speculate: only the opt-out stopped it
    engine.speculation.skipped_busy_steps = 0
    for i in range(3):  # three running sequences: above max_batch_size
        engine.add_request(f"busy{i}", repeat, SamplingParams.greedy(max_tokens=6, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.speculation.skipped_busy_steps > 0


# ---------------------------------------------------------------------------------------------- distribution

PROMPT = [5, 9, 2, 7]
# Three tokens: the first comes from the prompt's step; the draft guesses the second (max_tokens leaves room for
# one guess), and the third is the bonus when the guess is kept, or a plain decode when it is not.
SAMPLED = [
    SamplingParams(max_tokens=3, temperature=1.3, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=0.9, top_k=12, top_p=0.9, ignore_eos=True),
    SamplingParams(max_tokens=3, temperature=1.1, min_p=0.02, presence_penalty=1.5, repetition_penalty=1.3,
                   frequency_penalty=0.5, ignore_eos=True),
]


def exact_distributions(params: SamplingParams, length: int) -> list[np.ndarray]:
    """The target's exact marginal distribution of each of the first `length` generated tokens."""
    distinct = np.unique(np.asarray(PROMPT))

    def next_distribution(output: tuple[int, ...]) -> np.ndarray:
        counts: dict[int, int] = {}
        for t in output:
            counts[t] = counts.get(t, 0) + 1
        row = penalised_row(context_logits(np.asarray(PROMPT + list(output))), params, distinct, counts)
        ids, probs = kept_distribution(row, params)
        dense = np.zeros(VOCAB)
        dense[ids] = probs
        return dense

    marginals = []
    paths = {(): 1.0}  # every output prefix with its probability
    for _ in range(length):
        marginal, longer = np.zeros(VOCAB), {}
        for prefix, weight in paths.items():
            dist = next_distribution(prefix)
            marginal += weight * dist
            for t in np.flatnonzero(dist):
                longer[prefix + (int(t),)] = weight * dist[t]
        marginals.append(marginal)
        paths = longer
    return marginals


def sample_tokens(params: SamplingParams, count: int, seed: int) -> np.ndarray:
    """`count` completions of three tokens each with a skewed draft model, as an array [count, 3]."""
    config = SpeculativeConfig("draft", 2, draft_model="fake", max_batch_size=1024)
    draft = SkewedDraftRunner(4096, 4, skew=1.5, seed=seed)
    engine = Engine(FakeRunner(4096, 4), FakeTokenizer(), EngineConfig(max_num_seqs=512, max_num_batched_tokens=4096,
                    enable_prefix_cache=True, speculative=config), proposer=DraftProposer(draft, 2))
    rng = np.random.default_rng(seed)
    for i in range(count):
        engine.add_request(str(i), PROMPT, dataclasses.replace(params, seed=int(rng.integers(1 << 62))))
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[int(out.request_id)] = out.outputs[0].token_ids
    assert engine.speculation.proposer_failures == 0
    assert engine.speculation.proposed > count // 2  # the tokens really went through verification
    return np.array([tokens[i] for i in range(count)])


def goodness_of_fit(observed_tokens: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value of the tokens against an exact distribution (cells of expected count < 5 pooled)."""
    counts = np.bincount(observed_tokens, minlength=VOCAB).astype(float)
    assert counts[expected == 0].sum() == 0, "tokens the target's distribution excludes were generated"
    want = expected * len(observed_tokens)
    small = want < 5
    observed = np.append(counts[~small], counts[small].sum())
    want = np.append(want[~small], want[small].sum())
    keep = want > 0
    return float(chisquare(observed[keep], want[keep]).pvalue)


@pytest.mark.parametrize("case", range(len(SAMPLED)))
def test_draft_speculation_samples_the_target_distribution(case):
    seed = 1234 + case  # fixed: a statistical test fails with probability alpha per seed
    print(f"seed {seed}")
    params = SAMPLED[case]
    tokens = sample_tokens(params, 4000, seed)
    p_values = [goodness_of_fit(tokens[:, i], exact) for i, exact in enumerate(exact_distributions(params, 3))]
    print("chi-square p-values, tokens 1-3:", ", ".join(f"{p:.3g}" for p in p_values))
    assert min(p_values) > 1e-3


def test_the_chi_square_test_rejects_a_wrong_residual(monkeypatch):
    seed = 1234
    print(f"seed {seed}")
    params = SAMPLED[0]
    monkeypatch.setattr(verifier, "residual_distribution", lambda p, q: p)  # resample from p: a classic mistake
    tokens = sample_tokens(params, 4000, seed)
    p_value = goodness_of_fit(tokens[:, 1], exact_distributions(params, 2)[1])
    print(f"chi-square p-value of the second token with the wrong residual: {p_value:.3g}")
    assert p_value < 1e-6


def test_guess_depth_follows_acceptance_and_backs_off():
    depth = GuessDepth()
    assert depth.limit(8) == 8  # optimistic start
    for _ in range(3):
        depth.record(4, 0)  # acceptance 0.5, 0.25, 0.125: gives up, pauses 8 steps
    assert [depth.limit(8) for _ in range(8)] == [0] * 8
    assert depth.limit(8) == 2  # tries again at acceptance 0.5: a run of 1 expected, so 2 guesses
    depth.record(2, 0)
    depth.record(1, 0)  # fails again: the pause doubles
    assert [depth.limit(8) for _ in range(16)] == [0] * 16 and depth.limit(8) > 0
    depth.record(2, 2)  # acceptance 0.75: runs of 3 expected; a kept guess resets the back-off
    assert depth.limit(8) == 4 and depth.next_pause == GuessDepth.FIRST_PAUSE
