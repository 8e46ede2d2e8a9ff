"""`mili serve`: check every cheap precondition (the port, the model's files, the KV cache budget: see
startup.py), start uvicorn at once (so /health answers 503 while loading), build the engine, then log a
startup summary. Ctrl-C or SIGTERM shuts down gracefully: in-flight requests are
aborted and their clients get a final error event or response.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

import uvicorn

from mili.engine.async_engine import AsyncEngine
from mili.engine.engine import Engine
from mili.server.app import ServerSettings, ServerState, create_app
from mili.server.startup import (ModelNotFound, StartupError, bind_listening_socket, check_checkpoint_folder,
                                 plan_kv_cache_blocks, resolve_model)

__all__ = ["ModelNotFound", "ServeOptions", "StartupError", "resolve_model", "serve"]

log = logging.getLogger("mili.server")


@dataclass(frozen=True)
class ServeOptions:
    model: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    kv_cache_memory: str = "1GiB"  # as typed: bytes with an optional unit, or a fraction (mili/memory_size.py)
    block_size: int = 16
    prefix_cache: bool = True
    api_key: str | None = None
    max_queue: int = 256
    served_model_name: str | None = None
    max_model_len: int | None = None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(options: ServeOptions) -> None:
    # Every precondition that takes seconds to check is checked before the engine's graph compile (a minute
    # or more cold), and fails with a StartupError naming its flag.
    listening = bind_listening_socket(options.host, options.port)
    try:
        model_dir, default_name = resolve_model(options.model)
        check_checkpoint_folder(model_dir)
        num_kv_blocks = plan_kv_cache_blocks(model_dir, kv_cache_memory=options.kv_cache_memory, dtype=options.dtype,
                                             device=options.device, block_size=options.block_size)
    except BaseException:
        listening.close()
        raise
    settings = ServerSettings(model_name=options.served_model_name or default_name, device=options.device,
                              dtype=options.dtype or ("float32" if options.device == "cpu" else "bfloat16"),
                              api_key=options.api_key, max_queue=options.max_queue)
    state = ServerState(settings)

    async def shutdown() -> None:
        if state.engine is not None:
            await state.engine.shutdown()

    app = create_app(state)
    app.router.on_shutdown.append(shutdown)
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    # The HTTP side starts at once on a thread (so /health answers 503 while loading); the model is built
    # here on the main thread, because MAX builds graphs in the thread that owns its MLIR context.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, name="mili-http", daemon=True)
    thread.start()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM shuts down as gracefully as Ctrl-C
    log.info("starting the server for %s on http://%s:%d (model loading: /health answers 503 until ready)",
             settings.model_name, options.host, options.port)
    try:
        engine = Engine.from_pretrained(
            str(model_dir), dtype=options.dtype, device=options.device, block_size=options.block_size,
            num_kv_blocks=num_kv_blocks, max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens, enable_prefix_cache=options.prefix_cache,
            max_model_len=options.max_model_len)
        state.attach(AsyncEngine(engine))
        runner = engine.runner
        random_note = " (the built-in demo: RANDOM weights, gibberish output)" if options.model is None else ""
        log.info("serving %s%s on http://%s:%d: %s on %s, %d KV blocks of %d tokens, prefix cache %s, "
                 "weights %.1f s, compile %.1f s", settings.model_name, random_note, options.host, options.port,
                 runner.dtype.name, options.device, runner.num_blocks, runner.block_size,
                 "on" if options.prefix_cache else "off", runner.startup.weights_s, runner.startup.compile_s)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        log.info("shutting down: finishing open connections, aborting in-flight requests")
    finally:
        server.should_exit = True
        thread.join(30)
