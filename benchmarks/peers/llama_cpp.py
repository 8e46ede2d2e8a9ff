"""llama.cpp for the benchmarks: a checkpoint converted to GGUF once per weight format (cached beside the build),
llama-bench for batch-1 prefill and decode, llama-server for serving."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.peers.engines import THREADS
from benchmarks.peers.home import PeerHome

FORMATS = ("BF16", "Q8_0", "Q4_0", "Q4_K_M")
HOME = PeerHome("llama.cpp")


def tool(name: str) -> Path:
    return HOME.root / "build" / "bin" / name


def gguf(model: Path, fmt: str) -> Path:
    """The checkpoint as a GGUF of format `fmt`, converted (BF16) or quantized from the BF16 file on first use.
    Cached by the checkpoint's path and the size and time of its weight files."""
    stamp = "".join(f"{p.name}{p.stat().st_size}{p.stat().st_mtime_ns}" for p in sorted(model.glob("*.safetensors")))
    folder = HOME.root / "gguf" / f"{model.name}-{hashlib.sha256((str(model) + stamp).encode()).hexdigest()[:10]}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{fmt}.gguf"
    if target.exists():
        return target
    bf16 = folder / "BF16.gguf"
    if not bf16.exists():
        print(f"llama.cpp: converting {model} to GGUF (BF16) ...", flush=True)
        run([str(HOME.python), str(HOME.root / "convert_hf_to_gguf.py"), str(model), "--outtype", "bf16",
             "--outfile", str(bf16) + ".part"])
        Path(str(bf16) + ".part").rename(bf16)
    if fmt != "BF16":
        print(f"llama.cpp: quantizing to {fmt} ...", flush=True)
        run([str(tool("llama-quantize")), str(bf16), str(target) + ".part", fmt, str(THREADS)])
        Path(str(target) + ".part").rename(target)
    return target


def run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


@dataclass
class BenchResult:
    prefill_s: float  # the whole prompt
    decode_s: float  # per token, after a prompt of the same length


@dataclass
class LoadProbe:
    seconds: float  # llama-bench started, model loaded, one 1-token prompt run, exited
    max_rss_bytes: int


def load_probe(model_gguf: Path) -> LoadProbe:
    """What loading the file costs llama.cpp: the wall time and peak resident memory of a llama-bench run that
    only prefills one token (mmap'd weights count as they are touched, as for MILI's)."""
    started = time.monotonic()
    process = subprocess.Popen([str(tool("llama-bench")), "-m", str(model_gguf), "-t", str(THREADS), "-r", "1",
                                "-p", "1", "-n", "0", "-o", "json"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"llama-bench failed to load {model_gguf} (exit {process.returncode})")
    return LoadProbe(time.monotonic() - started, usage.ru_maxrss * 1024)


def bench(model_gguf: Path, prompt: int, decode: int) -> BenchResult:
    """One llama-bench measurement of each: prefill of `prompt` tokens, and `decode` tokens generated after a
    context of `prompt` tokens (-d), so decode sees the same context length as the other engines'."""
    common = [str(tool("llama-bench")), "-m", str(model_gguf), "-t", str(THREADS), "-r", "1", "-o", "json"]
    prefill = json.loads(run([*common, "-p", str(prompt), "-n", "0"]))
    generate = json.loads(run([*common, "-p", "0", "-n", str(decode), "-d", str(prompt)]))
    return BenchResult(prefill_s=prompt / prefill[0]["avg_ts"], decode_s=1 / generate[0]["avg_ts"])
