"""OpenAI-compatible servers of MILI and its peers, started on 127.0.0.1 for the serving benchmarks, each in its
best documented CPU configuration with the same KV-cache budget, batch size limit and served model name:
- MILI: `mili serve` (bfloat16 weights packed for MILI's linear op, or int8);
- vLLM: `vllm serve` in batched_peer_dtype() (bfloat16 where the CPU has bf16 dot products, else float32),
  threads bound to every core (benchmarks/peers/engines.py: vllm_env);
- llama.cpp: `llama-server`, a GGUF (BF16 by default), one slot per concurrent request, continuous batching;
- MAX: `max serve` through benchmarks/peers/runners/max_cpu.py (CPU, float32: the only dtype its CPU path runs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.peers import llama_cpp
from benchmarks.peers.engines import (
    SHORT_DTYPE,
    THREADS,
    batched_peer_dtype,
    checkpoint_parameter_counts,
    kv_gib_for,
    vllm_env,
)
from benchmarks.peers.home import PeerHome
from benchmarks.peers.spotlight import signal_group
from benchmarks.peers.workers import LOGS, ROOT, RUNNERS
from mili.config import ModelConfig

SERVED_NAME = "qwen3"
SERVERS = ("mili", "vllm", "llama.cpp", "max")


@dataclass
class ServerSpec:
    name: str  # a row of the results, e.g. "vLLM bf16"
    peer: str | None  # the PeerHome it needs (None: MILI itself)
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = 8000
    startup_timeout_s: float = 900.0  # cold compiles: MILI's and MAX's graphs, vLLM's warm-up

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def server_spec(engine: str, model: Path, port: int, max_seqs: int, kv_gib: int, prefix_cache: bool = True,
                mili_config: str = "bfloat16", gguf_format: str = "BF16", mili_gguf: bool = False) -> ServerSpec:
    """`kv_gib`: the KV-cache budget as GiB of bfloat16 (float16 for llama.cpp); a server whose cache is float32
    gets the bytes that hold as many tokens (engines.kv_gib_for). With `mili_gguf`, MILI serves the checkpoint's
    GGUF file of `gguf_format` (llama.cpp's file, as stored) instead of the checkpoint."""
    if engine == "mili":
        quantization = ["--quantization", "int8"] if mili_config == "int8" else []
        dtype = "float32" if mili_config == "float32" else "bfloat16"
        served = llama_cpp.gguf(model, gguf_format) if mili_gguf else model
        return ServerSpec(f"MILI GGUF {gguf_format}" if mili_gguf else f"MILI {mili_config}", None, [
            str(Path(sys.executable).with_name("mili")), "serve", "--model", str(served), "--port", str(port),
            "--dtype", dtype, *quantization, "--kv-cache-memory", f"{kv_gib_for(dtype, kv_gib)}GiB",
            "--max-num-seqs", str(max_seqs),
            "--served-model-name", SERVED_NAME, *([] if prefix_cache else ["--no-prefix-cache"])], port=port)
    if engine == "vllm":
        home, dtype = PeerHome("vllm"), batched_peer_dtype()
        return ServerSpec(f"vLLM {SHORT_DTYPE[dtype]}", "vllm", [
            str(home.bin("vllm")), "serve", str(model), "--port", str(port), "--dtype", dtype,
            "--max-model-len", "2048", "--max-num-seqs", str(max_seqs), "--served-model-name", SERVED_NAME,
            *([] if prefix_cache else ["--no-enable-prefix-caching"])],
            env=vllm_env(kv_gib_for(dtype, kv_gib)), port=port)
    if engine == "llama.cpp":
        # one slot per concurrent request, all sharing one KV cache of kv_gib (--kv-unified); prompt caching
        # across requests is its --cache-prompt (on by default: a slot reuses the longest common prefix it holds)
        tokens_per_gib = (1 << 30) // kv_bytes_per_token_f16(model)
        return ServerSpec(f"llama.cpp {gguf_format}", "llama.cpp", [
            str(llama_cpp.tool("llama-server")), "-m", str(llama_cpp.gguf(model, gguf_format)), "--port", str(port),
            "-t", str(THREADS), "-c", str(kv_gib * tokens_per_gib), "-np", str(max_seqs), "--kv-unified",
            "--alias", SERVED_NAME, *([] if prefix_cache else ["--no-cache-prompt"])], port=port)
    if engine == "max":
        home = PeerHome("max")
        return ServerSpec("MAX fp32", "max", [
            str(home.python), str(RUNNERS / "max_cpu.py"), "serve", "--model-path", str(model), "--devices", "cpu",
            "--quantization-encoding", "float32", "--port", str(port), "--served-model-name", SERVED_NAME,
            "--max-batch-size", str(max_seqs), "--max-length", "2048",
            "--device-memory-utilization", f"{max_memory_utilization(model, kv_gib_for('float32', kv_gib)):.3f}"],
            port=port)
    raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(SERVERS)}")


