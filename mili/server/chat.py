"""From a chat request to what the engine runs and how its answer is read back: the prompt (the checkpoint's own
chat template, with the request's tools), where a think block starts, which output constraint applies (the
request's, or the tool-call grammar of `tool_choice` "required" / a named function), and which parsers split
the answer (reasoning, tool calls)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mili.engine.sampling_params import Thinking
from mili.engine.structured_output import StructuredOutput
from mili.server.protocol import ChatCompletionRequest, NamedToolChoice
from mili.server.reasoning import THINK_END, THINK_START
from mili.server.tool_calls import tool_call_grammar
from mili.tokenizer import Tokenizer

ASSISTANT_TURN = "<|im_start|>assistant"
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "documents", "add_generation_prompt")


@dataclass(frozen=True)
class ChatPlan:
    prompt: str
    thinking: Thinking                 # where a think block starts (OFF: no reasoning parser, or none possible)
    reasoning_parser: bool             # reasoning is split off (the message then always has reasoning_content)
    tool_names: frozenset[str]         # tool calls are parsed from the answer when not empty
    parallel_tool_calls: bool
    include_reasoning: bool
    structured_output: StructuredOutput | None
    structured_output_param: str | None  # the field it came from (named by a 400 if it does not compile)


def render_prompt(tokenizer: Tokenizer, body: ChatCompletionRequest) -> str:
    """The prompt text (ValueError, naming the field, for what the template or the request cannot do)."""
    kwargs: dict[str, Any] = dict(body.chat_template_kwargs or {})
    kwargs.pop("enable_thinking", None)
    for name in RESERVED_TEMPLATE_KWARGS:
        if name in kwargs:
            raise ValueError(f"'chat_template_kwargs' cannot set {name!r}; send it as a request field")
    messages = [m.as_template_message() for m in body.messages]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                           enable_thinking=body.thinking, tools=body.template_tools(), **kwargs)
    if body.continue_final_message:  # the answer goes on where the last message stops (as in transformers)
        final = messages[-1]["content"].strip()
        at = prompt.rfind(final) if final else -1
        if at == -1:
            raise ValueError("'continue_final_message' needs the last message's text in the rendered prompt")
        prompt = prompt[:at + len(final)]
    return prompt


def thinking_start(prompt: str) -> Thinking:
    """Where the answer's think block starts, read from the assistant turn the prompt ends with: closed there
    (thinking off), opened there (newer templates), or left to the model."""
    turn = prompt.rfind(ASSISTANT_TURN)
    tail = prompt[turn:] if turn != -1 else prompt
    if tail.rfind(THINK_END) > tail.rfind(THINK_START):
        return Thinking.OFF
    return Thinking.OPEN if THINK_START in tail else Thinking.MAY_OPEN


def plan_chat(tokenizer: Tokenizer, body: ChatCompletionRequest, reasoning_parser: bool,
              tool_parser: bool) -> ChatPlan:
    """Raises ValueError naming the field for a request that cannot run."""
    prompt = render_prompt(tokenizer, body)
    named = body.structured_output_named()
    param, structured = named if named else (None, None)
    if body.forces_tool_call:
        if structured is not None:
            raise ValueError("'response_format' cannot be combined with a tool_choice that forces a call")
        only = body.tool_choice.function.name if isinstance(body.tool_choice, NamedToolChoice) else None
        grammar = tool_call_grammar([t.model_dump(exclude_none=True) for t in body.tools], only,
                                    body.parallel_tool_calls)
        structured, param = StructuredOutput("grammar", grammar), "tools"
    reasoning_parser = reasoning_parser and body.separate_reasoning
    thinking = thinking_start(prompt) if reasoning_parser else Thinking.OFF
    if body.thinking_token_budget is not None and thinking is Thinking.OFF:
        raise ValueError("'thinking_token_budget' needs thinking on and the server's --reasoning-parser qwen3")
    if body.parses_tool_calls and not tool_parser:
        raise ValueError("'tools' need tool-call parsing, which this server has off (--tool-call-parser none)")
    names = frozenset(t.function.name for t in body.tools or ()) if body.parses_tool_calls else frozenset()
    return ChatPlan(prompt, thinking, reasoning_parser, names, body.parallel_tool_calls, body.include_reasoning,
                    structured, param)
