"""What `mili serve` (and `mili generate`) check before the minute-long graph compile: the model can be found
and holds the files a checkpoint needs, the port can be bound, the KV cache budget can be allocated. Each
failure is one line naming the flag and what to pass instead.

Kept free of uvicorn, FastAPI and MAX at import time, so a bad flag is answered in about a second.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mili.memory_size import HOW_TO_PASS, MemorySizeError, parse_memory_size

if TYPE_CHECKING:
    from mili.model.qwen3 import Qwen3GraphSpec
    from mili.model_source import ModelSource


class StartupError(ValueError):
    """A precondition of starting failed; the message names the flag and the fix."""


class ModelNotFound(StartupError):
    """--model names neither a folder nor a model in the local Hugging Face cache (and none could be fetched)."""


def resolve_model(model: str | None) -> tuple[Path, str]:
    """(model path, name to serve it as) for a folder, a GGUF file, a Hugging Face repo id, or None (the demo)."""
    if model is None:
        from mili.server.demo import DEMO_NAME, demo_model_dir
        return demo_model_dir(), DEMO_NAME
    path = Path(model).expanduser()
    if path.is_dir():
        return path, path.name
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path, path.stem
    if model.count("/") != 1 or path.exists():
        raise ModelNotFound(f"--model {model}: no such folder or .gguf file (pass a Qwen3 checkpoint folder, a GGUF "
                            f"file or a Hugging Face repo id such as Qwen/Qwen3-0.6B)")
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
        first_line = (str(exc).splitlines() or [""])[0]  # hub errors run to several lines of advice
        reason = f"downloading it failed ({type(exc).__name__}: {first_line})"
    raise ModelNotFound(f"--model {model}: not in the local Hugging Face cache ({hub}) and {reason}; "
                        f"download it where you have internet (hf download {model}) or pass a folder")


def check_checkpoint_folder(model_dir: Path) -> None:
    """The files every later step reads, so a wrong folder fails now rather than after the weights load."""
    try:
        missing = [name for name in ("config.json", "tokenizer.json") if not (model_dir / name).is_file()]
        if not any(model_dir.glob("*.safetensors")):
            missing.append("*.safetensors")
        unreadable = [p.name for p in (model_dir / "config.json", *model_dir.glob("*.safetensors"))
                      if p.is_file() and not os.access(p, os.R_OK)]
    except PermissionError as exc:
        unreadable = [Path(exc.filename).name if exc.filename else model_dir.name]
        missing = []
    if unreadable:
        raise StartupError(f"--model {model_dir}: {', '.join(unreadable)} cannot be read by this user (uid "
                           f"{os.getuid()}); make the checkpoint readable to it (in a container: mount a folder "
                           f"whose files are world-readable, or run as their owner)")
    if missing:
        raise StartupError(f"--model {model_dir}: no {', '.join(missing)} in that folder; pass a Hugging Face "
                           f"Qwen3 checkpoint folder (config.json, *.safetensors, tokenizer.json)")


def open_model(model: str | None, tokenizer: str | None = None) -> tuple[ModelSource, str]:
    """(the model, the name to serve it as) for --model (and --tokenizer): a checkpoint folder's files checked, a
    GGUF file's metadata checked against its tensors. Every failure is a StartupError naming the flag."""
    from mili.model_source import ModelSource, ModelSourceError, is_gguf_path

    path, name = resolve_model(model)
    gguf = is_gguf_path(path)
    if not gguf:
        check_checkpoint_folder(path)
    try:
        source = ModelSource.open(path, tokenizer)
    except ModelSourceError as exc:  # names its flag
        raise StartupError(str(exc)) from None
    except ValueError as exc:  # GGUFError, ConfigError: a file MILI cannot run
        raise StartupError(f"--model {model}: {exc}") from None
    return source, (source.name if gguf else name)


