"""Incremental detokenization for streaming.

Byte-level BPE tokens can end in the middle of a UTF-8 character (an emoji is often 2-4 tokens).
Decoding each new token on its own would emit U+FFFD halves. Instead we decode a short window of
recent tokens and only release text once the window decodes without a trailing replacement
character. The concatenated deltas equal a full `decode` of all tokens once `finish()` is called.
"""

from __future__ import annotations

from mili.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas, one `add` per token."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._tokens: list[int] = []
        # tokens[prefix_start:read_start] were already emitted; they stay in the window as context so
        # that the next decode sees any bytes the newer tokens continue.
        self._prefix_start = 0
        self._read_start = 0
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._tokens[start:end], skip_special_tokens=self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text it completes ('' while a character is still partial)."""
        self._tokens.append(token_id)
        emitted = self._decode(self._prefix_start, self._read_start)
        window = self._decode(self._prefix_start)
        if len(window) <= len(emitted) or window.endswith(REPLACEMENT_CHAR):
            return ""
        delta = window[len(emitted):]
        self._prefix_start = self._read_start
        self._read_start = len(self._tokens)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Releases whatever is still held back (a sequence that ended inside a character)."""
        emitted = self._decode(self._prefix_start, self._read_start)
        window = self._decode(self._prefix_start)
        delta = window[len(emitted):]
        self._prefix_start = self._read_start = len(self._tokens)
        self.text += delta
        return delta
