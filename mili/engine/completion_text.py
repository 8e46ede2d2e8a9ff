"""The text of one completion: tokens decoded incrementally, cut at a stop string, handed out in deltas.

Stop strings are never part of the output, even when one is spread over several tokens: text that could
still turn out to be the start of a stop string is held back (`pending`) until the next tokens settle it.
A stop string can therefore only begin inside `pending`, so each token costs work in proportion to the
held-back text and the stop strings, never to the whole completion.
"""

from __future__ import annotations

from collections.abc import Collection

from mili.detokenizer import IncrementalDetokenizer
from mili.tokenizer import Tokenizer


def held_back_length(text: str, stops: Collection[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class CompletionText:
    def __init__(self, tokenizer: Tokenizer, stops: Collection[str], skip_special_tokens: bool = True,
                 include_stop: bool = False) -> None:
        """`include_stop`: the stop string that ends the text is kept (vLLM's include_stop_str_in_output)."""
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stops = tuple(stops)
        self._include_stop = include_stop
        self._released: list[str] = []  # text handed out (or ready to be), in pieces
        self._unsent: list[str] = []     # the pieces the next `take_delta` returns
        self._pending = ""               # decoded but held back: it may be the start of a stop string

    def add(self, token: int, check_stops: bool = True) -> bool:
        """Takes one token's text; True if the completion now contains a stop string (it was cut there).
        `check_stops` False (before min_tokens): the text is released as it is, stop strings and all."""
        if not check_stops:
            self._release(self._pending + self._detokenizer.add(token))
            self._pending = ""
            return False
        return self._take(self._detokenizer.add(token), final=False)

    def finish(self) -> bool:
        """The completion ends: releases whatever is held back (a partial character, a stop-string prefix
        that never completed). True if that text completed a stop string."""
        return self._take(self._detokenizer.finish(), final=True)

    def _take(self, new_text: str, final: bool) -> bool:
        pending = self._pending + new_text
        found = [(i, stop) for stop in self._stops if (i := pending.find(stop)) != -1]
        if found:
            cut, stop = min(found, key=lambda hit: (hit[0], -len(hit[1])))
            self._release(pending[:cut + (len(stop) if self._include_stop else 0)])
            self._pending = ""
            return True
        keep = 0 if final else held_back_length(pending, self._stops)
        self._release(pending[:len(pending) - keep])
        self._pending = pending[len(pending) - keep:]
        return False

    def _release(self, text: str) -> None:
        if text:
            self._released.append(text)
            self._unsent.append(text)

    def take_delta(self) -> str:
        """The text released since the previous call."""
        delta = "".join(self._unsent)
        self._unsent.clear()
        return delta

    @property
    def text(self) -> str:
        """Everything released so far (the whole text once the completion finished)."""
        if len(self._released) > 1:
            self._released[:] = ["".join(self._released)]  # keep one piece: later calls are cheap
        return self._released[0] if self._released else ""
