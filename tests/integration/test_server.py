"""A real `mili serve` process on 127.0.0.1, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from mili.checkpoints import cached_checkpoint
from tests.servers import ROOT, mili_serve

API_KEY = "test-key"
MODEL = "tiny"
MODEL_FOLDER = "tiny-tied-gqa2-d64"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with mili_serve(["--model", str(cached_checkpoint(MODEL_FOLDER)), "--api-key", API_KEY,
                     "--served-model-name", MODEL, "--max-num-seqs", "16", "--max-queue", "48",
                     "--kv-cache-memory", "2e8", "--max-model-len", "160"], "server-test") as (url, saw_loading):
        assert saw_loading, "/health should answer 503 while the model loads"
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def test_models_and_status(client: openai.OpenAI, server: str):
    assert [m.id for m in client.models.list().data] == [MODEL]
    status = httpx.get(f"{server}/status").json()
    assert status["model"] == MODEL and status["model_loaded"] and status["dtype"] == "float32"
    assert (status["weights"], status["weight_group_size"]) == ("dense", None)  # auto: the float32 checkpoint
    for path in ("/server_info", "/get_server_info", "/model_info", "/get_model_info"):  # what routers read
        info = httpx.get(f"{server}{path}").json()
        assert (info["served_model_name"], info["model_path"]) == (MODEL, str(cached_checkpoint(MODEL_FOLDER)))


def test_completion_with_n_stop_logprobs_and_usage(client: openai.OpenAI):
    out = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, n=2,
                                    temperature=0.8, seed=7, logprobs=3, extra_body={"ignore_eos": True})
    assert len(out.choices) == 2 and {c.index for c in out.choices} == {0, 1}
    assert out.usage.completion_tokens == 24 and out.usage.prompt_tokens == 4
    assert len(out.choices[0].logprobs.token_logprobs) == 12
    assert all(len(top) == 3 for top in out.choices[0].logprobs.top_logprobs)
    again = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12, n=2,
                                      temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in out.choices]  # seeds reproduce
    greedy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    text = greedy.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = client.completions.create(model=MODEL, prompt="Hello", max_tokens=16, temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:text.find(stop)]


def test_cached_tokens_are_reported(client: openai.OpenAI):
    prompt = "Once upon a time " * 12
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert out.usage.prompt_tokens_details.cached_tokens >= 32


def test_streaming_completion_and_chat(client: openai.OpenAI):
    chunks = list(client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=8, stream=True,
                                            temperature=0, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 16
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    whole = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]

    messages = [{"role": "user", "content": "Say hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body={"enable_thinking": False})
    assert reply.choices[0].message.role == "assistant" and reply.usage.total_tokens > 10
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True,
        extra_body={"enable_thinking": False}) if c.choices)
    assert streamed == reply.choices[0].message.content


def test_native_generate(server: str):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
    out = httpx.post(f"{server}/generate", json=body, headers=headers, timeout=120).json()
    assert set(out) == {"generated_text", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert out["prompt_tokens"] == 1 and out["completion_tokens"] <= 5
    with httpx.stream("POST", f"{server}/generate", json={**body, "stream": True}, headers=headers,
                      timeout=120) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["generated_text"] == out["generated_text"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "prompt": "x", "max_tokens": "lots"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "word " * 200}, 400, "prompt"),  # longer than --max-model-len 160
])
def test_bad_completion_requests(server: str, body, status, param):
    response = httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("content, headers, status", [
    (b'{"model": "tiny", "messages": [', {}, 400),                                      # invalid JSON
    (json.dumps({"model": MODEL, "messages": []}).encode(), {}, 400),                  # no messages
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), {}, 400),
    (b"x" * (5 << 20), {}, 413),                                                        # oversize body
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).encode(),
     {"Authorization": "Bearer wrong"}, 401),
])
def test_bad_chat_requests(server: str, content, headers, status):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    response = httpx.post(f"{server}/v1/chat/completions", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_32_streaming_clients_some_leaving_early(server: str):
    async def one(i: int) -> int:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt=f"Client {i} says", max_tokens=20,
                                                 stream=True, temperature=0.7, extra_body={"ignore_eos": True})
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
            if i % 4 == 0 and text:
                await stream.close()  # disconnect mid-stream
                return -1
        await client.close()
        assert finish == "length"
        return len(text)

    async def main() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert sum(r == -1 for r in results) == 8 and all(r > 0 for r in results if r != -1)
    deadline = time.monotonic() + 30
    while True:  # aborted requests are released by the engine between steps
        status = httpx.get(f"{server}/status").json()
        if status["running"] == status["waiting"] == 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["kv_blocks_used"] == status["kv_blocks_cached"], "blocks leaked outside the prefix cache"
    metrics = httpx.get(f"{server}/metrics").text
    finished = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("mili_requests_finished_total{"))
    aborted = float(next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("mili_requests_aborted_total")))
    assert aborted >= 8 and finished >= 24
    assert "mili_time_to_first_token_seconds_bucket" in metrics


def test_a_body_that_is_not_json_is_told_how_to_send_it(server: str):
    response = httpx.post(f"{server}/generate", content=b"prompt=Hello",
                          headers={"Authorization": f"Bearer {API_KEY}",
                                   "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    assert "Content-Type: application/json" in response.json()["error"]["message"]


SCHEMATHESIS_SEED = int(os.environ.get("MILI_TEST_SEED", 20261123))


@pytest.fixture
def short_context_server() -> Iterator[str]:
    """The same server with a 32-token context: a fuzzed request that asks for no max_tokens generates up to the
    context, and ~800 of them at 160 tokens took two minutes of generation that tests nothing more."""
    with mili_serve(["--model", str(cached_checkpoint(MODEL_FOLDER)), "--api-key", API_KEY,
                     "--served-model-name", MODEL, "--max-num-seqs", "16", "--max-queue", "48",
                     "--kv-cache-memory", "2e8", "--max-model-len", "32"], "fuzz-test") as (url, _):
        yield url


def test_fuzzing_the_openapi_schema_finds_no_server_error(short_context_server: str):
    """schemathesis generates valid and invalid requests for every operation; none may get a 5xx.
    Replay another seed with MILI_TEST_SEED=<seed>."""
    server = short_context_server
    print(f"schemathesis seed {SCHEMATHESIS_SEED}")
    result = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "15", "--header", f"Authorization: Bearer {API_KEY}", "--request-timeout", "120",
         "--seed", str(SCHEMATHESIS_SEED)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert httpx.get(f"{server}/health").status_code == 200


def test_streamed_logprobs_equal_plain_ones_token_for_token(client: openai.OpenAI):
    """Tokens held back (a stop-string prefix, half a UTF-8 character) still stream their logprobs, once each,
    in order: the stream's tokens, logprobs, alternatives and offsets equal the plain response's."""
    base = dict(model=MODEL, max_tokens=24, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    compared = 0
    for prompt in ("你好，世界", "The quick brown fox", "😀 emoji 😀"):
        free = client.completions.create(prompt=prompt, **base).choices[0]
        text = free.text
        stop = text[len(text) // 3:len(text) // 3 + 2] + "\u2603never"  # its start appears; it never completes
        plain = client.completions.create(prompt=prompt, stop=[stop], **base).choices[0]
        tokens, token_logprobs, top, offsets, streamed_text = [], [], [], [], ""
        for chunk in client.completions.create(prompt=prompt, stop=[stop], stream=True, **base):
            choice = chunk.choices[0]
            streamed_text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                top += choice.logprobs.top_logprobs
                offsets += choice.logprobs.text_offset
        assert streamed_text == plain.text
        assert tokens == plain.logprobs.tokens and len(tokens) == 24
        assert token_logprobs == plain.logprobs.token_logprobs
        assert top == plain.logprobs.top_logprobs and all(len(t) == 2 for t in top)
        assert offsets == plain.logprobs.text_offset == sorted(offsets)
        compared += len(tokens)
    assert compared == 72


def test_a_chat_without_max_tokens_and_a_hostile_request_leave_the_server_serving(client: openai.OpenAI, server: str):
    """Two reproduced faults: a chat without max_tokens could outgrow the KV pool and hang everyone;
    temperature 1e-308 with min_p killed the engine (503 until restarted)."""
    hostile = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=1e-308,
                                        extra_body={"min_p": 0.1})
    assert hostile.usage.completion_tokens >= 1
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           extra_body={"ignore_eos": True, "enable_thinking": False}, timeout=300)
    status = httpx.get(f"{server}/status").json()
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == status["max_model_len"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_requests_beyond_the_queue_limit_get_429(server: str):
    async def one(client: httpx.AsyncClient) -> int:
        response = await client.post(f"{server}/v1/completions", json={
            "model": MODEL, "prompt": "Queue", "max_tokens": 6, "ignore_eos": True}, timeout=300)
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "rate_limit_error"
        return response.status_code

    async def main() -> list[int]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=80)) as client:
            return await asyncio.gather(*(one(client) for _ in range(70)))

    codes = asyncio.run(main())
    assert set(codes) == {200, 429} and codes.count(200) >= 48, codes
