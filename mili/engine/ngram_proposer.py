"""N-gram prompt lookup: proposes the tokens that followed the last time the sequence's own tail appeared.

Speculative decoding's cheapest proposer (issue 12): no draft model, no extra weights. When a completion repeats
text it has seen (a code edit echoing the file, a summary quoting its source, a loop), the tokens after the
earlier occurrence are a good guess for the next ones, and the target model verifies a guess of k tokens for
about the cost of one decode step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NgramProposer:
    """Finds the longest suffix of the sequence, between `min_n` and `max_n` tokens long, that also occurs
    earlier in it (prompt and output alike), and proposes the `k` tokens that followed that occurrence (continued
    periodically when they run into the end). Of equally long matches the most recent wins (the nearest context
    is the likeliest to repeat)."""

    min_n: int = 1
    max_n: int = 4
    k: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={self.min_n}, max_n={self.max_n}")
        if self.k < 1:
            raise ValueError(f"the number of speculative tokens must be at least 1, got {self.k}")

    def propose(self, tokens: Sequence[int] | np.ndarray) -> list[int]:
        """The proposal for the token after `tokens`: k token ids, or none when nothing matches."""
        ids = np.asarray(tokens, dtype=np.int64)
        length = len(ids)
        if length < self.min_n + 1:
            return []
        # Candidate ends: earlier positions holding the last token (the match may not be the suffix itself).
        ends = np.flatnonzero(ids[:-1] == ids[-1])
        if len(ends) == 0:
            return []
        # Extend every candidate backwards at once; a candidate stops at its first mismatch or at the start.
        matched = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for back in range(1, min(self.max_n, length - 1)):
            before = ends - back
            alive &= before >= 0
            alive[alive] &= ids[before[alive]] == ids[length - 1 - back]
            if not alive.any():
                break
            matched += alive
        best = matched.max()
        if best < self.min_n:
            return []
        end = int(ends[np.flatnonzero(matched == best)[-1]])
        # What followed the match, continued periodically where it runs into the sequence's end: a sequence
        # that repeats itself with period P = length - 1 - end keeps doing so (a loop "a b a b" proposes
        # "a b a b", not just "a").
        follow = ids[end + 1:]
        return follow[np.arange(self.k) % len(follow)].tolist()
