"""Logprobs in OpenAI's shapes. A token's text is its bytes as UTF-8, or, for a token holding part of a
character, "bytes:\\xe4\\xbd" as OpenAI writes it, so two different tokens never share a key in
`top_logprobs`. Logprobs of -inf (a token that can never be drawn) are sent as -9999.0: JSON has no inf."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mili.engine.sampler import SampledToken
from mili.tokenizer import Tokenizer

FLOOR = -9999.0


def token_text(tokenizer: Tokenizer, token: int) -> str:
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def finite(logprob: float | None) -> float:
    return FLOOR if logprob is None or math.isnan(logprob) else max(logprob, FLOOR)


def completion_logprobs(tokenizer: Tokenizer, tokens: Sequence[SampledToken], text_offset: int) -> dict[str, Any]:
    """/v1/completions' `logprobs` for `tokens`; their text offsets count from `text_offset`."""
    texts = [token_text(tokenizer, s.token) for s in tokens]
    offsets = []
    for text in texts:
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": texts, "token_logprobs": [finite(s.logprob) for s in tokens],
            "top_logprobs": [{token_text(tokenizer, t): finite(lp) for t, lp in s.top_logprobs} for s in tokens],
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, tokens: Sequence[SampledToken]) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs` for `tokens`."""

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": finite(logprob),
                "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]}
                        for s in tokens]}
