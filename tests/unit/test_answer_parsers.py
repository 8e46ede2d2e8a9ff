"""The answer parsers of chat completions: Qwen3's reasoning split (mili/server/reasoning.py) and its hermes tool
calls (mili/server/tool_calls.py).

Answers are built at random from pieces (think blocks, text, well-formed calls, malformed calls, blank lines) and
streamed in random deltas: the streamed pieces, joined, must equal the whole-body parse, and both must equal what
the answer was built from. Seeds are printed; replay with MILI_TEST_SEED=<seed>.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mili.engine.sampling_params import Thinking
from mili.server.reasoning import ReasoningSplitter, split_reasoning
from mili.server.tool_calls import ToolCallParser, parse_call_body

TOOLS = frozenset({"get_weather", "add", "search.web"})


def random_deltas(text: str, rng: np.random.Generator) -> list[str]:
    """`text` cut at random places (single characters, whole tags, and everything in between)."""
    cuts = sorted(set(rng.integers(0, len(text) + 1, size=int(rng.integers(0, len(text) + 2))).tolist()))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def stream_reasoning(text: str, start: Thinking, rng: np.random.Generator) -> tuple[str, str]:
    splitter = ReasoningSplitter(start)
    reasoning = content = ""
    for delta in random_deltas(text, rng):
        split = splitter.feed(delta)
        reasoning, content = reasoning + split.reasoning, content + split.content
    split = splitter.finish()
    return reasoning + split.reasoning, content + split.content


@pytest.mark.parametrize("text, start, reasoning, content", [
    ("<think>\nLet me see.\n</think>\n\nParis.", Thinking.MAY_OPEN, "\nLet me see.\n", "Paris."),
    ("Paris.", Thinking.MAY_OPEN, None, "Paris."),
    ("I think it is </think>\n\nParis.", Thinking.OPEN, "I think it is ", "Paris."),
    ("\n\nParis.", Thinking.OFF, None, "\n\nParis."),
    ("<think>\nstill thinking when max_tokens came", Thinking.MAY_OPEN, "\nstill thinking when max_tokens came", ""),
    ("<thin", Thinking.MAY_OPEN, None, "<thin"),
    ("a </think> b </think> c", Thinking.OPEN, "a ", " b </think> c"),  # only blank lines are dropped
])
def test_reasoning_split(text, start, reasoning, content, seed):
    assert split_reasoning(text, start) == (reasoning, content)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        assert stream_reasoning(text, start, rng) == (reasoning or "", content)


def call_text(name: str, arguments: dict, spaced: bool = True) -> str:
    separators = (", ", ": ") if spaced else (",", ":")
    body = '{"name": ' + json.dumps(name) + ', "arguments": ' + json.dumps(arguments, separators=separators) + "}"
    return f"<tool_call>\n{body}\n</tool_call>"


def random_answer(rng: np.random.Generator) -> tuple[str, str, list[tuple[str, str]]]:
    """(answer text, the content it should give, its calls (name, arguments text))."""
    pieces, content, calls = [], "", []
    if rng.random() < 0.5:
        lead = str(rng.choice(["Sure.", "Let me check < that > for you:", "Calling <tool now"]))
        pieces.append(lead + str(rng.choice(["", "\n", "\n\n"])))
        content += lead
    for _ in range(int(rng.integers(0, 4))):
        kind = rng.random()
        if kind < 0.6:
            name = str(rng.choice(sorted(TOOLS)))
            arguments = {"city": str(rng.choice(["Paris", "a}b", "x\"y", "Zürich"])), "n": int(rng.integers(-9, 99)),
                         "nested": {"list": [1, {"k": "}"}]}}
            text = call_text(name, arguments, spaced=bool(rng.random() < 0.7))
            calls.append((name, text[len("<tool_call>\n"):-len("\n</tool_call>")].split('"arguments": ', 1)[1][:-1]))
        elif kind < 0.8:  # malformed from its first characters (never mistaken for a call while streaming)
            text = str(rng.choice(['<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
                                   '<tool_call>\nnot json at all\n</tool_call>',
                                   '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>']))
            content += text
        else:
            text = "\n"
        pieces.append(text + str(rng.choice(["", "\n"])))
    return "".join(pieces), content, calls


def test_streamed_tool_calls_equal_the_whole_parse(seed):
    rng = np.random.default_rng(seed)
    checked_calls = 0
    for _ in range(300):
        text, content, calls = random_answer(rng)
        whole = ToolCallParser(TOOLS)
        parsed = whole.feed(text, final=True)
        assert parsed.content.rstrip() == content, text  # blanks around calls are dropped; a text's own stay
        assert [(c.name, c.arguments) for c in whole.calls] == calls, text
        streamed = ToolCallParser(TOOLS)
        streamed_content, arguments, headers = "", {}, []
        for delta in [*random_deltas(text, rng), None]:
            out = streamed.finish() if delta is None else streamed.feed(delta)
            streamed_content += out.content
            for call_delta in out.calls:
                if call_delta.call is not None:  # the name goes out first, before any of its arguments
                    assert call_delta.index not in arguments
                    headers.append((call_delta.call.id, call_delta.call.name))
                arguments[call_delta.index] = arguments.get(call_delta.index, "") + call_delta.arguments
        assert streamed_content == parsed.content, text
        assert [name for _, name in headers] == [name for name, _ in calls]
        assert [arguments[i] for i in range(len(calls))] == [a for _, a in calls]
        assert len({call_id for call_id, _ in headers}) == len(headers)  # every call its own id
        checked_calls += len(calls)
    assert checked_calls > 100, checked_calls


def test_malformed_calls_stay_text():
    for text in ['<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call>',
                 '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',
                 '<tool_call>\n{"name": "add"}\n</tool_call>',
                 '<tool_call>\n{"name": "add", "arguments": {"a": 1}}']:  # never closed, yet well-formed: a call
        parser = ToolCallParser(TOOLS)
        out = parser.feed(text, final=True)
        if text.endswith("}}"):
            assert [c.name for c in parser.calls] == ["add"] and out.content == ""
        else:
            assert parser.calls == [] and out.content == text


def test_a_streamed_call_whose_arguments_break_ends_as_written():
    parser = ToolCallParser(TOOLS)
    first = parser.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1')
    assert first.calls[0].call.name == "add"
    parser.feed(", oops\n</tool_call>")
    assert parser.calls[0].arguments.startswith('{"a": 1')


def test_only_one_call_when_parallel_calls_are_off():
    text = call_text("add", {"a": 1}) + "\n" + call_text("get_weather", {"city": "Rome"})
    parser = ToolCallParser(TOOLS, parallel=False)
    out = parser.feed(text, final=True)
    assert [c.name for c in parser.calls] == ["add"] and out.content == ""


def test_call_bodies():
    assert parse_call_body('{"name": "add", "arguments": {"a":1}}', TOOLS) == ("add", '{"a":1}')
    assert parse_call_body('{"arguments": {"a": 1}, "name": "add"}', TOOLS) == ("add", '{"a": 1}')
    assert parse_call_body('{"name": "add", "arguments": "{\\"a\\": 1}"}', TOOLS) == ("add", '{"a": 1}')
    assert parse_call_body('{"name": "add", "parameters": {"a": 1}}', TOOLS) == ("add", '{"a": 1}')
    assert parse_call_body('{"name": "nope", "arguments": {}}', TOOLS) is None
    assert parse_call_body('[1, 2]', TOOLS) is None
