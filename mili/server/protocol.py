"""Request bodies of the HTTP API (OpenAI's completions and chat completions, vLLM's extensions to them, and
MILI's /generate), as pydantic models that reject what the engine cannot run with a message naming the
parameter.

No field is dropped silently. A field MILI does not know, or knows and does not implement, is a 400 naming it,
unless its value changes nothing (null, or the neutral values in NEUTRAL_VALUES); a few fields clients send
routinely and that mean nothing here are accepted and ignored (IGNORED_FIELDS). README lists the decisions.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mili.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from mili.engine.structured_output import StructuredOutput, StructuredOutputError

# Accepted and ignored: bookkeeping that has no meaning for a local engine.
IGNORED_FIELDS = {
    "store": "MILI stores no completions",
    "metadata": "MILI stores no completions",
    "service_tier": "one tier",
    "prompt_cache_key": "prefix caching is automatic",
    "safety_identifier": "no abuse monitoring",
    "request_id": "each response gets a fresh id",
    "add_special_tokens": "Qwen3 adds no special tokens to a prompt",
    "spaces_between_special_tokens": "Qwen3's byte-level decoding puts no spaces between tokens",
    "guided_decoding_backend": "structured output always runs on llguidance",
}
# Fields MILI does not implement, accepted at the value that asks for nothing (vLLM clients send some of these).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1, 1.0), "early_stopping": (False,), "priority": (0,),
    "modalities": (["text"],), "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
    "return_hidden_states": (False,), "stream_reasoning": (True,),  # what sglang-router adds to every request
}
# What to use instead, for fields asked for by name.
ALTERNATIVES = {
    "functions": "use 'tools'", "function_call": "use 'tool_choice'",
    "reasoning_effort": "use 'thinking_token_budget' or chat_template_kwargs.enable_thinking",
    "suffix": "Qwen3 completions take no suffix",
    "guided_whitespace_pattern": "JSON output uses ', ' and ': ' separators and no other whitespace",
}


def unsupported_fields(extra: dict[str, Any] | None) -> None:
    """Raises ValueError naming the first field of `extra` (unknown to the model) that MILI cannot honour."""
    for name, value in (extra or {}).items():
        if name in IGNORED_FIELDS or value is None or value in NEUTRAL_VALUES.get(name, ()):
            continue
        hint = f"; {ALTERNATIVES[name]}" if name in ALTERNATIVES else ""
        raise ValueError(f"'{name}' is not supported by this server{hint}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'response_format' of type json_schema needs 'json_schema': {name, schema}")
        return self


class StructuredOutputsFields(BaseModel):
    """vLLM's `structured_outputs` object (one constraint of several kinds)."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(BaseModel):
    """The sampling parameters shared by every endpoint (OpenAI's, then vLLM/SGLang's extensions)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # extensions (vLLM / SGLang names)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    cache_salt: str | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsFields | None = None
    # SGLang's names (what sglang-router forwards; it drops vLLM's guided_*)
    regex: str | None = None
    json_schema: str | None = None  # the schema as JSON text
    ebnf: str | None = None
    no_stop_trim: bool = False  # SGLang's include_stop_str_in_output
    speculative: bool = True  # MILI: false opts this request out of speculative decoding

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes up to 4 non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"'logit_bias' keys are token ids as strings, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"'logit_bias' values lie in [-100, 100], got {bias} for token {token}")
        return value

    @model_validator(mode="after")
    def _supported(self) -> SamplingFields:
        unsupported_fields(self.model_extra)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def structured_output(self) -> StructuredOutput | None:
        named = self.structured_output_named()
        return named[1] if named else None

    def structured_output_named(self) -> tuple[str, StructuredOutput] | None:
        """The one output constraint the request asks for (response_format, guided_*, structured_outputs) and
        the field that asked; ValueError naming the field when it asks for several or one cannot be used."""
        asked: list[tuple[str, StructuredOutput]] = []
        if self.response_format is not None and self.response_format.type != "text":
            fmt = self.response_format
            asked.append(("response_format", _constraint("response_format", "json", fmt.json_schema.json_schema)
                          if fmt.type == "json_schema" else StructuredOutput("json_object")))
        candidates = [("guided_json", "json", self.guided_json), ("guided_regex", "regex", self.guided_regex),
                      ("guided_choice", "choice", self.guided_choice),
                      ("guided_grammar", "grammar", self.guided_grammar), ("regex", "regex", self.regex),
                      ("json_schema", "json", self.json_schema), ("ebnf", "grammar", self.ebnf)]
        if (so := self.structured_outputs) is not None:
            candidates += [("structured_outputs", "json", so.json_), ("structured_outputs", "regex", so.regex),
                           ("structured_outputs", "choice", so.choice), ("structured_outputs", "grammar", so.grammar),
                           ("structured_outputs", "json_object", True if so.json_object else None)]
        asked += [(name, _constraint(name, kind, value)) for name, kind, value in candidates if value is not None]
        if len(asked) > 1:
            raise ValueError(f"'{asked[1][0]}' asks for a second output format beside '{asked[0][0]}'; send one")
        return asked[0] if asked else None

    def sampling_params(self, max_tokens: int, logprobs: int | None, defaults: dict[str, Any] | None = None,
                        **extra: Any) -> SamplingParams:
        """The engine's parameters: what the client sent, `defaults` (the checkpoint's suggested settings)
        for fields it left unset, OpenAI's defaults for the rest; `extra`: endpoint-specific fields. Raises
        ValueError naming a bad field."""
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=max(0, self.top_k), min_p=self.min_p,
                      repetition_penalty=self.repetition_penalty)
        fields.update(defaults or {})
        if "structured_output" not in extra:  # an endpoint that worked it out already passes it (chat's plan)
            fields["structured_output"] = self.structured_output()
        fields.update(extra)
        if self.min_tokens > max_tokens:
            raise ValueError(f"'min_tokens' ({self.min_tokens}) is more than max_tokens ({max_tokens})")
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=stops,
            include_stop=self.include_stop_str_in_output or self.no_stop_trim,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, speculative=self.speculative, min_tokens=self.min_tokens,
            logit_bias={int(t): b for t, b in (self.logit_bias or {}).items()},
            skip_special_tokens=self.skip_special_tokens, **fields)


def _constraint(name: str, kind: str, value: Any) -> StructuredOutput:
    try:
        if kind == "json":
            return StructuredOutput.json_schema(json.loads(value) if isinstance(value, str) else value)
        if kind == "json_object":
            return StructuredOutput("json_object")
        if kind == "regex":
            return StructuredOutput("regex", value)
        if kind == "choice":
            return StructuredOutput.choice(value)
        return StructuredOutput("grammar", grammar_as_lark(value))
    except (json.JSONDecodeError, StructuredOutputError) as exc:
        raise ValueError(f"'{name}': {exc}") from None


def grammar_as_lark(grammar: str) -> str:
    """A grammar in llguidance's Lark dialect; GBNF (llama.cpp's, `rule ::= ...`, what vLLM's xgrammar takes)
    is converted."""
    if "::=" in grammar:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            return gbnf_to_lark(grammar)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions for bad input
            raise StructuredOutputError(f"the GBNF grammar does not convert: {exc}") from None
    return grammar


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("'prompt' must not be an empty list")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("'prompt' token lists must not be empty")
        return value

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """How many alternatives the engine scores each prompt token with: prompt_logprobs', or logprobs' when the
        prompt is echoed with logprobs."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("'best_of' is not supported (only best_of = n, which returns every completion)")
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

    role: Literal["system", "developer", "user", "assistant", "tool"]
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
        role = "system" if self.role == "developer" else self.role  # OpenAI's newer name for system
        return {**self.model_dump(exclude={"content"}, exclude_none=True), "role": role, "content": content or ""}


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(default=None, ge=0, alias="max_thinking_tokens")
    include_reasoning: bool = True
    separate_reasoning: bool = True  # SGLang's: false leaves the think block in content for this request
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        if self.echo:
            raise ValueError("'echo' is not supported for chat completions")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("'tool_choice' needs 'tools'")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools or ()}:
            raise ValueError(f"'tool_choice' names {self.tool_choice.function.name!r}, which is not in 'tools'")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("'continue_final_message' needs 'add_generation_prompt': false and a last message "
                             "from the assistant")
        return self

    @property
    def thinking(self) -> bool | None:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return (self.chat_template_kwargs or {}).get("enable_thinking")

    @property
    def forces_tool_call(self) -> bool:
        return self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)

    @property
    def parses_tool_calls(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template shows the model (none for tool_choice "none": it is not to call any)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template first."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = True  # Qwen3 adds none either way
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send one of 'prompt' and 'messages'")
        return self

    def as_chat(self) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=self.messages, tools=self.tools,
                                     chat_template_kwargs=self.chat_template_kwargs,
                                     add_generation_prompt=self.add_generation_prompt,
                                     continue_final_message=self.continue_final_message)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(min_length=1)


class GenerateRequest(SamplingFields):
    """MILI's native API: one text prompt, the same sampling fields as the OpenAI endpoints."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)

