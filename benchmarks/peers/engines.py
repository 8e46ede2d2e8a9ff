"""How each engine is started for a benchmark, in its best documented CPU configuration, with the same number of
threads for all (every core of the machine):
- MILI: mili.LLM in MILI's own environment (float32 / bfloat16 / int8 weights);
- vLLM CPU: vllm.LLM, its CPU threads bound to every core (VLLM_CPU_OMP_THREADS_BIND; the default keeps one
  core of two for itself), tcmalloc and Intel OpenMP preloaded as its docs advise;
- transformers: AutoModelForCausalLM.generate;
- vLLM and transformers compute in torch: batched work (offline, serving, prefix) runs them in
  batched_peer_dtype(), their faster dtype on this CPU; batch-1 latency runs bfloat16 rows, and float32 rows too
  (vLLM's only where bf16 is emulated: reading half the bytes can win where compute does not);
- llama.cpp: llama-bench / llama-server (benchmarks/peers/llama_cpp.py).
A peer that is not set up is skipped with the reason (PeerHome.unavailable_reason)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from safetensors import safe_open

from benchmarks.machine import cpu_flags
from benchmarks.peers.home import PeerHome
from benchmarks.peers.workers import WorkerSpec
from mili.weights import checkpoint_files

THREADS = os.cpu_count() or 1
SHORT_DTYPE = {"bfloat16": "bf16", "float32": "fp32"}
MILI_CONFIGS = {"float32": ("float32", "none"), "bfloat16": ("bfloat16", "none"), "int8": ("bfloat16", "int8"),
                "int4": ("bfloat16", "int4")}


def mili_worker(model: Path, config: str, kv_cache_bytes: int, prefix_cache: bool = False) -> WorkerSpec:
    dtype, quantization = MILI_CONFIGS[config]
    return WorkerSpec(f"MILI {config}", Path(sys.executable), "mili_worker.py",
                      [str(model), dtype, quantization, str(kv_cache_bytes), "1" if prefix_cache else "0"])


def mili_gguf_worker(path: Path, fmt: str, kv_cache_bytes: int) -> WorkerSpec:
    """MILI running a GGUF file of format `fmt` as stored (bfloat16 activations, the file's own types)."""
    return WorkerSpec(f"MILI GGUF {fmt}", Path(sys.executable), "mili_worker.py",
                      [str(path), "bfloat16", "none", str(kv_cache_bytes), "0"])


def batched_peer_dtype() -> str:
    """The dtype in which torch (under vLLM and transformers) multiplies batches fastest on this CPU: bfloat16
    where the CPU has bf16 dot products (AVX512_BF16 or AMX), float32 elsewhere. Without them torch's bfloat16
    linear is emulated: measured on a Zen 3 (AVX2), F.linear 256x1024 @ 1024x3072 ran 20 GFLOP/s in bfloat16
    against 140 in float32, which made vLLM bf16's prefill 18 tok/s against MILI's 120."""
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


def kv_gib_for(dtype: str, bf16_gib: int) -> int:
    """The KV-cache budget, in GiB, that holds as many tokens as `bf16_gib` does in bfloat16. Budgets are equal in
    tokens: an engine whose cache is float32 (vLLM or MAX running float32) gets twice the bytes, not half the
    tokens (vLLM fp32 with the same 2 GiB as MILI held 9,300 tokens, fewer than 32 offline requests need at once,
    and its throughput fell from 32-34 to 26 output tok/s)."""
    return bf16_gib * (2 if dtype == "float32" else 1)


def vllm_env(kv_cache_gib: int) -> dict[str, str]:
    home = PeerHome("vllm")
    preload = [str(p) for p in (tcmalloc(), *home.venv.glob("lib/libiomp5.so")) if p]
    # VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS: the engine core gives a model step 300 s of wall time by default; a step
    # in flight while the Spotlight pauses vLLM for another engine's turn outlived that (EngineDeadError on resume).
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}", "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": str(7 * 24 * 3600),
            "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "LD_PRELOAD": ":".join(preload)}


def tcmalloc() -> Path | None:
    return next(iter(Path("/usr/lib").glob("*/libtcmalloc_minimal.so.4")), None)


def vllm_worker(model: Path, kv_cache_gib: int, dtype: str, prefix_cache: bool = False) -> WorkerSpec:
    """vLLM's offline engine with the KV cache that holds as many tokens as `kv_cache_gib` of bfloat16."""
    return WorkerSpec(f"vLLM {SHORT_DTYPE[dtype]}", PeerHome("vllm").python, "vllm_worker.py",
                      [str(model), dtype, "1" if prefix_cache else "0"],
                      env=vllm_env(kv_gib_for(dtype, kv_cache_gib)))


def transformers_worker(model: Path, dtype: str, batch: int = 16) -> WorkerSpec:
    return WorkerSpec(f"transformers {SHORT_DTYPE[dtype]}", PeerHome("transformers").python,
                      "transformers_worker.py", [str(model), dtype, str(THREADS), str(batch)])


def runnable(peer: str, specs: list[WorkerSpec], skipped: dict[str, str]) -> list[WorkerSpec]:
    """`specs` when `peer` is set up; otherwise none, each recorded in `skipped` with the reason."""
    if reason := PeerHome(peer).unavailable_reason():
        skipped.update({spec.name: reason for spec in specs})
        return []
    return specs


def checkpoint_weight_bytes(model: Path, bytes_per_param: float) -> int:
    """Bytes of weights a decode step reads at `bytes_per_param`: every tensor of the checkpoint but an untied
    embedding table (the step gathers one row of it; a tied one is read in full as the LM head)."""
    counts = checkpoint_parameter_counts(model)
    has_head = any(name.startswith("lm_head") for name in counts)
    return int(sum(n for name, n in counts.items() if not (has_head and "embed_tokens" in name)) * bytes_per_param)


def checkpoint_parameter_counts(model: Path) -> dict[str, int]:
    """Each tensor's element count, from the safetensors headers alone."""
    counts: dict[str, int] = {}
    for path in checkpoint_files(model):
        with safe_open(path, "numpy") as f:  # reads the header only
            counts.update({name: math.prod(f.get_slice(name).get_shape()) for name in f.keys()})  # noqa: SIM118 (not a dict)
    return counts
