"""The HTTP API: OpenAI-compatible completions and chat completions (with SSE streaming), MILI's native
/generate, and /health, /status, /v1/models, /metrics, /server_info and /model_info (for routers). Nothing a
client sends yields a 500: bad input is a 4xx with an OpenAI-style error body naming the parameter; a failure
inside the engine fails that request (mid-stream: an error event, then [DONE]).

Each endpoint reads as: validate -> prepare (tokenize off the event loop, sampling parameters) -> run on
the engine -> format (mili/server/openai_format.py) as one JSON body or as SSE (mili/server/streaming.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mili.engine.outputs import RequestOutput
from mili.server import openai_format
from mili.server.chat import plan_chat, render_prompt
from mili.server.errors import APIError, bad_request, error_response, install_error_handlers
from mili.server.generation import final_outputs, first_output, merged, prepare, run, running_engine
from mili.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                                  StreamOptions, TokenizeRequest)
from mili.server.state import ServerState
from mili.server.streaming import ClientDisconnected, client_gone_response, event_stream, until_disconnected

GENERATE_DEFAULT_MAX_TOKENS = 128
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def openai_stream(first: tuple[int, RequestOutput] | None, outputs: AsyncIterator[tuple[int, RequestOutput]],
                  response: openai_format.Completions | openai_format.ChatCompletions,
                  options: StreamOptions | None) -> Response:
    """An OpenAI stream: usage after the last chunk with `include_usage`, in every chunk too with vLLM's
    `continuous_usage_stats`."""
    options = options or StreamOptions()
    chunks = response.chunks
    if options.continuous_usage_stats:
        def chunks(index: int, out: RequestOutput) -> Iterator[dict[str, Any]]:
            for chunk in response.chunks(index, out):
                yield {**chunk, "usage": response.usage_chunk()["usage"]}
    return event_stream(first, outputs, chunks,
                        lambda: [response.usage_chunk()] if options.include_usage else [])


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="MILI", version="0.1.0", description="OpenAI-compatible serving of Qwen3 on MAX")
    app.state.mili = state
    settings = state.settings
    install_error_handlers(app)

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        if settings.api_key and (path.startswith("/v1/") or path == "/generate"):
            if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
                return error_response(APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                               kind="authentication_error", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes"))
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{settings.model_name}'",
                           param="model", kind="not_found_error", code="model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        status = state.health
        return JSONResponse({"status": status, "model_loaded": state.engine is not None}, 200 if status == "ok" else 503)

    @app.get("/status")
    async def status() -> dict[str, Any]:
        snapshot: dict[str, Any] = {"running": 0, "waiting": 0, "kv_blocks_used": 0, "kv_blocks_free": 0,
                                    "kv_blocks_cached": 0, "max_model_len": None, "speculative": None}
        if state.engine is not None:
            core = state.engine.engine

            def read() -> dict[str, Any]:  # on the engine thread: a consistent view between steps
                return {"running": core.num_running, "waiting": core.num_waiting, "kv_blocks_used": core.pool.num_used,
                        "kv_blocks_free": core.pool.num_free, "kv_blocks_cached": core.cache.usage().cached_blocks,
                        "max_model_len": core.max_model_len, "speculative": core.speculation_status()}

            snapshot = await state.engine.call(read)
        return {
            "model": settings.model_name, "device": settings.device, "dtype": settings.dtype,
            "weights": settings.weights, "weight_group_size": settings.weight_group_size,
            "activations": settings.activations,
            "model_format": settings.model_format, "weight_bytes_per_token": settings.weight_bytes_per_token,
            "health": state.health, "model_loaded": state.engine is not None,
            "uptime_s": round(time.monotonic() - state.started, 1), **snapshot,
            "prefix_cache_hit_rate": state.cached_tokens_seen / state.prompt_tokens_seen
            if state.prompt_tokens_seen else 0.0,
            "requests_served": state.requests_seen, "requests_in_flight": state.in_flight,
        }

    # What a router asks a worker when it registers it (sglang-router reads the served name here, and answers
    # its own /v1/models with it); SGLang's older /get_* paths too.
    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        return {"served_model_name": settings.model_name, "model_path": settings.model_path,
                "tokenizer_path": settings.tokenizer_path or settings.model_path, "device": settings.device,
                "dtype": settings.dtype,
                "max_model_len": state.engine.engine.max_model_len if state.engine is not None else None,
                "version": app.version}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> dict[str, Any]:
        return {"served_model_name": settings.model_name, "model_path": settings.model_path,
                "tokenizer_path": settings.tokenizer_path or settings.model_path, "is_generation": True}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "mili"}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        core = running_engine(state).engine
        prompts = body.prompts()
        prepared = await asyncio.gather(*(prepare(core, body, p, body.requested_max_tokens,
                                                  COMPLETIONS_DEFAULT_MAX_TOKENS, body.logprobs,
                                                  prompt_logprobs=body.engine_prompt_logprobs) for p in prompts))
        outputs = merged([run(state, p, body.cache_salt) for p in prepared])
        first = await first_output(outputs)
        echo = [p if isinstance(p, str) else core.tokenizer.decode(p) for p in prompts] if body.echo else None
        response = openai_format.Completions(core.tokenizer, f"cmpl-{uuid.uuid4().hex}", settings.model_name,
                                             body.n, len(prepared), echo, body.prompt_logprobs is not None)
        if body.stream:
            return openai_stream(first, outputs, response, body.stream_options)
        try:
            finals = await until_disconnected(request, final_outputs(first, outputs, len(prepared)))
        except ClientDisconnected:
            return client_gone_response()
        return JSONResponse(response.body(finals))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        core = running_engine(state).engine
        try:
            plan = await asyncio.to_thread(plan_chat, core.tokenizer, body, settings.reasoning_parser is not None,
                                           settings.tool_call_parser is not None)
        except ValueError as exc:
            raise bad_request(exc, default_param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prepared = await prepare(core, body, plan.prompt, body.requested_max_tokens, None, logprobs,
                                 constraint_param=plan.structured_output_param, prompt_logprobs=body.prompt_logprobs,
                                 structured_output=plan.structured_output, thinking=plan.thinking,
                                 thinking_token_budget=body.thinking_token_budget)
        outputs = merged([run(state, prepared, body.cache_salt)])
        first = await first_output(outputs)
        response = openai_format.ChatCompletions(core.tokenizer, f"chatcmpl-{uuid.uuid4().hex}", settings.model_name,
                                                 body.n, plan, body.prompt_logprobs is not None)
        if body.stream:
            return openai_stream(first, outputs, response, body.stream_options)
        try:
            (final,) = await until_disconnected(request, final_outputs(first, outputs, 1))
        except ClientDisconnected:
            return client_gone_response()
        return JSONResponse(response.body(final))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        core = running_engine(state).engine
        try:
            text = body.prompt if body.prompt is not None else \
                await asyncio.to_thread(render_prompt, core.tokenizer, body.as_chat())
        except ValueError as exc:
            raise bad_request(exc, default_param="messages") from None
        ids = await asyncio.to_thread(core.tokenizer.encode, text)
        return {"count": len(ids), "max_model_len": core.max_model_len, "tokens": ids,
                "token_strs": [core.tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        core = running_engine(state).engine
        vocab = core.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
        return {"prompt": core.tokenizer.decode(body.tokens)}

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        core = running_engine(state).engine
        prepared = await prepare(core, body, body.prompt, body.requested_max_tokens, GENERATE_DEFAULT_MAX_TOKENS, None)
        outputs = merged([run(state, prepared, None)])
        first = await first_output(outputs)
        response = openai_format.Generate()
        if body.stream:
            return event_stream(first, outputs, response.chunks)
        try:
            (final,) = await until_disconnected(request, final_outputs(first, outputs, 1))
        except ClientDisconnected:
            return client_gone_response()
        return JSONResponse(response.result(final))

    return app
