"""AsyncEngine: the engine for asyncio code (the server). The step loop runs on its own thread, so the
event loop never waits for the model; each request gets an async iterator of its outputs.

    engine = AsyncEngine(Engine.from_pretrained(model_dir))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=20)):
        print(out.outputs[0].delta, end="")

Leaving the `async for` early (a client that disconnected) aborts the request and frees its blocks.
Requests are checked on the caller's side: a bad one raises RequestError from `generate` before the
first output, and nothing is queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from typing import TypeVar

from mili.engine.engine import Engine, PreparedRequest, RequestOutput
from mili.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE_WAIT_S = 0.5  # how long the loop thread sleeps when there is nothing to do (new work wakes it)


class EngineDeadError(RuntimeError):
    """The step loop stopped (shut down, or crashed); no request can be served."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mili-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None,
                       salt: Hashable = None) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or uuid.uuid4().hex
        request = self.engine.prepare_request(request_id, prompt, params, salt)  # raises RequestError
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._submit(lambda: self._enqueue(request))
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request (no-op if it already finished); its blocks are freed by the loop thread."""
        self._streams.pop(request_id, None)
        self._submit(lambda: self.engine.abort(request_id))

    def run_on_loop_thread(self, call: Callable[[], object]) -> None:
        """Runs `call` on the engine thread between steps (for reads that must see a consistent engine)."""
        self._submit(call)

    async def call(self, fn: Callable[[], T]) -> T:
        """The result of `fn()`, run on the engine thread between steps."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(exc)

        self._submit(run)
        return await asyncio.wrap_future(future)

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops taking work, aborts what is in flight, and joins the loop thread."""
        self._stopping.set()
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout_s)

    def _enqueue(self, request: PreparedRequest) -> None:
        try:
            self.engine.enqueue(request)
        except Exception as exc:  # noqa: BLE001 - e.g. a request id taken meanwhile: that request fails
            self._deliver(request.request_id, exc)

    def _submit(self, call: Callable[[], None]) -> None:
        self._inbox.put(call)
        self._wake.set()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, item)

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
        except BaseException as exc:  # noqa: BLE001 - report to every waiting client, then stop
            log.exception("the engine loop crashed")
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine loop crashed: {exc}"))
            self._stopping.set()
            return
        for request_id in list(self._streams):
            self.engine.abort(request_id)
            self._deliver(request_id, EngineDeadError("the engine shut down"))
