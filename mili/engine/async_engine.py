"""AsyncEngine: the engine for asyncio code (the server). The step loop runs on its own thread, so the
event loop never waits for the model; each request gets an async iterator of its outputs.

    engine = AsyncEngine(Engine.from_pretrained(model_dir))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=20)):
        print(out.outputs[0].delta, end="")

- Tokenizing and checking a request run in a worker thread, not on the event loop; a bad request raises
  RequestError from `generate` before the first output, and nothing is queued.
- A reader that falls behind gets the outputs it missed merged into one (RequestStream), so what waits for
  a slow client is its unread text, never a copy per step.
- Leaving the `async for` early (a client that disconnected, a cancelled task) aborts the request.
- `drain_blocking` stops taking requests and lets those in flight finish for a grace period; `stop_blocking` (or `shutdown`) then aborts
  the rest: each of their readers gets EngineDeadError, so a stream can end with an error event.
- If the loop thread ever dies (a bug: every step already fails only its own requests), every reader gets
  EngineDeadError and `on_death` runs: the server uses it to exit non-zero, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import TypeVar

from mili.engine.engine import Engine
from mili.engine.outputs import RequestOutput
from mili.engine.request import Request
from mili.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_WAIT_S = 0.5  # how long the loop thread sleeps when there is nothing to do (new work wakes it)


class EngineDeadError(RuntimeError):
    """The step loop stopped (shut down, or crashed) or takes no more requests."""


class RequestStream:
    """One request's outputs on their way from the engine thread to the event loop. Unread outputs are
    merged into one, and an error is handed out after whatever output came before it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Event-loop side (the engine thread calls it through `loop.call_soon_threadsafe`)."""
        if isinstance(item, BaseException):
            self._error = self._error or item
        else:
            self._pending = item if self._pending is None else self._pending.merge(item)
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        if self._pending is not None:
            out, self._pending = self._pending, None
            if self._error is None:
                self._ready.clear()
            return out
        assert self._error is not None  # _ready is only set with something to hand out
        raise self._error


class AsyncEngine:
    def __init__(self, engine: Engine, on_death: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_death = on_death
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._accepting = True
        self.crash: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="mili-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_running

    def check_accepting(self) -> None:
        """Raises EngineDeadError, saying why, unless new requests are taken."""
        if not self.is_accepting:
            raise EngineDeadError("the server is shutting down" if self.is_running else "the engine has stopped")

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None,
                       salt: Hashable = None) -> AsyncIterator[RequestOutput]:
        self.check_accepting()
        request_id = request_id or uuid.uuid4().hex
        request = await asyncio.to_thread(self.engine.prepare_request, request_id, prompt, params, salt)
        stream = RequestStream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._submit(lambda: self._enqueue(request))
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request (no-op if it already finished); its blocks are freed by the loop thread."""
        self._streams.pop(request_id, None)
        self._submit(lambda: self.engine.abort(request_id))

    async def call(self, fn: Callable[[], T]) -> T:
        """The result of `fn()`, run on the engine thread between steps (a consistent view of the engine)."""
        if not self._thread.is_alive():
            return fn()  # nothing else touches the engine any more
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(exc)

        self._submit(run)
        return await asyncio.wrap_future(future)

    def drain_blocking(self, grace_s: float) -> int:
        """Takes no new requests and waits up to `grace_s` for those in flight to finish; returns how many
        are still running then. Blocks: for a thread that is not running the event loop (serve's main thread)."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self._streams and self.is_running and time.monotonic() < deadline:
            time.sleep(0.05)
        return len(self._streams)

    def stop_blocking(self, timeout_s: float = 60.0) -> None:
        """Stops the loop after its current step: aborts what is in flight (each reader gets
        EngineDeadError) and joins the thread, so no model call is cut off at interpreter exit."""
        self._accepting = False
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout_s)

    async def shutdown(self, timeout_s: float = 60.0) -> None:
        """`stop_blocking` without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop_blocking, timeout_s)

    def _enqueue(self, request: Request) -> None:
        if request.request_id not in self._streams:
            return  # its reader left before it was queued
        try:
            self.engine.enqueue(request)
        except Exception as exc:  # noqa: BLE001 - e.g. a request id taken meanwhile: that request fails
            self._deliver(request.request_id, exc)

    def _submit(self, call: Callable[[], None]) -> None:
        self._inbox.put(call)
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.put, item)
            except RuntimeError:  # its event loop has closed: nobody is reading
                pass

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                while not self._inbox.empty():
                    self._inbox.get()()
                if not self.engine.has_unfinished():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # noqa: BLE001 - report to every reader, then to whoever supervises
            log.critical("the engine loop crashed; no request can be served any more", exc_info=True)
            self.crash = exc
            self._stopping.set()
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine loop crashed: {exc}"))
            if self.on_death is not None:
                self.on_death(exc)
            return
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver(request_id, EngineDeadError("the server shut down before this request finished"))
