"""Server-sent events and client disconnects.

A stream always ends properly: after its last chunk, or after an error event in OpenAI's error shape
(a failure mid-way, the server shutting down), comes `data: [DONE]`. A client that goes away aborts its
requests at once, for streaming responses (the response generator is closed) and for plain ones alike
(`until_disconnected` watches the connection while the result is computed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from mili.engine.outputs import RequestOutput
from mili.server.errors import APIError

log = logging.getLogger("mili.server")
T = TypeVar("T")
Chunk = dict[str, Any]


def sse(payload: Chunk | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def event_stream(first: tuple[int, RequestOutput] | None, outputs: AsyncIterator[tuple[int, RequestOutput]],
                 chunks: Callable[[int, RequestOutput], Iterable[Chunk]],
                 closing: Callable[[], Iterable[Chunk]] = tuple) -> StreamingResponse:
    """SSE of `chunks(index, output)` for every output, then `closing()`, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            item = first
            while item is not None:
                for chunk in chunks(*item):
                    yield sse(chunk)
                item = await anext(outputs, None)
            for chunk in closing():
                yield sse(chunk)
        except APIError as exc:
            log.warning("stream ended by an error: %s", exc.message)
            yield sse(exc.body())
        finally:
            await outputs.aclose()  # a client gone mid-stream: its requests are aborted now
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientDisconnected (with `work` cancelled) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # its cleanup aborts the requests
    raise ClientDisconnected


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone_response() -> Response:
    # nobody reads it; 499 (nginx's "client closed request") makes the access log say what happened
    return Response(status_code=499)
