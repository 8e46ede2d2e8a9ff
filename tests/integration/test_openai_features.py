"""What clients written for vLLM's Qwen3 server rely on, through the official openai client against a real `mili serve
--reasoning-parser qwen3 --speculative ngram` on a random-weight model: reasoning split off (and bounded), tool
calls (forced by grammar, parsed, streamed, fed back), structured output under JSON schemas, regexes and choices
(a random model writes garbage: every output validating is the proof the token masks work), logit_bias,
min_tokens, stop_token_ids, /tokenize, and a 400 for every field MILI does not implement.

The checkpoint's chat template opens the think block in the prompt (as Qwen3's 2507 thinking models do), so a
random model thinks from its first token: the budget and the unfinished block are exercised for real. Seeds are
printed; replay with MILI_TEST_SEED=<seed>.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

from mili.checkpoints import cached_checkpoint
from tests.servers import mili_serve

MODEL = "tiny-thinking"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Adds two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 10},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3}},
     "required": ["name", "role", "address", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "items": {"type": "array", "maxItems": 2, "items": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99}, "kind": {"enum": ["a", "b"]}},
            "required": ["id", "kind"], "additionalProperties": False}}},
     "required": ["ok", "count", "items"], "additionalProperties": False},
    {"type": "array", "items": {"enum": [1, "two", None, True]}, "minItems": 1, "maxItems": 4},
]


def thinking_checkpoint(folder: Path) -> Path:
    """The tiny test checkpoint with a chat template that opens <think> in the generation prompt."""
    source = cached_checkpoint("tiny-tied-gqa2-d64")
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "tokenizer_config.json").read_text())
    opening = "{{- '<|im_start|>assistant\\n' }}"
    assert config["chat_template"].count(opening) == 1
    config["chat_template"] = config["chat_template"].replace(opening, "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    checkpoint = thinking_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-thinking")
    try:
        with mili_serve(["--model", str(checkpoint), "--served-model-name", MODEL, "--reasoning-parser", "qwen3",
                         "--speculative", "ngram", "--max-model-len", "1024", "--kv-cache-memory", "2e8",
                         "--max-num-seqs", "16"], "openai-features") as (url, _):
            yield url
    finally:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, content: str = "Hello", **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def streamed_message(stream) -> tuple[dict, str | None, list]:
    """The joined deltas of a streamed chat completion (one choice): fields, finish reason, tool-call deltas."""
    joined = {"reasoning_content": "", "content": "", "tool_calls": {}}
    finish, call_deltas = None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta.model_dump(exclude_none=True)
        joined["reasoning_content"] += delta.get("reasoning_content", "")
        joined["content"] += delta.get("content", "") or ""
        for call in delta.get("tool_calls", []):
            call_deltas.append(call)
            entry = joined["tool_calls"].setdefault(call["index"], {"name": None, "arguments": ""})
            if "id" in call:
                assert entry["name"] is None and not entry["arguments"], "a call's name comes once, first"
                entry["id"], entry["name"] = call["id"], call["function"]["name"]
            entry["arguments"] += call["function"].get("arguments") or ""
        finish = chunk.choices[0].finish_reason or finish
    return joined, finish, call_deltas


# ---------------------------------------------------------------- reasoning


def test_reasoning_goes_to_reasoning_content_and_the_budget_closes_it(client, seed):
    budget = 6
    out = ask(client, max_tokens=40, seed=seed, extra_body={"thinking_token_budget": budget})
    message = out.choices[0].message
    assert message.reasoning_content and "<think>" not in message.reasoning_content
    assert message.reasoning == message.reasoning_content  # vLLM's newer name for it
    assert out.usage.completion_tokens_details.reasoning_tokens == budget + 1  # the thoughts and </think>
    assert "</think>" not in (message.content or "")
    streamed, finish, _ = streamed_message(ask(client, max_tokens=40, seed=seed, stream=True,
                                               extra_body={"max_thinking_tokens": budget}))
    assert streamed["reasoning_content"] == message.reasoning_content
    assert streamed["content"] == (message.content or "") and finish == out.choices[0].finish_reason


def test_an_unfinished_think_block_is_all_reasoning(client, seed):
    out = ask(client, max_tokens=12, seed=seed, temperature=0.9)
    choice = out.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert choice.message.reasoning_content and out.usage.completion_tokens_details.reasoning_tokens == 12
    hidden = ask(client, max_tokens=12, seed=seed, temperature=0.9, extra_body={"include_reasoning": False})
    assert getattr(hidden.choices[0].message, "reasoning_content", None) is None


def test_thinking_off_is_all_content(client, seed):
    out = ask(client, max_tokens=10, seed=seed, extra_body={**NO_THINKING, "ignore_eos": True})
    message = out.choices[0].message
    assert message.content and message.reasoning_content is None
    assert out.usage.completion_tokens_details.reasoning_tokens == 0


# ---------------------------------------------------------------- tool calls


def check_call(call) -> dict:
    tool = {"get_weather": WEATHER, "add": ADD}[call.function.name]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    assert call.type == "function" and call.id.startswith("call_")
    return arguments


def test_a_tool_calling_round_trip(client, server, seed):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, seed=seed, extra_body=NO_THINKING)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    check_call(call)
    streamed, finish, deltas = streamed_message(client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        max_tokens=200, seed=seed, extra_body=NO_THINKING, stream=True))
    assert finish == "tool_calls" and len(deltas) > 2  # the arguments came in pieces
    assert [(c["name"], c["arguments"]) for c in streamed["tool_calls"].values()] == \
        [(call.function.name, call.function.arguments)]
    follow_up = [*messages, choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    answer = client.chat.completions.create(model=MODEL, messages=follow_up, tools=TOOLS, max_tokens=8, seed=seed,
                                            extra_body={**NO_THINKING, "ignore_eos": True})
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    rendered = httpx.post(f"{server}/tokenize", json={"messages": follow_up, "tools": TOOLS,
                                                      "chat_template_kwargs": NO_THINKING["chat_template_kwargs"]})
    text = httpx.post(f"{server}/detokenize", json={"tokens": rendered.json()["tokens"]}).json()["prompt"]
    assert "<tool_response>\n22 degrees and sunny\n</tool_response>" in text and '"name": "get_weather"' in text
    assert answer.usage.prompt_tokens == rendered.json()["count"]


@pytest.mark.parametrize("tool_choice, parallel", [({"type": "function", "function": {"name": "add"}}, True),
                                                   ("required", True)])
def test_forced_tool_choices(client, seed, tool_choice, parallel):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "1 + 2?"}], tools=TOOLS,
                                         tool_choice=tool_choice, parallel_tool_calls=parallel, max_tokens=600,
                                         seed=seed, temperature=1.0, extra_body=NO_THINKING)
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and calls
    for call in calls:
        check_call(call)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in calls] == ["add"]


def test_tool_choice_none_hides_the_tools(client, server):
    with_none = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                               tool_choice="none", max_tokens=4, extra_body=NO_THINKING)
    without = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                             extra_body=NO_THINKING)
    assert with_none.usage.prompt_tokens == without.usage.prompt_tokens
    assert not with_none.choices[0].message.tool_calls


def forced(text: str) -> dict:
    """extra_body that makes the model write exactly `text` (a regex of it), with thinking off."""
    return {**NO_THINKING, "guided_regex": re.escape(text)}


def test_auto_parses_parallel_calls_and_leaves_malformed_ones_as_text(client):
    two = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
           '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "both"}], tools=TOOLS, max_tokens=80)
    out = client.chat.completions.create(**kwargs, extra_body=forced(two))
    calls = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2
    streamed, finish, _ = streamed_message(client.chat.completions.create(**kwargs, stream=True,
                                                                          extra_body=forced(two)))
    assert finish == "tool_calls" and [(c["name"], c["arguments"]) for c in streamed["tool_calls"].values()] == \
        [(c.function.name, c.function.arguments) for c in calls]
    one_only = client.chat.completions.create(**kwargs, parallel_tool_calls=False, extra_body=forced(two))
    assert [c.function.name for c in one_only.choices[0].message.tool_calls] == ["get_weather"]
    # broken from its head (a call whose name went out is closed with its arguments as written: test_answer_parsers)
    broken = '<tool_call>\n{"name": get_weather, "arguments": {"city": "Paris"}}\n</tool_call>'
    for stream in (False, True):
        response = client.chat.completions.create(**kwargs, stream=stream, extra_body=forced(broken))
        if stream:
            message, finish, deltas = streamed_message(response)
            assert deltas == [] and message["content"] == broken and finish == "stop"
        else:
            assert response.choices[0].message.content == broken and not response.choices[0].message.tool_calls
            assert response.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- structured output


def test_every_output_under_a_json_schema_validates(client, seed):
    validated = 0
    for i, schema in enumerate(SCHEMAS):
        out = ask(client, f"JSON {i}", n=2, max_tokens=300, seed=seed + i, temperature=1.0, extra_body=NO_THINKING,
                  response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                          "strict": True}})
        for choice in out.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), schema)
            validated += 1
    streamed, finish, _ = streamed_message(ask(client, "JSON", max_tokens=300, seed=seed, stream=True,
                                               extra_body={**NO_THINKING, "guided_json": SCHEMAS[0]}))
    jsonschema.validate(json.loads(streamed["content"]), SCHEMAS[0])
    completion = client.completions.create(model=MODEL, prompt="JSON:", max_tokens=300, seed=seed,
                                           extra_body={"structured_outputs": {"json": SCHEMAS[1]}})
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS[1])
    assert validated == 2 * len(SCHEMAS)


def test_the_answer_after_a_bounded_think_block_matches_the_schema(client, seed):
    out = ask(client, max_tokens=300, seed=seed, extra_body={"thinking_token_budget": 5, "guided_json": SCHEMAS[2]})
    message = out.choices[0].message
    assert message.reasoning_content and out.usage.completion_tokens_details.reasoning_tokens == 6
    jsonschema.validate(json.loads(message.content), SCHEMAS[2])


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    species: str = pydantic.Field(pattern="^(cat|dog|newt)$")
    legs: int = pydantic.Field(ge=0, le=8)


def test_the_openai_clients_parse_helper(client, seed):
    out = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A pet"}],
                                        response_format=Pet, max_tokens=200, seed=seed, extra_body=NO_THINKING)
    pet = out.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.species in ("cat", "dog", "newt")


def test_regex_choice_and_any_json_object(client, server, seed):
    pattern = r"[A-Z][a-z]{2,6} [0-9]{2}-[0-9]{2}"
    choices = ["red", "green", "dark blue"]
    for i in range(3):
        regex = ask(client, max_tokens=30, seed=seed + i, extra_body={**NO_THINKING, "guided_regex": pattern})
        assert re.fullmatch(pattern, regex.choices[0].message.content)
        choice = client.completions.create(model=MODEL, prompt="Colour:", max_tokens=10, seed=seed + i,
                                           extra_body={"guided_choice": choices})
        assert choice.choices[0].text in choices
    # any object has unbounded strings and nesting: a push towards the closers (a valid one exists in every state of
    # the grammar: '"' ends a string or opens a leaf, '}' and ']' end containers) ends it within the budget whatever
    # the seed (seed 661400811 with '":' and '"}' alone opened an array and ran out of tokens inside its string)
    closers = []
    for text in ('"', '}', ']', '":', '"}', '"]'):
        tokens = httpx.post(f"{server}/tokenize", json={"prompt": text}).json()["tokens"]
        assert len(tokens) == 1, (text, tokens)
        closers.append(str(tokens[0]))
    any_object = ask(client, max_tokens=300, seed=seed, response_format={"type": "json_object"},
                     logit_bias={token: 10 for token in closers}, extra_body=NO_THINKING)
    assert isinstance(json.loads(any_object.choices[0].message.content), dict)


@pytest.mark.parametrize("body, param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "strin"}}, "guided_json"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"made_up_field": 1}, "made_up_field"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"thinking_token_budget": 4, **NO_THINKING}, "thinking_token_budget"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}}, "response_format"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "nope"}]}, "messages"),
])
def test_what_cannot_run_is_a_400_naming_the_field(server, body, param):
    response = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


def test_what_sglang_router_forwards_is_understood(server):
    """sglang-router 0.3.2 re-serialises every request with its own defaults (captured from the router) and drops
    fields it does not know, vLLM's guided_* among them: SGLang's names for structured output must work."""
    router_body = {"no_stop_trim": False, "ignore_eos": False, "continue_final_message": False,
                   "skip_special_tokens": True, "separate_reasoning": True, "stream_reasoning": True,
                   "return_hidden_states": False, "logprobs": False, "stream": False}
    for constraint, check in [({"regex": "[0-9]{4}"}, lambda text: re.fullmatch("[0-9]{4}", text)),
                              ({"json_schema": json.dumps(SCHEMAS[2])},
                               lambda text: jsonschema.validate(json.loads(text), SCHEMAS[2]) is None)]:
        response = httpx.post(f"{server}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 200,
            "chat_template_kwargs": {"enable_thinking": False}, **router_body, **constraint}, timeout=60)
        assert response.status_code == 200, response.text
        assert check(response.json()["choices"][0]["message"]["content"])
    completion = httpx.post(f"{server}/v1/completions", json={
        "model": MODEL, "prompt": "x", "max_tokens": 3, "stream": False, "echo": False, "no_stop_trim": False,
        "ignore_eos": False, "skip_special_tokens": True, "return_hidden_states": False}, timeout=60)
    assert completion.status_code == 200, completion.text


def test_a_grammar_past_llguidance_limits_is_the_clients_error(server):
    """A regex whose lexer grows past llguidance's limits fails its request with a 400 (when the first mask is
    built, or part-way), and the server goes on."""
    response = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 20, **NO_THINKING,
        "guided_regex": "(a|aa)*(b|bb){1000}[a-z]{10000}"}, timeout=120)
    assert response.status_code == 400, response.text
    again = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **NO_THINKING}, timeout=60)
    assert again.status_code == 200


def test_fields_clients_send_by_default_are_accepted(server):
    response = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "x"}],
        "max_tokens": 2, "store": False, "metadata": {"a": "b"}, "service_tier": "auto", "use_beam_search": False,
        "parallel_tool_calls": True, "user": "someone", "modalities": ["text"]}, timeout=60)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- sampling extensions, tokenizer endpoints


def test_logit_bias_min_tokens_and_stop_token_ids(client, server, seed):
    hello = httpx.post(f"{server}/tokenize", json={"prompt": "Hello"}).json()["tokens"][0]
    pushed = client.completions.create(model=MODEL, prompt="x", max_tokens=6, seed=seed, logit_bias={str(hello): 100},
                                       extra_body={"ignore_eos": True})
    assert pushed.choices[0].text == "Hello" * 6
    end = httpx.post(f"{server}/tokenize", json={"prompt": "<|im_end|>"}).json()["tokens"]
    floor = client.completions.create(model=MODEL, prompt="x", max_tokens=20, seed=seed, logit_bias={str(end[0]): 100},
                                      extra_body={"min_tokens": 7})
    assert floor.usage.completion_tokens == 8 and floor.choices[0].finish_reason == "stop"
    stopped = client.completions.create(model=MODEL, prompt="x", max_tokens=20, seed=seed,
                                        logit_bias={str(hello): 100}, extra_body={"stop_token_ids": [hello]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].text == ""
    capped = client.completions.create(model=MODEL, prompt="x", seed=seed, max_tokens=50,
                                       extra_body={"max_completion_tokens": 3, "ignore_eos": True})
    assert capped.usage.completion_tokens == 3


def test_echo_and_prompt_logprobs(client, server, seed):
    """A prompt's logprobs are the ones the model gave those tokens when it generated them (computed here by a
    prefill instead of decode steps: float32 rounding apart)."""
    prompt = httpx.post(f"{server}/tokenize", json={"prompt": "The weather today"}).json()["tokens"]
    # the generated tokens are known exactly whatever this CPU's rounding makes the model prefer: logit_bias keeps
    # every draw among three one-token words (logprobs stay the model's own, unbiased), read back by their text
    words = {word: httpx.post(f"{server}/tokenize", json={"prompt": word}).json()["tokens"]
             for word in (" sunny", " cold", " tomorrow")}
    assert all(len(ids) == 1 for ids in words.values())
    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                          logit_bias={str(ids[0]): 100 for ids in words.values()},
                                          extra_body={"ignore_eos": True})
    continuation = [words[text][0] for text in generated.choices[0].logprobs.tokens]
    assert len(continuation) == 4
    full = prompt + continuation
    echoed = client.completions.create(model=MODEL, prompt=full, max_tokens=1, temperature=0, echo=True, logprobs=2,
                                       extra_body={"prompt_logprobs": 2, "ignore_eos": True})
    choice = echoed.choices[0]
    prompt_text = httpx.post(f"{server}/detokenize", json={"tokens": full}).json()["prompt"]
    assert choice.text.startswith(prompt_text) and len(choice.logprobs.tokens) == len(full) + 1
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    scored = choice.model_extra["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(full)
    for position, token in enumerate(full[1:], start=1):
        assert str(token) in scored[position]
        assert scored[position][str(token)]["logprob"] == pytest.approx(choice.logprobs.token_logprobs[position])
    for i, logprob in enumerate(generated.choices[0].logprobs.token_logprobs):
        assert choice.logprobs.token_logprobs[len(prompt) + i] == pytest.approx(logprob, abs=2e-3)
    streamed = list(client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3, stream=True,
                                              echo=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices).startswith("Hello there")
    chat = ask(client, max_tokens=2, extra_body={**NO_THINKING, "prompt_logprobs": 0})
    rendered = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "Hello"}],
                                                      **NO_THINKING}).json()["tokens"]
    assert [int(next(iter(d))) if len(d) == 1 else None for d in chat.model_extra["prompt_logprobs"][1:]] == \
        rendered[1:]


def test_continuous_usage_stats(client):
    chunks = list(client.completions.create(model=MODEL, prompt="x", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True, "continuous_usage_stats": True},
                                            extra_body={"ignore_eos": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and counts == sorted(counts) and counts[-1] == 5
    assert chunks[-1].choices == []  # the closing usage chunk


def test_tokenize_and_detokenize(server):
    out = httpx.post(f"{server}/tokenize", json={"prompt": "Hello, world!", "return_token_strs": True}).json()
    assert out["tokens"] == [9707, 11, 1879, 0] and out["count"] == 4 and out["max_model_len"] == 1024
    assert out["token_strs"] == ["Hello", ",", "Ġworld", "!"]
    assert httpx.post(f"{server}/detokenize", json={"tokens": out["tokens"]}).json() == {"prompt": "Hello, world!"}
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    text = httpx.post(f"{server}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert httpx.post(f"{server}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{server}/tokenize", json={}).status_code == 400
