"""The n-gram proposer against a brute-force search written from its definition."""

from __future__ import annotations

import numpy as np
import pytest

from mili.engine.ngram_proposer import NgramProposer


def brute_force(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Longest n in [min_n, max_n] whose suffix occurs earlier; of those occurrences the most recent one; what
    followed it, repeated as the sequence would repeat itself if it went on as it did after that occurrence."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                follow = tokens[start + n:]
                proposal = []
                while len(proposal) < k:  # x[length + i] = x[start + n + i], itself proposed once past the end
                    proposal.append((follow + proposal)[len(proposal)])
                return proposal
    return []


def test_matches_a_brute_force_search_on_random_sequences(rng):
    compared = proposed = 0
    for _ in range(3000):
        vocab = int(rng.integers(2, 12))  # small vocabularies: many matches of every length
        tokens = rng.integers(0, vocab, size=int(rng.integers(0, 60))).tolist()
        min_n = int(rng.integers(1, 4))
        max_n = min_n + int(rng.integers(0, 4))
        k = int(rng.integers(1, 9))
        got = NgramProposer(min_n, max_n, k).propose(tokens)
        assert got == brute_force(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)
        compared += 1
        proposed += bool(got)
    assert compared == 3000 and proposed > 500  # the search really found matches, not only empty proposals


def test_a_repeated_passage_is_proposed_from_its_most_recent_longest_match():
    prompt = [5, 6, 7, 8, 9, 10, 1, 2, 5, 6, 7, 3, 4]
    # The tail [5, 6, 7] occurred at 0 and 8; [9 ...] follows only the first, but 8 is more recent: 3 follows.
    assert NgramProposer(1, 3, 2).propose(prompt + [5, 6, 7]) == [3, 4]
    # A longer n-gram wins over a more recent shorter one.
    assert NgramProposer(1, 4, 3).propose(prompt + [10, 1, 2, 5]) == [6, 7, 3]


def test_no_match_or_too_short_a_sequence_proposes_nothing():
    proposer = NgramProposer(2, 4, 4)
    assert proposer.propose([]) == []
    assert proposer.propose([1, 2]) == []
    assert proposer.propose([1, 2, 3, 4, 2]) == []  # [4, 2] never occurred before; single tokens do not count
    assert proposer.propose(np.array([1, 2, 3, 1, 2], dtype=np.int32)) == [3, 1, 2, 3]


def test_a_match_near_the_end_continues_the_loop_it_found():
    assert NgramProposer(1, 2, 8).propose([4, 4, 4]) == [4] * 8  # [4, 4] at 0..1: period 1
    assert NgramProposer(2, 2, 5).propose([9, 1, 2, 1, 2]) == [1, 2, 1, 2, 1]  # period 2


@pytest.mark.parametrize("kwargs", [{"min_n": 0}, {"min_n": 3, "max_n": 2}, {"k": 0}])
def test_bad_settings_are_refused_with_the_reason(kwargs):
    with pytest.raises(ValueError, match="n-gram sizes|speculative tokens"):
        NgramProposer(**kwargs)
