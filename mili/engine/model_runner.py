"""The model runner: owns the MAX session, the compiled Qwen3 graph and the KV cache buffer.

    runner = ModelRunner.from_pretrained(model_dir, num_blocks=512)
    logits = runner.run(Batch.from_chunks([SequenceChunk(prompt_ids, 0, blocks)], runner.block_size))

It knows nothing of scheduling: it takes a Batch (flat arrays) and returns float32 logits for the
batch's `logits_indices` rows. The graph is compiled once per process; MAX keeps compiled graphs in its
on-disk cache (~/.cache/modular, or $MODULAR_CACHE_DIR), so a restart with the same shapes loads fast.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from max.driver import CPU, Accelerator, Buffer, Device, accelerator_count
from max.dtype import DType
from max.engine import InferenceSession, Model
from max.graph import DeviceRef

from mili.config import ModelConfig
from mili.dtypes import parse_run_dtype
from mili.engine.batch import Batch
from mili.model.qwen3 import Qwen3GraphSpec, build_qwen3_graph, load_qwen3_weights

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")
# float32 is the CPU default: MAX's CPU matmul runs bf16 at half the fp32 rate for prompts (see the
# closing note of the Qwen3-graph issue and benchmarks/model.py for the measurement).
DEFAULT_DTYPE = {"cpu": DType.float32, "gpu": DType.bfloat16}
DEFAULT_KV_CACHE_BYTES = 1 << 30


def resolve_device(name: str) -> tuple[Device, DeviceRef]:
    """`"cpu"` or `"gpu"` -> (driver device, graph device ref); a GPU request without one is an error."""
    if name == "cpu":
        return CPU(), DeviceRef.CPU()
    if name == "gpu":
        if accelerator_count() == 0:
            raise ValueError("device 'gpu' was asked for, but MAX finds no GPU on this machine; use --device cpu")
        gpu = Accelerator()
        return gpu, DeviceRef.from_device(gpu)
    raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")


def available_memory_bytes() -> int:
    """Memory the OS can still give this process (Linux: MemAvailable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_cache_budget(kv_cache_memory: float, weight_bytes: int) -> int:
    """`--kv-cache-memory`: a byte count (> 1), or a fraction (0, 1] of the memory that will be left once
    the weights (`weight_bytes`) are loaded."""
    if kv_cache_memory <= 0:
        raise ValueError(f"the KV cache memory must be positive (bytes, or a fraction of free memory), "
                         f"got {kv_cache_memory}")
    if kv_cache_memory <= 1:
        return int(max(0, available_memory_bytes() - weight_bytes) * kv_cache_memory)
    return int(kv_cache_memory)


def blocks_for_bytes(spec: Qwen3GraphSpec, kv_cache_bytes: int) -> int:
    """How many KV blocks of `spec`'s shape fit in a byte budget."""
    per_block = spec.cache_shape(1).bytes(spec.dtype.size_in_bytes)
    return kv_cache_bytes // per_block


@dataclass(frozen=True)
class StartupTimes:
    weights_s: float
    compile_s: float  # graph build + compile (or load from MAX's cache) + weight binding


class ModelRunner:
    def __init__(self, model_dir: str | Path, config: ModelConfig, *, dtype: DType, device: str,
                 block_size: int, num_blocks: int) -> None:
        self.model_dir = Path(model_dir)
        self.config = config
        self.device_name = device
        self.device, device_ref = resolve_device(device)
        self.spec = Qwen3GraphSpec(config, dtype=dtype, device=device_ref, block_size=block_size)
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks

        started = time.perf_counter()
        weights = load_qwen3_weights(model_dir, self.spec)
        if device != "cpu":
            weights = {name: buffer.to(self.device) for name, buffer in weights.items()}
        loaded = time.perf_counter()
        log.info("compiling the Qwen3 graph (%d layers, %s, %s); a first compile takes a minute or more, "
                 "MAX's compile cache makes later starts fast", config.num_hidden_layers, dtype, device)
        session = InferenceSession(devices=[self.device])
        self.model: Model = session.load(build_qwen3_graph(self.spec), weights_registry=weights)
        compiled = time.perf_counter()
        self.startup = StartupTimes(weights_s=loaded - started, compile_s=compiled - loaded)
        log.info("model ready: weights %.1f s, compile/load %.1f s", self.startup.weights_s, self.startup.compile_s)

        cache_shape = self.spec.cache_shape(num_blocks)
        self.kv_cache = Buffer(dtype, cache_shape.shape, self.device)
        log.info("KV cache: %d blocks of %d tokens (%.2f GB, %s)", num_blocks, block_size,
                 cache_shape.bytes(dtype.size_in_bytes) / 1e9, dtype)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: DType | str | None = None, device: str = "cpu",
                        block_size: int = 16, num_blocks: int | None = None,
                        kv_cache_bytes: float | None = None) -> ModelRunner:
        """Reads config.json and the weights; sizes the KV cache from `num_blocks`, or from
        `kv_cache_bytes`: bytes, or a fraction (0, 1] of the memory left once the weights are loaded."""
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
        config = ModelConfig.from_pretrained(model_dir)
        run_dtype = DEFAULT_DTYPE[device] if dtype is None else (
            parse_run_dtype(dtype) if isinstance(dtype, str) else dtype)
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        if num_blocks is None:
            probe = Qwen3GraphSpec(config, dtype=run_dtype, block_size=block_size)
            weight_bytes = sum(int(np.prod(shape)) for shape in probe.weight_shapes().values()) * run_dtype.size_in_bytes
            budget = DEFAULT_KV_CACHE_BYTES if kv_cache_bytes is None else kv_cache_budget(kv_cache_bytes, weight_bytes)
            num_blocks = blocks_for_bytes(probe, budget)
            if num_blocks < 1:
                raise ValueError(f"a KV cache of {kv_cache_bytes} bytes holds no block of {block_size} tokens")
        return cls(model_dir, config, dtype=run_dtype, device=device, block_size=block_size, num_blocks=num_blocks)

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def dtype(self) -> DType:
        return self.spec.dtype

    def run(self, batch: Batch) -> np.ndarray:
        """Runs one step: stores the new tokens' K/V in the cache, returns float32 logits [L, vocab]."""
        self._check(batch)
        inputs = [Buffer.from_numpy(a) for a in batch.arrays()]
        if self.device_name != "cpu":
            inputs = [b.to(self.device) for b in inputs]
        (logits,) = self.model.execute(*inputs, self.kv_cache)
        return logits.to(CPU()).to_numpy() if self.device_name != "cpu" else logits.to_numpy()

    def _check(self, batch: Batch) -> None:
        """Host-side checks the kernels would otherwise report less clearly (or, on GPU, not at all)."""
        if batch.num_tokens and (batch.input_ids.min() < 0 or batch.input_ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if batch.num_tokens and batch.positions.max() >= self.spec.rope_positions:
            raise ValueError(f"position {int(batch.positions.max())} is beyond the model's "
                             f"{self.spec.rope_positions} positions")
        if batch.block_tables.size and (batch.block_tables.min() < 0 or batch.block_tables.max() >= self.num_blocks):
            raise ValueError(f"block ids must lie in [0, {self.num_blocks})")