def max_memory_utilization(model: Path, kv_gib: int) -> float:
    """MAX sizes its KV cache as a share of the device's memory (--device-memory-utilization, default 0.9: on a CPU
    that took ~20 GiB of host RAM here and got it OOM-killed). The share is of the whole memory, not of what is
    free (a share of MemAvailable taken beside the other engines' workers gave it 10.5 GiB and the same end): the
    share that holds the weights (float32) and about `kv_gib` of KV cache, like the other servers."""
    total = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                 if line.startswith("MemTotal:"))
    weights = 4 * sum(checkpoint_parameter_counts(model).values())
    return min(0.9, (weights + (kv_gib << 30) + (512 << 20)) / total)


def kv_bytes_per_token_f16(model: Path) -> int:
    config = ModelConfig.from_pretrained(model)
    return 2 * 2 * config.num_hidden_layers * config.kv_size  # K and V, 2 bytes each


def unwind_on_sigterm() -> None:
    """A SIGTERM to a benchmark driver unwinds through its `finally` blocks, which stop its servers (they run in
    sessions of their own, so no signal to the driver reaches them) and close its workers, instead of leaving
    them running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class ServerFailed(RuntimeError):
    pass


class RunningServer:
    """A server process with its output in a log file; ready when GET /health answers 200."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"server-{spec.name.replace(' ', '_')}.log"
        self.log = self.log_path.open("w")
        started = time.monotonic()
        self.process = subprocess.Popen(spec.command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, **spec.env}, start_new_session=True)
        self.startup_s = self._wait_ready(started)

    def _wait_ready(self, started: float) -> float:
        while time.monotonic() - started < self.spec.startup_timeout_s:
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.spec.name}: exited ({self.process.returncode}) while starting; "
                                   f"log {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.spec.base_url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise ServerFailed(f"{self.spec.name}: not ready within {self.spec.startup_timeout_s:.0f} s "
                           f"(log {self.log_path})")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def pause(self) -> None:
        """Stops the server's process group until a Spotlight turns to it (see benchmarks/peers/spotlight.py)."""
        signal_group(self.process, signal.SIGSTOP)

    def resume(self) -> None:
        signal_group(self.process, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()  # a paused server would not see the SIGTERM
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def start(spec: ServerSpec, skipped: dict[str, str]) -> RunningServer | None:
    """Starts one server and pauses it, so it takes no CPU from the next one's start or anyone's measurement
    until a Spotlight turns to it; one that cannot start is recorded in `skipped` with the reason."""
    if spec.peer is not None and (reason := PeerHome(spec.peer).unavailable_reason()):
        skipped[spec.name] = reason
        return None
    print(f"starting {spec.name} on port {spec.port} ...", flush=True)
    try:
        server = RunningServer(spec)
    except (ServerFailed, OSError, RuntimeError) as error:
        skipped[spec.name] = str(error).splitlines()[0]
        print(f"  {spec.name}: could not start: {error}", file=sys.stderr, flush=True)
        return None
    print(f"  {spec.name}: ready in {server.startup_s:.0f} s", flush=True)
    server.pause()
    return server

