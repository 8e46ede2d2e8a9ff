"""Engine outputs in the response shapes of OpenAI's completions and chat completions (whole bodies and
streamed chunks) and of MILI's /generate. Each response object remembers what it already streamed, so
every generated token's logprob reaches the client exactly once, in order, whether or not its text was
held back (a possible stop-string prefix, half a UTF-8 character)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from mili.engine.outputs import CompletionOutput, RequestOutput
from mili.engine.sampler import SampledToken
from mili.engine.sampling_params import Thinking
from mili.server.chat import ChatPlan
from mili.server.logprobs import chat_logprobs, completion_logprobs, vllm_prompt_logprobs
from mili.server.reasoning import ReasoningSplitter, Split
from mili.server.tool_calls import ToolCallDelta, ToolCallParser
from mili.tokenizer import Tokenizer

Chunk = dict[str, Any]


def usage(finals: list[RequestOutput]) -> dict[str, Any]:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(c.num_tokens for o in finals for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.metrics.cached_tokens for o in finals)}}


class _Streamed:
    """Per choice: whether its finish was sent; per request: its latest output (for usage)."""

    def __init__(self) -> None:
        self.finished: set[tuple[int, int]] = set()
        self.latest: dict[int, RequestOutput] = {}

    def news(self, index: int, out: RequestOutput) -> Iterator[CompletionOutput]:
        self.latest[index] = out
        for c in out.outputs:
            if (index, c.index) in self.finished:
                continue
            if c.finish_reason:
                self.finished.add((index, c.index))
            if c.delta or c.finish_reason or c.delta_logprobs:
                yield c


class Completions:
    """/v1/completions for `num_prompts` prompts of `n` choices each (choice index = prompt * n + choice).
    `echo`: each prompt's text, which goes before its choices' text (and its tokens before their logprobs);
    `prompt_logprobs`: each choice carries vLLM's `prompt_logprobs` (with the first chunk, when streaming)."""

    def __init__(self, tokenizer: Tokenizer, response_id: str, model: str, n: int, num_prompts: int,
                 echo: list[str] | None = None, prompt_logprobs: bool = False) -> None:
        self.tokenizer, self.n, self.num_prompts = tokenizer, n, num_prompts
        self.base = {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model}
        self.streamed = _Streamed()
        self.text_offsets: dict[tuple[int, int], int] = {}
        self.echo, self.prompt_logprobs = echo, prompt_logprobs
        self.opened: set[tuple[int, int]] = set()  # choices whose first chunk went out

    def _prompt_tokens(self, out: RequestOutput) -> list[SampledToken]:
        """The prompt as logprob entries for echo: the first token has none."""
        scored = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
        return [s if s is not None else SampledToken(t, None) for t, s in zip(out.prompt_token_ids, scored)]

    def _choice(self, index: int, c: CompletionOutput, out: RequestOutput, text: str, tokens: list | None,
                first: bool) -> dict[str, Any]:
        if first and self.echo is not None:
            text = self.echo[index] + text
            tokens = None if tokens is None else self._prompt_tokens(out) + tokens
        choice = {"index": index * self.n + c.index, "text": text, "finish_reason": c.finish_reason,
                  "logprobs": self._logprobs(index, c, tokens)}
        if first and self.prompt_logprobs:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, out.prompt_logprobs)
        return choice

    def _logprobs(self, index: int, c: CompletionOutput, tokens: list | None) -> dict[str, Any] | None:
        if tokens is None:
            return None
        key = (index, c.index)
        result = completion_logprobs(self.tokenizer, tokens, self.text_offsets.get(key, 0))
        self.text_offsets[key] = self.text_offsets.get(key, 0) + sum(len(t) for t in result["tokens"])
        return result

    def chunks(self, index: int, out: RequestOutput) -> Iterator[Chunk]:
        for c in self.streamed.news(index, out):
            first = (index, c.index) not in self.opened
            self.opened.add((index, c.index))
            yield {**self.base, "choices": [self._choice(index, c, out, c.delta, c.delta_logprobs, first)]}

    def usage_chunk(self) -> Chunk:
        return {**self.base, "choices": [], "usage": usage(list(self.streamed.latest.values()))}

    def body(self, finals: list[RequestOutput]) -> dict[str, Any]:
        choices = [self._choice(i, c, out, c.text, c.logprobs, True)
                   for i, out in enumerate(finals) for c in out.outputs]
        return {**self.base, "choices": choices, "usage": usage(finals)}


