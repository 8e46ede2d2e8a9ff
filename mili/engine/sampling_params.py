"""SamplingParams: how one request chooses its tokens and when it stops (the OpenAI parameters and
vLLM/SGLang's usual extensions). Every field is checked at construction; a bad value raises ValueError
naming the parameter, so servers can turn it into a 400 that says what to fix."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mili.engine.structured_output import StructuredOutput

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs
# Temperatures below this sample greedily (as vLLM does): dividing logits by a tinier one only overflows,
# and the distribution it describes is the argmax anyway.
GREEDY_BELOW = 1e-5


class Thinking(str, Enum):
    """Whether the output may hold a think block (Qwen3's `<think>...</think>`), which the engine then tracks:
    its tokens are counted, a thinking budget bounds it, and structured output applies after it."""

    OFF = "off"            # not tracked: every token is answer
    MAY_OPEN = "may_open"  # the output may open with <think>
    OPEN = "open"          # the prompt opened the block: the output starts inside it


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1                          # completions per prompt (siblings share the prompt's KV blocks)
    max_tokens: int = 16
    temperature: float = 1.0            # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 = no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0     # transformers' rule, over prompt and output tokens
    presence_penalty: float = 0.0       # OpenAI's rules, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None             # same seed -> same tokens, whatever else runs in the batch
    stop: tuple[str, ...] = ()          # strings that end the output; not part of it unless include_stop
    include_stop: bool = False          # keep the stop string that ended the output (vLLM's include_stop_str_in_output)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None         # None: none; k: the chosen token's logprob and the top k alternatives
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob (after the first) and top k
    skip_special_tokens: bool = True
    speculative: bool = True            # False: never speculate for this request (when the engine does)
    min_tokens: int = 0                 # stop tokens (EOS included) are barred until this many were generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias added to its logit); a dict is accepted
    structured_output: StructuredOutput | None = None  # the answer must match this (JSON schema, regex, ...)
    thinking: Thinking = Thinking.OFF
    thinking_token_budget: int | None = None  # at most this many tokens inside the think block, then </think>

    def __post_init__(self) -> None:
        # `stop` may be one string or any sequence of them, as in the OpenAI API; stored as tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            bias = sorted((int(t), float(b)) for t, b in self.logit_bias.items())
            object.__setattr__(self, "logit_bias", tuple(bias))
        if isinstance(self.thinking, str) and not isinstance(self.thinking, Thinking):
            object.__setattr__(self, "thinking", Thinking(self.thinking))

        def check(ok: bool, name: str, requirement: str) -> None:
            if not ok:
                raise ValueError(f"'{name}' {requirement}, got {getattr(self, name)!r}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value

        check(is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        check(is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature", "must be in [0, 100]")
        check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(is_int(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 = no limit)")
        check(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= 100, "repetition_penalty",
              "must be in (0, 100]")
        check(is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty",
              "must be in [-2, 2]")
        check(is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty",
              "must be in [-2, 2]")
        check(self.seed is None or (is_int(self.seed) and 0 <= self.seed < 2**64), "seed",
              "must be an integer in [0, 2^64) or null")
        check(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop), "stop",
              "must be non-empty strings")
        check(isinstance(self.stop_token_ids, tuple) and all(is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "must be non-negative token ids")
        check(isinstance(self.speculative, bool), "speculative", "must be true or false")
        check(is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "must be an integer in [0, max_tokens]")
        check(isinstance(self.logit_bias, tuple) and all(
            is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100 for t, b in self.logit_bias), "logit_bias",
            "must map token ids to biases in [-100, 100]")
        check(self.structured_output is None or isinstance(self.structured_output, StructuredOutput),
              "structured_output", "must be a StructuredOutput or null")
        check(self.thinking_token_budget is None or (is_int(self.thinking_token_budget)
                                                     and self.thinking_token_budget >= 0),
              "thinking_token_budget", "must be an integer >= 0 or null")
        check(self.thinking_token_budget is None or self.thinking is not Thinking.OFF, "thinking_token_budget",
              "needs a think block to bound (thinking on)")
        check(self.prompt_logprobs is None or (is_int(self.prompt_logprobs)
                                               and 0 <= self.prompt_logprobs <= MAX_LOGPROBS), "prompt_logprobs",
              f"must be an integer in [0, {MAX_LOGPROBS}] or null")
        check(self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs",
              f"must be an integer in [0, {MAX_LOGPROBS}] or null")

    @classmethod
    def greedy(cls, max_tokens: int = 16, **kwargs: object) -> SamplingParams:
        return cls(max_tokens=max_tokens, temperature=0.0, **kwargs)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
