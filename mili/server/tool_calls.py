"""Qwen3's tool calls (the hermes format vLLM's `--tool-call-parser hermes` reads): the model writes

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

once per call, and the answer's `message.tool_calls` gets each as {id, type: "function", function: {name,
arguments: JSON text}}. `ToolCallParser` reads the answer incrementally, as OpenAI streams calls: a call's id and
name as soon as the name is known (and is one of the request's tools), then its arguments in deltas, the text of
the arguments exactly as the model wrote it. A whole body is the parser fed everything at once, so a streamed
call and a plain one agree. Output that is not a well-formed call (bad JSON, an unknown tool, missing fields)
stays text in `content`; a call whose name already went out and whose arguments then turn out malformed ends
with the arguments as written. Blank text around calls is dropped.

`tool_call_grammar` is the Lark grammar (llguidance) that makes the model call: `tool_choice: "required"` (one or
more calls to any tool) or a named function (one call to it), each call's arguments under its JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from mili.engine.completion_text import held_back_length
from mili.engine.structured_output import JSON_OPTIONS

TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# the head of a call that names its function first (as Qwen3 writes them): then the name can go out early
NAME_FIRST = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallDelta:
    """What a stream chunk says of call `index`: its id, type and name first (once), then argument text."""

    index: int
    arguments: str
    call: ToolCall | None = None  # set on the call's first delta

    def as_chunk(self) -> dict[str, Any]:
        if self.call is not None:
            return {"index": self.index, "id": self.call.id, "type": "function",
                    "function": {"name": self.call.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class Parsed:
    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _raw_arguments(body: str) -> str | None:
    """The arguments object's text as the model wrote it, where the body names its function first (the text
    streaming sends); None otherwise."""
    head = NAME_FIRST.match(body)
    if head is None:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(body, head.end())
    except json.JSONDecodeError:
        return None
    return body[head.end():end]


def parse_call_body(body: str, tool_names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments JSON text) of a call body, or None where it is not a well-formed call to a known tool."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in tool_names:
        return None
    arguments = obj.get("arguments", obj.get("parameters"))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    raw = _raw_arguments(body) if isinstance(obj.get("arguments"), dict) else None
    return obj["name"], raw if raw is not None else json.dumps(arguments, ensure_ascii=False)


class ToolCallParser:
    """One choice's answer text, fed in deltas, split into content and tool-call deltas."""

    def __init__(self, tool_names: frozenset[str], parallel: bool = True) -> None:
        self.tool_names = tool_names
        self.parallel = parallel
        self.calls: list[ToolCall] = []
        self._in_call = False
        self._buffer = ""             # text not yet settled (a call's body, or text that may start a call)
        self._open: ToolCall | None = None  # the call whose name went out, while its arguments stream
        self._args_start = 0
        self._args_sent = ""

    def feed(self, text: str, final: bool = False) -> Parsed:
        self._buffer += text
        out = Parsed()
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_START)
                if start == -1:
                    self._release_text(out, final)
                    return out
                out.content += self._buffer[:start].rstrip()  # blanks before a call are dropped
                self._buffer = self._buffer[start + len(TOOL_CALL_START):]
                self._in_call = True
                continue
            end = self._buffer.find(TOOL_CALL_END)
            if end == -1 and not final:
                self._stream_call(out)
                return out
            body = self._buffer if end == -1 else self._buffer[:end]
            self._buffer = "" if end == -1 else self._buffer[end + len(TOOL_CALL_END):]
            self._in_call = False
            self._close_call(body, closed=end != -1, out=out)
            if end == -1:
                return out

    def finish(self) -> Parsed:
        return self.feed("", final=True)

    def _release_text(self, out: Parsed, final: bool) -> None:
        """Text outside calls goes out, except what may start a `<tool_call>` and trailing blanks (dropped if a
        call follows, or at the end beside calls)."""
        if final:
            out.content += self._buffer if not self.calls else self._buffer.rstrip()
            self._buffer = ""
            return
        keep = held_back_length(self._buffer, (TOOL_CALL_START,))
        ready = self._buffer[:len(self._buffer) - keep].rstrip()
        out.content += ready
        self._buffer = self._buffer[len(ready):]

    def _stream_call(self, out: Parsed) -> None:
        body = self._buffer
        if self._open is None:
            head = NAME_FIRST.match(body)
            if head is None or (self.calls and not self.parallel):
                return
            try:
                name = json.loads(head.group(1))
            except json.JSONDecodeError:
                return
            if name not in self.tool_names:
                return  # settled when the call ends: text, unless it turns out well-formed
            self._open = ToolCall(new_call_id(), name, "")
            self._args_start, self._args_sent = head.end(), ""
            out.calls.append(ToolCallDelta(len(self.calls), "", self._open))
        # hold back what may be the end of the call: the object's closing brace, blanks, a partial </tool_call>
        available = body[self._args_start:]
        available = available[:len(available) - held_back_length(available, (TOOL_CALL_END,))].rstrip()
        if available.endswith("}"):
            available = available[:-1].rstrip()
        if len(available) > len(self._args_sent) and available.startswith(self._args_sent):
            out.calls.append(ToolCallDelta(len(self.calls), available[len(self._args_sent):]))
            self._args_sent = available

    def _close_call(self, body: str, closed: bool, out: Parsed) -> None:
        parsed = parse_call_body(body, self.tool_names)
        opened, self._open = self._open, None
        if self.calls and not self.parallel and opened is None:
            return  # one call was asked for: later ones are dropped
        if opened is not None:
            rest = ""
            if parsed is not None and parsed[1].startswith(self._args_sent):
                rest = parsed[1][len(self._args_sent):]
            opened.arguments = self._args_sent + rest
            if rest:
                out.calls.append(ToolCallDelta(len(self.calls), rest))
            self.calls.append(opened)
        elif parsed is not None:
            call = ToolCall(new_call_id(), *parsed)
            out.calls.append(ToolCallDelta(len(self.calls), call.arguments, call))
            self.calls.append(call)
        else:
            out.content += TOOL_CALL_START + body + (TOOL_CALL_END if closed else "")


def tool_call_grammar(tools: list[dict[str, Any]], only: str | None, parallel: bool) -> str:
    """Lark (llguidance) for the output of `tool_choice` "required" (`only` None: any tool, one call or, with
    `parallel`, several) or a named function (`only`: one call to it). The tags are text: Qwen3's tokenizer writes
    each as one token."""
    schemas = []
    for tool in tools:
        function = tool["function"]
        if only is not None and function["name"] != only:
            continue
        schemas.append({"type": "object", "properties": {
            "name": {"const": function["name"]},
            "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False})
    schema = {"anyOf": schemas} if len(schemas) > 1 else schemas[0]
    schema["x-guidance"] = JSON_OPTIONS
    repeat = ' ("\\n" call)*' if parallel and only is None else ""
    return (f"start: call{repeat}\n"
            f'call: {json.dumps(TOOL_CALL_START)} "\\n" body "\\n" {json.dumps(TOOL_CALL_END)}\n'
            f"body: %json {json.dumps(schema)}\n")
