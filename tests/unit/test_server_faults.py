"""The server's failure paths, on a real uvicorn (in this process) over the fake model (tests/engine_fakes.py):
no compile, so every fault can be forced and timed.

- a failure mid-stream ends the stream with an OpenAI-style error event, then [DONE];
- hostile sampling values never give a 5xx, never hang, and leave the engine serving;
- a non-streaming client that disconnects gets its request aborted at once;
- a long request on a tiny KV pool finishes instead of hanging everyone;
- SIGTERM or SIGINT (even when SIGINT was ignored, as for a server started in the background) drains, ends
  open streams with an error event and [DONE], and `serve` returns 0; a crashed engine loop makes /health
  503 and `serve` return 1;
- /status reports the run dtype and weight format `serve` resolved before the compile.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from max.dtype import DType

from mili.engine.async_engine import AsyncEngine
from mili.engine.config import EngineConfig
from mili.config import ModelConfig
from mili.engine.engine import Engine
from mili.engine.model_runner import runner_spec
from mili.model.packed_linear import WeightFormat
from mili.model_source import ModelSource
from mili.server import serve as serve_module
from mili.server.app import create_app
from mili.server.demo import DEMO_CONFIG
from mili.server.startup import KvCachePlan
from mili.server.state import ServerSettings, ServerState
from tests.engine_fakes import FakeRunner, FakeTokenizer, reference_next_token
from tests.servers import free_port, wait_healthy

MODEL = "fake"


def fake_engine(num_blocks: int = 64, step_delay_s: float = 0.0, **config) -> Engine:
    runner = FakeRunner(num_blocks, block_size=4, max_positions=num_blocks * 4)
    runner.step_delay_s = step_delay_s
    return Engine(runner, FakeTokenizer(), EngineConfig(**config))


@contextmanager
def running_server(engine: Engine) -> Iterator[tuple[str, ServerState]]:
    state = ServerState(ServerSettings(model_name=MODEL))
    state.attach(AsyncEngine(engine))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield url, state
    finally:
        state.engine.stop_blocking()
        server.should_exit = True
        thread.join(10)


def sse_events(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def completion(url: str, timeout: float = 30, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "abc", **body}, timeout=timeout)


def assert_still_serving(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    ok = completion(url, max_tokens=3, temperature=0)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_failure_mid_stream_ends_with_an_error_event_then_done():
    engine = fake_engine(step_delay_s=0.05)  # each token reaches the client before the next step
    with running_server(engine) as (url, _):
        engine.runner.fail_at_step = engine.runner.steps + 4  # prefill, two decodes, then the model fails
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "model": MODEL, "prompt": "abc", "max_tokens": 20, "stream": True, "ignore_eos": True,
                "temperature": 0}, timeout=30) as response:
            events = sse_events(response)
        assert response.status_code == 200
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "injected model failure" in error["message"] and error["type"] == "server_error"
        assert sum("choices" in json.loads(e) for e in events[:-2]) == 3  # the tokens before the failure
        assert_still_serving(url)


def test_tokens_a_slow_reader_had_not_read_still_stream_before_the_error():
    """With no delay the failure can reach the server together with unread tokens (merged into one output):
    the tokens go out first, then the error event and [DONE]."""
    engine = fake_engine()
    with running_server(engine) as (url, _):
        engine.runner.fail_at_step = engine.runner.steps + 4  # three tokens, then the model fails
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "model": MODEL, "prompt": "abc", "max_tokens": 20, "stream": True, "ignore_eos": True,
                "temperature": 0}, timeout=30) as response:
            events = sse_events(response)
    assert response.status_code == 200 and events[-1] == "[DONE]" and "error" in json.loads(events[-2])
    streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    context, tokens = [0, 1, 2], []
    for _ in range(3):
        tokens.append(reference_next_token(context))
        context.append(tokens[-1])
    assert streamed == FakeTokenizer().decode(tokens)


EDGE_VALUES = [0, -0.0, 5e-324, 1e-308, 2.2e-308, 1e-5, 1e308, -1, 1e100, "NaN", "nan", "Infinity", "-Infinity",
               "1e-400", True, None, "", [], {}]
SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "max_tokens", "n", "seed", "logprobs"]


def test_hostile_sampling_values_never_get_a_5xx_nor_stop_the_engine():
    """Every edge value in every sampling field, plus the combination that used to kill the engine."""
    with running_server(fake_engine()) as (url, _):
        bodies = [{field: value} for field in SAMPLING_FIELDS for value in EDGE_VALUES]
        bodies += [{"temperature": 1e-308, "min_p": 0.1}, {"temperature": 5e-324, "top_p": 1e-300, "top_k": 1},
                   {"temperature": 100, "repetition_penalty": 1e-300, "logprobs": 5},
                   {"temperature": 1e-5, "frequency_penalty": 2, "presence_penalty": -2, "min_p": 1}]
        statuses = {}
        for body in bodies:
            started = time.monotonic()
            response = completion(url, timeout=30, max_tokens=body.pop("max_tokens", 4), **body)
            assert time.monotonic() - started < 10, f"{body} took too long"
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["message"]
            statuses[json.dumps(body)] = response.status_code
        assert statuses['{"temperature": 1e-308, "min_p": 0.1}'] == 200
        assert sum(code == 200 for code in statuses.values()) >= 40 and sum(code == 400 for code in statuses.values()) >= 40
        assert_still_serving(url)


def test_a_client_that_disconnects_from_a_plain_request_aborts_it():
    engine = fake_engine(step_delay_s=0.02)
    with running_server(engine) as (url, state):
        with pytest.raises(httpx.ReadTimeout):  # 250 tokens would take 5 s; the client gives up after 0.5 s
            completion(url, timeout=0.5, max_tokens=250, ignore_eos=True)
        deadline = time.monotonic() + 3
        while state.in_flight or engine.has_unfinished():
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.05)
        assert engine.runner.steps < 150
        assert_still_serving(url)


def test_a_request_as_long_as_the_whole_pool_finishes_and_the_next_one_is_served():
    """The reproduced hang: --kv-cache-memory of a few blocks and one long completion made every request hang."""
    engine = fake_engine(num_blocks=10)  # 40 tokens of KV: the context is capped there
    with running_server(engine) as (url, _):
        status = httpx.get(f"{url}/status").json()
        assert status["max_model_len"] == 40
        too_long = completion(url, max_tokens=3500, ignore_eos=True)
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
        results = []
        threads = [threading.Thread(target=lambda: results.append(completion(url, max_tokens=37, ignore_eos=True,
                                                                             temperature=0)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in results)
        assert_still_serving(url)


def serve_with_client(monkeypatch, engine: Engine, tmp_path, grace_s: float, client,
                      weights: WeightFormat | None = None) -> tuple[int, float]:
    """Runs `mili serve` itself (signals, drain, exit code) in this thread, with the fake engine in place of
    the compiled model and a plan for the demo model's shape in bfloat16 with `weights`, while `client(url)`
    runs on another thread; returns serve's exit code and seconds."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    spec = runner_spec(ModelConfig.from_dict(DEMO_CONFIG), dtype=DType.bfloat16, block_size=4, weights=weights)
    source = ModelSource(model_dir, ModelConfig.from_dict(DEMO_CONFIG))
    monkeypatch.setattr(serve_module, "open_model", lambda model, tokenizer: (source, MODEL))
    monkeypatch.setattr(serve_module, "plan_kv_cache_blocks",
                        lambda *args, **kwargs: KvCachePlan(spec, engine.pool.num_blocks))
    monkeypatch.setattr(serve_module.Engine, "from_pretrained", classmethod(lambda cls, *args, **kwargs: engine))
    port = free_port()
    thread = threading.Thread(target=client, args=(f"http://127.0.0.1:{port}",))
    thread.start()
    started = time.monotonic()
    code = serve_module.serve(serve_module.ServeOptions(model=None, port=port, shutdown_grace_s=grace_s))
    thread.join(10)
    return code, time.monotonic() - started


