"""The HTTP API: OpenAI-compatible completions and chat completions (with SSE streaming), MILI's native
/generate, and /health, /status, /v1/models, /metrics. Nothing a client sends yields a 500: bad input is
a 4xx with an OpenAI-style error body naming the parameter; a failure inside the engine fails that request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mili.engine.async_engine import AsyncEngine, EngineDeadError
from mili.engine.engine import CompletionOutput, RequestError, RequestOutput
from mili.engine.sampling_params import SamplingParams
from mili.server.metrics import ServerMetrics
from mili.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingFields

log = logging.getLogger("mili.server")
FINISHED = -1


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


@dataclass
class ServerSettings:
    model_name: str
    device: str = "cpu"
    dtype: str = "float32"
    api_key: str | None = None
    max_queue: int = 256               # requests in flight beyond this get 429
    max_body_bytes: int = 4 << 20
    compile_s: float | None = None


@dataclass
class ServerState:
    settings: ServerSettings
    engine: AsyncEngine | None = None  # None while the model loads
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    requests_seen: int = 0
    prompt_tokens_seen: int = 0
    cached_tokens_seen: int = 0

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.metrics.watch(engine.engine)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="MILI", version="0.1.0", description="OpenAI-compatible serving of Qwen3 on MAX")
    app.state.mili = state
    settings = state.settings

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        if not location and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(400, "the request body must be a JSON object, sent with "
                                       "'Content-Type: application/json'")
        param = location[0] if location else None
        where = ".".join(location)
        message = first.get("msg", "invalid value").removeprefix("Value error, ")
        return error_response(400, f"{where}: {message}" if where else message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # a bug of ours, never the client's
        log.exception("unexpected error")
        return error_response(500, f"internal error: {exc}", kind="server_error")

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if settings.api_key and (path.startswith("/v1/") or path == "/generate"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      kind="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(413, f"the request body is larger than {settings.max_body_bytes} bytes")
        return await call_next(request)

    def engine() -> AsyncEngine:
        if state.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", kind="service_unavailable")
        if not state.engine.is_running:
            raise APIError(503, "the engine has stopped", kind="service_unavailable")
        return state.engine

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{settings.model_name}'",
                           param="model", kind="not_found_error", code="model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = state.engine is not None and state.engine.is_running
        return JSONResponse({"status": "ok" if ready else "loading", "model_loaded": ready}, 200 if ready else 503)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        loaded = state.engine is not None and state.engine.is_running
        snapshot: dict[str, Any] = {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 0,
                                    "kv_blocks_cached": 0}
        if loaded:
            core = state.engine.engine

            def read() -> dict[str, Any]:  # on the engine thread: a consistent view between steps
                return {"running": core.num_running, "waiting": core.num_waiting, "kv_blocks_used": core.pool.num_used,
                        "kv_blocks_free": core.pool.num_free, "kv_blocks_cached": core.cache.usage().cached_blocks}

            snapshot = await state.engine.call(read)
        return {
            "model": settings.model_name, "device": settings.device, "dtype": settings.dtype,
            "model_loaded": loaded, "uptime_s": round(time.monotonic() - state.started, 1), **snapshot,
            "prefix_cache_hit_rate": state.cached_tokens_seen / state.prompt_tokens_seen
            if state.prompt_tokens_seen else 0.0,
            "requests_served": state.requests_seen,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "mili"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ generation plumbing

    async def run(prompt: str | list[int], params: SamplingParams, salt: str | None) -> AsyncIterator[RequestOutput]:
        """One engine request's outputs; counts it against the queue limit and records its metrics."""
        core = engine()
        if state.in_flight >= settings.max_queue:
            state.metrics.rejected.inc()
            raise APIError(429, f"the server has {state.in_flight} requests in flight (limit {settings.max_queue}); "
                                "retry later", kind="rate_limit_error")
        state.in_flight += 1
        finished = False
        try:
            try:
                stream = core.generate(prompt, params, salt=salt)
                async for out in stream:
                    if out.error:
                        raise APIError(500, out.error, kind="server_error")
                    finished = out.finished
                    if finished:
                        record(out)
                    yield out
            except RequestError as exc:
                raise APIError(400, str(exc), param="prompt") from None
            except EngineDeadError as exc:
                raise APIError(503, str(exc), kind="service_unavailable") from None
        finally:
            state.in_flight -= 1
            if not finished:
                state.metrics.aborted.inc()

    def record(out: RequestOutput) -> None:
        state.metrics.observe(out)
        state.requests_seen += 1
        state.prompt_tokens_seen += len(out.prompt_token_ids)
        state.cached_tokens_seen += out.metrics.cached_tokens
        m = out.metrics
        generated = sum(len(c.token_ids) for c in out.outputs)
        rate = generated / m.e2e_s if m.e2e_s else 0.0
        log.info("request %s: %d prompt tokens (%d cached), %d generated, TTFT %s, %.1f tokens/s, finish %s",
                 out.request_id, len(out.prompt_token_ids), m.cached_tokens, generated,
                 f"{m.ttft_s * 1e3:.0f} ms" if m.ttft_s is not None else "-", rate,
                 ",".join(c.finish_reason or "-" for c in out.outputs))

    def max_tokens_for(prompt_len: int, requested: int | None, default: int | None) -> int:
        room = state.engine.engine.max_model_len - prompt_len if state.engine else 0
        if requested is not None and requested > room:
            raise APIError(400, f"max_tokens is {requested}, but the prompt ({prompt_len} tokens) leaves room "
                                f"for {room} in this model's {room + prompt_len}-token context", param="max_tokens")
        value = requested if requested is not None else (default if default is not None else room)
        return max(1, min(value, room))

    def params_for(body: SamplingFields, prompt: str | list[int], requested: int | None, default: int | None,
                   logprobs: int | None) -> tuple[SamplingParams, str | list[int]]:
        core = engine().engine
        ids = core.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) >= core.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {core.max_model_len}",
                           param="prompt")
        try:
            params = body.sampling_params(max_tokens_for(len(ids), requested, default), logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return params, ids

    async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several requests as they come: (which stream, output)."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
            try:
                async for out in stream:
                    await queue.put((index, out))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                await queue.put((index, exc))
            finally:
                await queue.put((index, done))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        remaining = len(tasks)
        try:
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:  # let each stream's cleanup (abort) run before we go
                try:
                    await task
                except BaseException:  # noqa: BLE001
                    pass

    def usage(finals: list[RequestOutput]) -> dict[str, Any]:
        prompt = sum(len(o.prompt_token_ids) for o in finals)
        completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.metrics.cached_tokens for o in finals)}}

    def sse(payload: dict[str, Any] | str) -> str:
        return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

    async def first_then_rest(outputs: AsyncIterator[tuple[int, RequestOutput]]):
        """Pulls the first output before the response starts, so early errors become proper 4xx/5xx."""
        try:
            first = await outputs.__anext__()
        except StopAsyncIteration:
            first = None
        return first, outputs

    async def last_output(first: tuple[int, RequestOutput] | None,
                          outputs: AsyncIterator[tuple[int, RequestOutput]]) -> RequestOutput:
        """The final output of a single-request stream (non-streaming responses)."""
        final = None
        item = first
        while item is not None:
            final = item[1]
            item = await anext(outputs, None)
        if final is None or not final.finished:
            raise APIError(500, "the request ended without a result", kind="server_error")
        return final

    # ------------------------------------------------------------------ endpoints

    def completion_logprobs(tokenizer: Any, completion: CompletionOutput, start: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        items = completion.logprobs[start:]
        tokens = [tokenizer.decode([s.token]) for s in items]
        return {"tokens": tokens, "token_logprobs": [s.logprob for s in items],
                "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in s.top_logprobs} for s in items],
                "text_offset": []}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        check_model(body.model)
        core = engine().engine
        prepared = [params_for(body, p, body.max_tokens, 16, body.logprobs) for p in body.prompts()]
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = [run(ids, params, body.cache_salt) for params, ids in prepared]
        n = body.n
        outputs = merged(streams)
        first, outputs = await first_then_rest(outputs)
        base = {"id": request_id, "object": "text_completion", "created": created, "model": settings.model_name}

        if not body.stream:
            finals: dict[int, RequestOutput] = {}
            item = first
            while item is not None:
                index, out = item
                if out.finished:
                    finals[index] = out
                item = await anext(outputs, None)
            ordered = [finals[i] for i in range(len(streams))]
            choices = [{"index": i * n + c.index, "text": c.text, "finish_reason": c.finish_reason,
                        "logprobs": completion_logprobs(core.tokenizer, c, 0)}
                       for i, out in enumerate(ordered) for c in out.outputs]
            return JSONResponse({**base, "choices": choices, "usage": usage(ordered)})

        async def events() -> AsyncIterator[str]:
            sent: dict[tuple[int, int], int] = {}  # tokens streamed per (prompt, choice); FINISHED when done
            finals: list[RequestOutput] = []
            item = first
            try:
                while item is not None:
                    index, out = item
                    for c in out.outputs:
                        key = (index, c.index)
                        if sent.get(key, 0) == FINISHED:
                            continue
                        if c.delta or c.finish_reason:
                            yield sse({**base, "choices": [{
                                "index": index * n + c.index, "text": c.delta, "finish_reason": c.finish_reason,
                                "logprobs": completion_logprobs(core.tokenizer, c, sent.get(key, 0))}]})
                        sent[key] = FINISHED if c.finish_reason else len(c.token_ids)
                    if out.finished:
                        finals.append(out)
                    item = await anext(outputs, None)
            finally:
                await outputs.aclose()  # a client gone mid-stream: abort its requests now
            if body.stream_options and body.stream_options.include_usage:
                yield sse({**base, "choices": [], "usage": usage(finals)})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def chat_logprobs(tokenizer: Any, completion: CompletionOutput, start: int) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = tokenizer.decode([token])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs]}
                            for s in completion.logprobs[start:]]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        check_model(body.model)
        core = engine().engine
        try:
            messages = [m.as_template_message() for m in body.messages]
            prompt = core.tokenizer.apply_chat_template(messages, enable_thinking=body.thinking)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params, ids = params_for(body, prompt, requested, None, logprobs)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = merged([run(ids, params, body.cache_salt)])
        first, outputs = await first_then_rest(outputs)
        base = {"id": request_id, "created": created, "model": settings.model_name}

        if not body.stream:
            final = await last_output(first, outputs)
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": chat_logprobs(core.tokenizer, c, 0), "finish_reason": c.finish_reason}
                       for c in final.outputs]
            return JSONResponse({**base, "object": "chat.completion", "choices": choices, "usage": usage([final])})

        async def events() -> AsyncIterator[str]:
            chunk = {**base, "object": "chat.completion.chunk"}
            for i in range(body.n):
                yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            sent: dict[int, int] = {}  # tokens streamed per choice; FINISHED when done
            final = None
            item = first
            try:
                while item is not None:
                    out = item[1]
                    for c in out.outputs:
                        if sent.get(c.index, 0) == FINISHED:
                            continue
                        if c.delta or c.finish_reason:
                            delta = {"content": c.delta} if c.delta else {}
                            yield sse({**chunk, "choices": [{
                                "index": c.index, "delta": delta, "finish_reason": c.finish_reason,
                                "logprobs": chat_logprobs(core.tokenizer, c, sent.get(c.index, 0))}]})
                        sent[c.index] = FINISHED if c.finish_reason else len(c.token_ids)
                    final = out
                    item = await anext(outputs, None)
            finally:
                await outputs.aclose()
            if body.stream_options and body.stream_options.include_usage and final is not None:
                yield sse({**chunk, "choices": [], "usage": usage([final])})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/generate")
    async def generate(body: GenerateRequest) -> Response:
        core = engine().engine
        ids = core.tokenizer.encode(body.prompt)
        if len(ids) >= core.max_model_len:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this model's context is {core.max_model_len}",
                           param="prompt")
        max_tokens_for(len(ids), body.max_tokens, None)
        outputs = merged([run(ids, body.sampling_params(), None)])
        first, outputs = await first_then_rest(outputs)

        def result(out: RequestOutput) -> dict[str, Any]:
            c = out.outputs[0]
            return {"generated_text": c.text, "prompt_tokens": len(out.prompt_token_ids),
                    "completion_tokens": len(c.token_ids), "finish_reason": c.finish_reason}

        if not body.stream:
            return JSONResponse(result(await last_output(first, outputs)))

        async def events() -> AsyncIterator[str]:
            item = first
            try:
                while item is not None:
                    out = item[1]
                    delta = out.outputs[0].delta
                    if delta:
                        yield sse({"text": delta})
                    if out.finished:
                        yield sse(result(out))
                    item = await anext(outputs, None)
            finally:
                await outputs.aclose()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
