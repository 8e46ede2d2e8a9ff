"""`mili serve`: resolve the model, start uvicorn at once (so /health answers 503 while loading), build the
engine, then log a startup summary. Ctrl-C or SIGTERM shuts down gracefully: in-flight requests are
aborted and their clients get a final error event or response.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from mili.engine.async_engine import AsyncEngine
from mili.engine.engine import Engine
from mili.server.app import ServerSettings, ServerState, create_app

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
    kv_cache_memory: float = 1 << 30
    block_size: int = 16
    prefix_cache: bool = True
    api_key: str | None = None
    max_queue: int = 256
    served_model_name: str | None = None
    max_model_len: int | None = None


class ModelNotFound(ValueError):
    """--model names neither a folder nor a model in the local Hugging Face cache (and none could be fetched)."""


def resolve_model(model: str | None) -> tuple[Path, str]:
    """(checkpoint folder, name to serve it as) for a folder, a Hugging Face repo id, or None (the demo)."""
    if model is None:
        from mili.server.demo import DEMO_NAME, demo_model_dir
        return demo_model_dir(), DEMO_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        return path, path.name
    if model.count("/") != 1 or path.exists():
        raise ModelNotFound(f"--model {model}: no such folder (pass a Qwen3 checkpoint folder or a Hugging Face "
                            f"repo id such as Qwen/Qwen3-0.6B)")
    hub = Path(os.environ.get("HF_HUB_CACHE", Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
                              / "hub"))
    repo = hub / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.exists() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip(), model
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.txt"])), model
    except ImportError:
        reason = "huggingface_hub is not installed to download it"
    except Exception as exc:  # noqa: BLE001 - offline, gated, unknown repo...
        reason = f"downloading it failed ({type(exc).__name__}: {exc})"
    raise ModelNotFound(f"--model {model}: not in the local Hugging Face cache ({hub}) and {reason}; "
                        f"download it where you have internet (huggingface-cli download {model}) or pass a folder")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(options: ServeOptions) -> None:
    model_dir, default_name = resolve_model(options.model)
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
    thread = threading.Thread(target=server.run, name="mili-http", daemon=True)
    thread.start()
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM shuts down as gracefully as Ctrl-C
    log.info("starting the server for %s on http://%s:%d (model loading: /health answers 503 until ready)",
             settings.model_name, options.host, options.port)
    try:
        engine = Engine.from_pretrained(
            str(model_dir), dtype=options.dtype, device=options.device, block_size=options.block_size,
            kv_cache_bytes=options.kv_cache_memory, max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens, enable_prefix_cache=options.prefix_cache,
            max_model_len=options.max_model_len)
        state.attach(AsyncEngine(engine))
        runner = engine.runner
        random_note = " (the built-in demo: RANDOM weights, gibberish output)" if options.model is None else ""
        log.info("serving %s%s on http://%s:%d: %s on %s, %d KV blocks of %d tokens, prefix cache %s, "
                 "weights %.1f s, compile %.1f s", settings.model_name, random_note, options.host, options.port,
                 runner.dtype, options.device, runner.num_blocks, runner.block_size,
                 "on" if options.prefix_cache else "off", runner.startup.weights_s, runner.startup.compile_s)
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        log.info("shutting down: finishing open connections, aborting in-flight requests")
    finally:
        server.should_exit = True
        thread.join(30)
