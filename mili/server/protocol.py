"""Request bodies of the HTTP API (OpenAI's completions and chat completions, and MILI's /generate), as
pydantic models that reject what the engine cannot run with a message naming the parameter.

Only what changes behaviour is modelled; unknown fields are accepted and ignored, as OpenAI-compatible
servers usually do (clients send vendor extensions freely).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mili.engine.sampling_params import MAX_LOGPROBS, SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling parameters shared by both OpenAI endpoints (plus vLLM-style extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM / SGLang names)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False
    cache_salt: str | None = None
    speculative: bool = True  # MILI: false opts this request out of speculative decoding

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes up to 4 non-empty strings")
        return value

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """The engine's parameters: what the client sent, `defaults` (the checkpoint's suggested settings)
        for fields it left unset, OpenAI's defaults for the rest. Raises ValueError naming a bad field."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=max(0, self.top_k), min_p=self.min_p,
                      repetition_penalty=self.repetition_penalty)
        fields.update(defaults or {})
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stops, ignore_eos=self.ignore_eos,
            logprobs=logprobs, speculative=self.speculative, **fields)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("'prompt' must not be an empty list")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("'prompt' token lists must not be empty")
        return value

    @model_validator(mode="after")
    def _no_echo(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("'echo' is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one string, several, one token list, or several."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # OpenAI content parts: only text is understood
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("'messages' content parts must be of type 'text'")
                texts.append(part["text"])
            content = "".join(texts)
        return {**self.model_dump(exclude={"content"}, exclude_none=True), "content": content or ""}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    @property
    def thinking(self) -> bool | None:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return (self.chat_template_kwargs or {}).get("enable_thinking")


class GenerateRequest(SamplingFields):
    """MILI's native API: one text prompt, the same sampling fields as the OpenAI endpoints."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