class ChoiceReader:
    """One chat choice's answer, read as it streams: reasoning split off (when the request tracks a think block),
    then tool calls parsed from the rest (when the request has tools)."""

    def __init__(self, plan: ChatPlan) -> None:
        self.reasoning = ReasoningSplitter(plan.thinking) if plan.thinking is not Thinking.OFF else None
        self.tools = ToolCallParser(plan.tool_names, plan.parallel_tool_calls) if plan.tool_names else None
        self.include_reasoning = plan.include_reasoning
        self.reports_reasoning = plan.reasoning_parser and plan.include_reasoning  # (null when there was none)

    def read(self, text: str, final: bool) -> dict[str, Any]:
        """The delta fields `text` settles (`final`: the answer ends with it): reasoning_content (and vLLM's newer
        name for it, reasoning), content, tool_calls."""
        split = self.reasoning.feed(text, final) if self.reasoning else Split(content=text)
        delta: dict[str, Any] = {}
        if split.reasoning and self.include_reasoning:
            delta["reasoning_content"] = delta["reasoning"] = split.reasoning
        content, calls = split.content, []
        if self.tools is not None:
            parsed = self.tools.feed(content, final)
            content, calls = parsed.content, merged_call_deltas(parsed.calls)
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.tools is not None and self.tools.calls else reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole answer as a message (the reader fed all of it at once: what the stream says, joined)."""
        delta = self.read(text, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": delta.get("content")}
        if self.reports_reasoning:
            saw = self.reasoning is not None and self.reasoning.saw_reasoning
            message["reasoning_content"] = message["reasoning"] = delta.get("reasoning_content", "" if saw else None)
        if self.tools is not None and self.tools.calls:
            message["tool_calls"] = [call.as_message() for call in self.tools.calls]
        elif message["content"] is None and message.get("reasoning_content") is None:
            message["content"] = ""
        return message


def merged_call_deltas(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """Tool-call deltas as chunk entries, one per call (a call's name and first arguments share one entry)."""
    entries: list[dict[str, Any]] = []
    for delta in deltas:
        if entries and entries[-1]["index"] == delta.index:
            entries[-1]["function"]["arguments"] += delta.arguments
        else:
            entries.append(delta.as_chunk())
    return entries


class ChatCompletions:
    def __init__(self, tokenizer: Tokenizer, response_id: str, model: str, n: int, plan: ChatPlan,
                 prompt_logprobs: bool = False) -> None:
        self.tokenizer, self.n, self.plan, self.prompt_logprobs = tokenizer, n, plan, prompt_logprobs
        self.base = {"id": response_id, "created": int(time.time()), "model": model}
        self.chunk_base = {**self.base, "object": "chat.completion.chunk"}
        self.streamed = _Streamed()
        self.readers = [ChoiceReader(plan) for _ in range(n)]
        self.started = False

    def _logprobs(self, tokens: list | None) -> dict[str, Any] | None:
        return None if tokens is None else chat_logprobs(self.tokenizer, tokens)

    def _usage(self, finals: list[RequestOutput]) -> dict[str, Any]:
        result = usage(finals)
        if self.plan.reasoning_parser:
            reasoning = sum(c.num_reasoning_tokens for o in finals for c in o.outputs)
            result["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return result

    def chunks(self, index: int, out: RequestOutput) -> Iterator[Chunk]:
        if not self.started:  # OpenAI opens each choice with the role
            self.started = True
            for i in range(self.n):
                opening = {**self.chunk_base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}]}
                if i == 0 and self.prompt_logprobs:
                    opening["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, out.prompt_logprobs)
                yield opening
        for c in self.streamed.news(index, out):
            reader = self.readers[c.index]
            delta = reader.read(c.delta, final=c.finish_reason is not None)
            if delta or c.finish_reason or c.delta_logprobs:
                yield {**self.chunk_base, "choices": [{"index": c.index, "delta": delta,
                                                       "finish_reason": reader.finish_reason(c.finish_reason),
                                                       "logprobs": self._logprobs(c.delta_logprobs)}]}

    def usage_chunk(self) -> Chunk:
        return {**self.chunk_base, "choices": [], "usage": self._usage(list(self.streamed.latest.values()))}

    def body(self, final: RequestOutput) -> dict[str, Any]:
        choices = []
        for c in final.outputs:
            reader = self.readers[c.index]
            choices.append({"index": c.index, "message": reader.message(c.text), "logprobs": self._logprobs(c.logprobs),
                            "finish_reason": reader.finish_reason(c.finish_reason)})
        body = {**self.base, "object": "chat.completion", "choices": choices, "usage": self._usage([final])}
        if self.prompt_logprobs:
            body["prompt_logprobs"] = vllm_prompt_logprobs(self.tokenizer, final.prompt_logprobs)
        return body


class Generate:
    """MILI's /generate: {"text": delta} events, then the result."""

    @staticmethod
    def result(out: RequestOutput) -> dict[str, Any]:
        c = out.outputs[0]
        return {"generated_text": c.text, "prompt_tokens": len(out.prompt_token_ids),
                "completion_tokens": c.num_tokens, "finish_reason": c.finish_reason}

    def chunks(self, index: int, out: RequestOutput) -> Iterator[Chunk]:
        if out.outputs and out.outputs[0].delta:
            yield {"text": out.outputs[0].delta}
        if out.finished:
            yield self.result(out)