def check_draft_model(draft: Path, target_vocab_size: int) -> None:
    """--draft-model: a checkpoint folder or GGUF file whose vocabulary is the target's (checked before any
    compile)."""
    from mili.model_source import ModelSource, is_gguf_path

    if not draft.exists():
        raise StartupError(f"--draft-model {draft}: no such folder or file; pass a smaller Qwen3 checkpoint folder "
                           f"or GGUF file with the target's tokenizer (e.g. a Qwen3-0.6B for a Qwen3-8B)")
    if not is_gguf_path(draft) and (not (draft / "config.json").is_file() or not any(draft.glob("*.safetensors"))):
        raise StartupError(f"--draft-model {draft}: needs config.json and *.safetensors in that folder")
    try:
        vocab = ModelSource.open(draft).config.vocab_size
    except ValueError as exc:  # ConfigError, GGUFError: a model MILI cannot run
        raise StartupError(f"--draft-model {draft}: {exc}") from None
    if vocab != target_vocab_size:
        raise StartupError(f"--draft-model {draft}: its vocabulary has {vocab} tokens, the model's "
                           f"{target_vocab_size}; a draft must share the target's tokenizer")


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn to listen on (`Server.run(sockets=...)`).

    Bound here, before the model is built, so a busy port fails at once rather than after the compile,
    and nothing can take the port between this check and uvicorn's start. SO_REUSEADDR as uvicorn sets
    it: a port left in TIME_WAIT by a server that just stopped is free to use."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise StartupError(f"--host {host}: not an address this machine can resolve ({exc.strerror}); "
                           f"pass an IP address such as 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"--port {port}: {host}:{port} is already in use (another `mili serve`?); "
                               f"pass a free port with --port, or stop the program that holds it") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"--port {port}: binding ports below 1024 needs root; pass --port 8000 "
                               f"or another port above 1023") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"--host {host}: not an address of this machine; pass 127.0.0.1 (this machine "
                               f"only) or 0.0.0.0 (every interface)") from None
        raise StartupError(f"--host {host} --port {port}: cannot bind ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class KvCachePlan:
    """What the checks before the compile settle: the graph spec the engine will build (run dtype and weight
    format resolved from the flags and config.json) and how many KV blocks fit next to its weights."""

    spec: Qwen3GraphSpec
    num_blocks: int


def plan_kv_cache_blocks(model: Path | ModelSource, *, kv_cache_memory: str, dtype: str | None, device: str,
                         block_size: int, quantization: str | None = None,
                         float_activations: bool = False) -> KvCachePlan:
    """KV blocks for `--kv-cache-memory` as typed (see mili/memory_size.py), sized as the engine would size
    them (the same run dtype and weight format) but from the config alone (config.json, or a GGUF file's
    metadata), so a budget that cannot be allocated fails before the compile."""
    from mili.dtypes import resolve_run_dtype
    from mili.engine.model_runner import KvCacheSizeError, kv_cache_blocks, resolve_device
    from mili.model_source import ModelSource, ModelSourceError
    from mili.quantization import parse_quantization

    try:
        size = parse_memory_size(kv_cache_memory)
    except MemorySizeError as exc:
        raise StartupError(f"--kv-cache-memory {kv_cache_memory}: {exc}") from None
    try:
        driver_device = resolve_device(device)[0]
    except ValueError as exc:  # --device gpu on a machine without one
        raise StartupError(f"--device {device}: {exc}") from None
    try:
        weights = parse_quantization(quantization)
    except ValueError as exc:
        raise StartupError(f"--quantization {quantization}: {exc}") from None
    source = model if isinstance(model, ModelSource) else ModelSource.open(model)
    try:
        run_dtype = resolve_run_dtype(dtype, checkpoint_dtype=source.checkpoint_dtype, device=device)
    except ValueError as exc:
        raise StartupError(f"--dtype {dtype}: {exc}") from None
    try:
        spec = source.graph_spec(dtype=run_dtype, block_size=block_size, device=driver_device, weights=weights,
                                 float_activations=float_activations)
    except ModelSourceError as exc:  # --quantization for a GGUF file
        raise StartupError(str(exc)) from None
    try:
        return KvCachePlan(spec, kv_cache_blocks(spec, size, driver_device))
    except KvCacheSizeError as exc:
        raise StartupError(f"--kv-cache-memory {kv_cache_memory}: {exc}; {HOW_TO_PASS}") from None