def stream_then_signal(sig: signal.Signals, max_tokens: int, events: list[str], during_drain: dict[str, int]):
    """A client for serve_with_client: streams a completion, sends `sig` to this process at its third event, then
    records what /health and a new request answer while the server drains."""
    def client(url: str) -> None:
        wait_healthy(url)
        with httpx.stream("POST", f"{url}/v1/completions", json={
                "model": MODEL, "prompt": "abc", "max_tokens": max_tokens, "stream": True, "ignore_eos": True},
                timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(os.getpid(), sig)
                        time.sleep(0.1)
                        during_drain["health"] = httpx.get(f"{url}/health").status_code
                        during_drain["new request"] = completion(url, max_tokens=2).status_code
    return client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_then_ends_open_streams_with_an_error_and_done(monkeypatch, tmp_path, sig):
    engine = fake_engine(step_delay_s=0.02)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell's background job starts
    events: list[str] = []
    during_drain: dict[str, int] = {}
    try:
        code, seconds = serve_with_client(monkeypatch, engine, tmp_path, 0.3,
                                          stream_then_signal(sig, 250, events, during_drain))
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 0 and seconds < 20
    assert during_drain == {"health": 503, "new request": 503}
    assert events[-1] == "[DONE]" and "shut down" in json.loads(events[-2])["error"]["message"]
    assert not engine.has_unfinished() and not engine._requests


def test_sigterm_lets_requests_in_flight_finish_within_the_grace_period(monkeypatch, tmp_path):
    """What `docker stop` and a Kubernetes pod deletion rely on: SIGTERM refuses new work (/health 503, new
    requests 503) while a stream already running finishes whole, and serve exits 0 as soon as it has."""
    engine = fake_engine(step_delay_s=0.02)
    events: list[str] = []
    during_drain: dict[str, int] = {}
    code, seconds = serve_with_client(monkeypatch, engine, tmp_path, 20.0,
                                      stream_then_signal(signal.SIGTERM, 60, events, during_drain))
    assert code == 0 and seconds < 15  # it left once the stream was done, not at the end of the grace period
    assert during_drain == {"health": 503, "new request": 503}
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    assert sum(len(c["choices"][0]["text"]) > 0 for c in chunks) == 60  # the fake tokenizer: a character a token
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_crashed_engine_loop_turns_health_503():
    engine = fake_engine()
    with running_server(engine) as (url, _):
        engine.step = lambda: (_ for _ in ()).throw(MemoryError("the loop itself broke"))
        response = completion(url, max_tokens=4)
        assert response.status_code == 503 and "crashed" in response.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        assert completion(url, max_tokens=4).status_code == 503


def test_a_crashed_engine_loop_makes_serve_exit_non_zero(monkeypatch, tmp_path):
    engine = fake_engine()
    statuses: list[int] = []

    def client(url: str) -> None:
        wait_healthy(url)
        engine.step = lambda: (_ for _ in ()).throw(MemoryError("the loop itself broke"))
        statuses.append(completion(url, max_tokens=4).status_code)

    code, seconds = serve_with_client(monkeypatch, engine, tmp_path, 1.0, client)
    assert code == 1 and statuses == [503] and seconds < 30


@pytest.mark.parametrize("weights, reported", [(WeightFormat.INT8, ("int8", 32, "bfloat16")),
                                               (WeightFormat.INT4, ("int4", 32, "int8")),
                                               (None, ("bf16", None, "bfloat16"))])
def test_status_reports_the_resolved_dtype_and_weight_format(monkeypatch, tmp_path, weights, reported):
    engine = fake_engine()
    statuses: list[dict] = []

    def client(url: str) -> None:
        wait_healthy(url)
        statuses.append(httpx.get(f"{url}/status").json())
        os.kill(os.getpid(), signal.SIGTERM)

    code, _ = serve_with_client(monkeypatch, engine, tmp_path, 1.0, client, weights)
    assert code == 0
    (status,) = statuses
    assert (status["dtype"], status["weights"], status["weight_group_size"], status["activations"]) == (
        "bfloat16", *reported)


def test_unset_sampling_fields_take_the_checkpoints_defaults():
    """generation_config.json's settings apply to what a request leaves unset, never to what it sends."""
    engine = fake_engine()
    engine.sampling_defaults = {"temperature": 0.9, "top_k": 1}  # top_k 1: every draw is the argmax
    with running_server(engine) as (url, _):
        greedy = completion(url, max_tokens=12, temperature=0, ignore_eos=True).json()["choices"][0]["text"]
        defaulted = completion(url, max_tokens=12, seed=3, ignore_eos=True).json()["choices"][0]["text"]
        explicit = [completion(url, max_tokens=12, seed=s, top_k=0, temperature=2.0, ignore_eos=True)
                    .json()["choices"][0]["text"] for s in range(4)]
    assert defaulted == greedy
    assert any(text != greedy for text in explicit)  # the client's own top_k / temperature were used


def test_cancelling_a_reader_of_several_streams_cancels_it_and_closes_them():
    """The old merge swallowed CancelledError while cleaning up; a cancelled handler must end cancelled,
    with every stream closed (which aborts its request)."""
    from mili.server.generation import merged

    closed: list[int] = []

    async def stream(index: int):
        try:
            while True:
                await asyncio.sleep(0.01)
                yield index
        finally:
            closed.append(index)

    async def main() -> None:
        async def read() -> None:
            async for _ in merged([stream(0), stream(1)]):
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(main())
    assert sorted(closed) == [0, 1]


def test_status_and_metrics_count_speculation():
    from mili.engine.speculative import SpeculativeConfig

    engine = fake_engine(speculative=SpeculativeConfig("ngram", 4, ngram_min=1, max_batch_size=8))
    with running_server(engine) as (url, _):
        assert completion(url, prompt="abcabcabcabcabc", max_tokens=30, temperature=0, ignore_eos=True).status_code == 200
        assert completion(url, prompt="abcabcabc", max_tokens=5, speculative=False).status_code == 200
        status = httpx.get(f"{url}/status").json()["speculative"]
        metrics = httpx.get(f"{url}/metrics").text
    assert status["method"] == "ngram" and status["num_speculative_tokens"] == 4
    assert status["proposed_tokens"] > 0 and status["verify_steps"] > 0
    assert 0 <= status["accepted_tokens"] <= status["proposed_tokens"]
    assert f"mili_spec_decode_num_draft_tokens_total {float(status['proposed_tokens'])}" in metrics
    assert f"mili_spec_decode_num_accepted_tokens_total {float(status['accepted_tokens'])}" in metrics
    assert "mili_spec_decode_mean_accepted_length" in metrics


def test_status_says_speculation_is_off_by_default():
    with running_server(fake_engine()) as (url, _):
        assert httpx.get(f"{url}/status").json()["speculative"] is None
        assert "mili_spec_decode" not in httpx.get(f"{url}/metrics").text
