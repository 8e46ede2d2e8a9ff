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
    return {"tokens": texts,  # an echoed prompt's first token has no logprob: null, as OpenAI says it
            "token_logprobs": [None if s.logprob is None else finite(s.logprob) for s in tokens],
            "top_logprobs": [None if s.logprob is None else {token_text(tokenizer, t): finite(lp)
                                                             for t, lp in s.top_logprobs} for s in tokens],
            "text_offset": offsets}


def vllm_prompt_logprobs(tokenizer: Tokenizer, scored: Sequence[SampledToken | None] | None
                         ) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (the first: null), {token id: {logprob, rank, decoded_token}} for
    the prompt's token and the top alternatives (ranked by position)."""
    if scored is None:
        return None

    def entry(logprob: float, rank: int | None, token: int) -> dict[str, Any]:
        return {"logprob": finite(logprob), "rank": rank, "decoded_token": tokenizer.decode([token])}

    result: list[dict[str, dict[str, Any]] | None] = []
    for s in scored:
        if s is None:
            result.append(None)
            continue
        entries = {str(t): entry(lp, rank, t) for rank, (t, lp) in enumerate(s.top_logprobs, start=1)}
        entries[str(s.token)] = entry(s.logprob, s.rank, s.token)
        result.append(entries)
    return result


def chat_logprobs(tokenizer: Tokenizer, tokens: Sequence[SampledToken]) -> dict[str, Any]:
    """/v1/chat/completions' `logprobs` for `tokens`."""

    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        return {"token": token_text(tokenizer, token), "logprob": finite(logprob),
                "bytes": list(tokenizer.token_bytes(token))}

    return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]}
                        for s in tokens]}
