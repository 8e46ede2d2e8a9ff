"""From a validated HTTP request to engine outputs: sampling parameters (the checkpoint's defaults for what
the client left unset), tokenizing off the event loop, the in-flight limit, several prompts at once, and
engine failures turned into API errors. Shared by the OpenAI endpoints and /generate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from mili.engine.async_engine import AsyncEngine, EngineDeadError
from mili.engine.engine import Engine, RequestError
from mili.engine.outputs import RequestOutput
from mili.engine.sampling_params import SamplingParams
from mili.engine.structured_output import StructuredOutputError
from mili.server.errors import APIError, bad_request
from mili.server.protocol import SamplingFields
from mili.server.state import ServerState

log = logging.getLogger("mili.server")
MODEL_DEFAULTED = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams


def running_engine(state: ServerState) -> AsyncEngine:
    engine = state.engine
    if engine is None:
        raise APIError(503, "the model is still loading; retry shortly", kind="service_unavailable")
    try:
        engine.check_accepting()
    except EngineDeadError as exc:
        raise APIError(503, str(exc), kind="service_unavailable") from None
    return engine


async def prepare(core: Engine, body: SamplingFields, prompt: str | list[int], max_tokens: int | None,
                  default_max_tokens: int | None, logprobs: int | None, constraint_param: str | None = None,
                  **extra: object) -> Prepared:
    """Tokenizes (in a worker thread), builds the request's SamplingParams (`extra`: the endpoint's own fields
    of them) and compiles its output constraint (cached for the engine; `constraint_param`: the field it came
    from, when not one of `body`'s own); APIError 400, naming the field, if it cannot run."""
    ids = await asyncio.to_thread(core.tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    room = core.max_model_len - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {core.max_model_len}",
                       param="prompt")
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens is {max_tokens}, but the prompt ({len(ids)} tokens) leaves room for "
                            f"{room} in this server's {core.max_model_len}-token context", param="max_tokens")
    chosen = max_tokens if max_tokens is not None else min(default_max_tokens or room, room)
    unset = {name: value for name, value in core.sampling_defaults.items()
             if name in MODEL_DEFAULTED and name not in body.model_fields_set}
    try:
        params = body.sampling_params(chosen, logprobs, defaults=unset, **extra)
    except ValueError as exc:
        raise bad_request(exc) from None
    if params.structured_output is not None:
        try:
            await asyncio.to_thread(core.grammars.matcher, params.structured_output)
        except StructuredOutputError as exc:
            named = body.structured_output_named()
            raise APIError(400, str(exc), param=constraint_param or (named[0] if named else None)) from None
    return Prepared(ids, params)


async def run(state: ServerState, prepared: Prepared, salt: str | None) -> AsyncIterator[RequestOutput]:
    """One engine request's outputs; counts it against the in-flight limit and records its metrics."""
    engine = running_engine(state)
    settings = state.settings
    if state.in_flight >= settings.max_queue:
        state.metrics.rejected.inc()
        raise APIError(429, f"the server has {state.in_flight} requests in flight (limit {settings.max_queue}); "
                            "retry later", kind="rate_limit_error")
    state.in_flight += 1
    finished = False
    outputs = engine.generate(prepared.prompt_ids, prepared.params, salt=salt)
    try:
        async for out in outputs:
            if out.error:
                if any(c.delta or c.delta_token_ids for c in out.outputs):
                    yield unsent_before_failure(out)  # tokens a slow reader had not read yet still go out
                if out.error_from_request:
                    raise APIError(400, out.error)
                raise APIError(500, out.error, kind="server_error")
            finished = out.finished
            if finished:
                state.record(out)
                log_finished(out)
            yield out
    except RequestError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), kind="service_unavailable") from None
    finally:
        await outputs.aclose()  # at once, not when garbage-collected: it aborts an unfinished request
        state.in_flight -= 1
        if not finished:
            state.metrics.aborted.inc()


def unsent_before_failure(out: RequestOutput) -> RequestOutput:
    """A failed request's last output as a plain, unfinished one: what it generated before the failure."""
    return replace(out, finished=False, error=None,
                   outputs=[replace(c, finish_reason=None, text=None, token_ids=None, logprobs=None)
                            for c in out.outputs])


def log_finished(out: RequestOutput) -> None:
    m = out.metrics
    generated = sum(c.num_tokens for c in out.outputs)
    rate = generated / m.e2e_s if m.e2e_s else 0.0
    log.info("request %s: %d prompt tokens (%d cached), %d generated, TTFT %s, %.1f tokens/s, finish %s",
             out.request_id, len(out.prompt_token_ids), m.cached_tokens, generated,
             f"{m.ttft_s * 1e3:.0f} ms" if m.ttft_s is not None else "-", rate,
             ",".join(c.finish_reason or "-" for c in out.outputs))


async def merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come: (which stream, output). Closing it closes every stream
    (which aborts their requests)."""
    if len(streams) == 1:  # the common case needs no tasks
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer (cancellation is not)
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # each stream's cleanup (abort) runs first


async def first_output(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> tuple[int, RequestOutput] | None:
    """Pulls the first output before a response starts, so early errors become proper 4xx/5xx."""
    return await anext(outputs, None)


async def final_outputs(first: tuple[int, RequestOutput] | None,
                        outputs: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[RequestOutput]:
    """Each stream's finished output (non-streaming responses)."""
    finals: dict[int, RequestOutput] = {}
    item = first
    while item is not None:
        index, out = item
        if out.finished:
            finals[index] = out
        item = await anext(outputs, None)
    if len(finals) != count:
        raise APIError(500, "a request ended without a result", kind="server_error")
    return [finals[i] for i in range(count)]
