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
from pathlib import Path

import uvicorn

from mili.engine.async_engine import AsyncEngine
from mili.engine.config import ContextTooLong, EngineConfig
from mili.engine.engine import Engine
from mili.engine.speculative import SpeculativeConfig
from mili.quantization import describe_run, linear_activations, weight_group_size
from mili.server.app import create_app
from mili.server.state import ServerSettings, ServerState
from mili.server.startup import (ModelNotFound, StartupError, bind_listening_socket, check_draft_model, open_model,
                                 plan_kv_cache_blocks, resolve_model)

__all__ = ["ModelNotFound", "ServeOptions", "StartupError", "resolve_model", "serve"]

log = logging.getLogger("mili.server")
SHUTDOWN_FLUSH_S = 10.0  # after the drain: time for open responses to send their last events


@dataclass(frozen=True)
class ServeOptions:
    model: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    dtype: str = "auto"  # auto: the checkpoint's dtype on CPU, bfloat16 on GPU (mili.dtypes.resolve_run_dtype)
    quantization: str = "none"  # or int8 / int4 weights (mili/quantization.py)
    float_activations: bool = False  # 4-bit weights meet float activations instead of int8 ones
    tokenizer: str | None = None  # a Hugging Face tokenizer folder replacing the model's own (GGUF files)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    kv_cache_memory: str = "1GiB"  # as typed: bytes with an optional unit, or a fraction (mili/memory_size.py)
    block_size: int = 16
    prefix_cache: bool = True
    api_key: str | None = None
    max_queue: int = 256
    served_model_name: str | None = None
    max_model_len: int | None = None
    shutdown_grace_s: float = 30.0  # on SIGTERM/SIGINT, how long requests in flight may take to finish
    speculative: SpeculativeConfig | None = None  # speculative decoding (mili/engine/speculative.py); off if None
    reasoning_parser: str | None = None  # "qwen3": think blocks go to reasoning_content (mili/server/reasoning.py)
    tool_call_parser: str | None = "hermes"  # None: requests with tools are refused (mili/server/tool_calls.py)


def serve(options: ServeOptions) -> int:
    """Runs the server until SIGINT or SIGTERM; returns the exit code (1 if the engine loop crashed)."""
    # Every precondition that takes seconds to check is checked before the engine's graph compile (a minute
    # or more cold), and fails with a StartupError naming its flag.
    listening = bind_listening_socket(options.host, options.port)
    try:
        source, default_name = open_model(options.model, options.tokenizer)
        plan = plan_kv_cache_blocks(source, kv_cache_memory=options.kv_cache_memory, dtype=options.dtype,
                                    quantization=options.quantization, device=options.device,
                                    block_size=options.block_size, float_activations=options.float_activations)
        if options.speculative is not None and options.speculative.draft_model is not None:
            check_draft_model(Path(options.speculative.draft_model), plan.spec.config.vocab_size)
        if options.max_model_len is not None:  # refused now rather than after the compile
            EngineConfig(max_model_len=options.max_model_len).context_limit(
                plan.spec.config.max_position_embeddings, plan.num_blocks * options.block_size)
    except ContextTooLong as exc:
        listening.close()
        raise StartupError(str(exc)) from None
    except BaseException:
        listening.close()
        raise
    # /status reports the resolved formats from the start, also while the model loads.
    settings = ServerSettings(model_name=options.served_model_name or default_name, model_path=str(source.path),
                              tokenizer_path=str(source.tokenizer_dir or source.path), model_format=source.describe(),
                              device=options.device, dtype=plan.spec.dtype.name, weights=plan.spec.weight_format.value,
                              weight_group_size=weight_group_size(plan.spec),
                              activations=linear_activations(plan.spec),
                              weight_bytes_per_token=plan.spec.weight_bytes_per_token(), api_key=options.api_key,
                              max_queue=options.max_queue, reasoning_parser=options.reasoning_parser,
                              tool_call_parser=options.tool_call_parser)
    state = ServerState(settings)
    app = create_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                                           timeout_graceful_shutdown=SHUTDOWN_FLUSH_S))
    stop = threading.Event()
    engine_died = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("%s received: draining (no new requests; up to %.0f s for those in flight, then they are ended)",
                 signal.Signals(signum).name, options.shutdown_grace_s)
        stop.set()
        if state.engine is None:  # still loading: nothing to drain, stop the load itself
            raise KeyboardInterrupt

    def on_engine_death(exc: BaseException) -> None:
        engine_died.set()
        stop.set()

    # Both signals, explicitly: a server started in the background by a script inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # The HTTP side starts at once on a thread (so /health answers 503 while loading); the model is built
    # here on the main thread, because MAX builds graphs in the thread that owns its MLIR context.
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, name="mili-http", daemon=True)
    thread.start()
    log.info("starting the server for %s (%s; %s) on http://%s:%d (model loading: /health answers 503 until ready)",
             settings.model_name, source.describe(), describe_run(plan.spec), options.host, options.port)
    try:
        engine = Engine.from_pretrained(
            # the plan's resolved dtype, so the engine builds the very spec the KV cache was sized for
            source, dtype=plan.spec.dtype.name, quantization=options.quantization, device=options.device,
            float_activations=options.float_activations, block_size=options.block_size,
            num_kv_blocks=plan.num_blocks, max_num_seqs=options.max_num_seqs,
            max_num_batched_tokens=options.max_num_batched_tokens, enable_prefix_cache=options.prefix_cache,
            max_model_len=options.max_model_len, speculative=options.speculative)
        state.attach(AsyncEngine(engine, on_death=on_engine_death))
        runner = engine.runner
        random_note = " (the built-in demo: RANDOM weights, gibberish output)" if options.model is None else ""
        log.info("serving %s%s on http://%s:%d: %s on %s, %d KV blocks of %d tokens (context %d tokens), "
                 "prefix cache %s, speculative decoding %s, weights loaded in %.1f s, compile %.1f s",
                 settings.model_name, random_note, options.host, options.port, describe_run(plan.spec), options.device,
                 runner.num_blocks, runner.block_size, engine.max_model_len, "on" if options.prefix_cache else "off",
                 describe_speculation(options.speculative), runner.startup.weights_s, runner.startup.compile_s)
        while thread.is_alive() and not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        log.info("stopped while loading the model")
    finally:
        _shut_down(state, server, thread, options.shutdown_grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine_died.is_set():
        log.critical("exiting because the engine loop crashed (see above); a supervisor should restart MILI")
        return 1
    return 0


def describe_speculation(config: SpeculativeConfig | None) -> str:
    if config is None:
        return "off"
    source = f"draft model {config.draft_model}" if config.method == "draft" else "n-gram lookup"
    return (f"{source}, up to {config.num_speculative_tokens} tokens, while at most {config.max_batch_size} "
            f"sequences run")


def _shut_down(state: ServerState, server: uvicorn.Server, thread: threading.Thread, grace_s: float) -> None:
    """Drain, end what is left properly, stop HTTP, and join the engine thread before the interpreter exits
    (a daemon thread cut off inside a MAX call at exit aborted the process: 'FATAL: exception not rethrown')."""
    engine = state.engine
    if engine is not None:
        left = engine.drain_blocking(grace_s)
        if left:
            log.info("ending %d request(s) still in flight after the %.0f s grace period", left, grace_s)
        engine.stop_blocking()
    server.should_exit = True  # uvicorn lets open responses flush their last events, then closes
    thread.join(SHUTDOWN_FLUSH_S + 5)
    log.info("shut down")
