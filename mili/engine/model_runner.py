"""The model runner: owns the MAX session, the compiled Qwen3 graph and the KV cache buffer.

    runner = ModelRunner.from_pretrained(model, num_blocks=512)     # a checkpoint folder or a GGUF file
    logits = runner.run(Batch.from_chunks([SequenceChunk(prompt_ids, 0, blocks)], runner.block_size))

It knows nothing of scheduling: it takes a Batch (flat arrays) and returns float32 logits for the
batch's `logits_indices` rows. The graph is compiled once per process; MAX keeps compiled graphs in its
on-disk cache (~/.cache/modular, or $MODULAR_CACHE_DIR), so a restart with the same shapes loads fast.
"""

from __future__ import annotations

import logging
import math
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
from mili.dtypes import resolve_run_dtype
from mili.engine.batch import Batch
from mili.model.packed_linear import WeightFormat
from mili.model.qwen3 import Qwen3GraphSpec, build_qwen3_graph
from mili.model_source import ModelSource
from mili.progress import report_while_slow
from mili.quantization import describe_run, parse_quantization

log = logging.getLogger(__name__)

DEVICES = ("cpu", "gpu")
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


class KvCacheSizeError(ValueError):
    """The KV cache budget cannot be met: not positive, more than the free memory, or too small for one block."""


def available_memory_bytes() -> int:
    """Host memory the OS can still give this process (Linux: MemAvailable).

    Not MAX's `CPU().stats["free_memory"]`: measured on a 25.3 GB machine it said 25.1 GB free while the
    kernel's MemAvailable said 24.0 GB, so it does not see what other processes hold."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def device_free_memory_bytes(device: Device | None) -> int | None:
    """Free memory where the KV cache will live: host memory for the CPU (or None), and for an accelerator
    the device's own free memory as MAX's driver reports it (`Device.stats["free_memory"]` in MAX 26.7),
    never host RAM. None when the driver reports nothing usable."""
    if device is None or device.is_host:
        return available_memory_bytes()
    free = dict(device.stats).get("free_memory")
    return free if isinstance(free, int) and free > 0 else None


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def kv_cache_budget(kv_cache_memory: float, weight_bytes: int, device: Device | None = None) -> int:
    """KV cache bytes for `kv_cache_memory`: a byte count (> 1), or a fraction (0, 1] of the memory that will
    be free on `device` (default: the host) once the weights (`weight_bytes`) are loaded there.

    A byte count larger than that free memory is refused here, before the graph compile: allocating it
    afterwards fails with MAX's out-of-memory abort (or, on the host, sends the machine into swap)."""
    if not (math.isfinite(kv_cache_memory) and kv_cache_memory > 0):
        raise KvCacheSizeError(f"the KV cache memory must be positive (bytes, or a fraction of free memory), "
                               f"got {kv_cache_memory}")
    free = device_free_memory_bytes(device)
    where = "host" if device is None or device.is_host else "GPU"
    if free is None:
        if kv_cache_memory <= 1:
            raise KvCacheSizeError(f"MAX reports no free memory for this {where}, so a fraction of it cannot be "
                                   f"sized; give the KV cache size in bytes")
        return int(kv_cache_memory)
    left = max(0, free - weight_bytes)
    if kv_cache_memory <= 1:
        return int(left * kv_cache_memory)
    if kv_cache_memory > left:
        raise KvCacheSizeError(f"{_gb(kv_cache_memory)} is more than the {_gb(left)} of {where} memory free once "
                               f"the weights ({_gb(weight_bytes)}) are loaded")
    return int(kv_cache_memory)


def runner_spec(config: ModelConfig, *, dtype: DType, block_size: int, device: Device | None = None,
                weights: WeightFormat | None = None, float_activations: bool = False) -> Qwen3GraphSpec:
    """The graph spec a ModelRunner on `device` (default: the host) builds, its weight format resolved. It
    needs config.json only, so the KV cache can be sized and the run described before the compile."""
    device_ref = DeviceRef.CPU() if device is None else DeviceRef.from_device(device)
    return Qwen3GraphSpec(config, dtype=dtype, device=device_ref, block_size=block_size, weights=weights,
                          float_activations=float_activations)


def blocks_for_bytes(spec: Qwen3GraphSpec, kv_cache_bytes: int) -> int:
    """How many KV blocks of `spec`'s shape fit in a byte budget."""
    per_block = spec.cache_shape(1).bytes(spec.dtype.size_in_bytes)
    return kv_cache_bytes // per_block


def kv_cache_blocks(spec: Qwen3GraphSpec, kv_cache_memory: float | None, device: Device | None = None) -> int:
    """KV blocks of `spec`'s shape for `kv_cache_memory` (see kv_cache_budget; None: DEFAULT_KV_CACHE_BYTES)
    on `device`, next to `spec`'s weights in their own format (int8 ~1.06 bytes a weight, bf16 2, float32 4).

    Needs only config.json (runner_spec), so callers can check a budget before the minute-long graph compile."""
    asked = DEFAULT_KV_CACHE_BYTES if kv_cache_memory is None else kv_cache_memory
    budget = kv_cache_budget(asked, spec.weight_bytes(), device)
    num_blocks = blocks_for_bytes(spec, budget)
    if num_blocks < 1:
        per_block = spec.cache_shape(1).bytes(spec.dtype.size_in_bytes)
        nbytes = f"{budget} byte" + ("" if budget == 1 else "s")
        what = f"{asked:g} of the free memory ({nbytes})" if asked <= 1 else nbytes
        raise KvCacheSizeError(f"a KV cache of {what} holds no block of {spec.block_size} tokens (one takes "
                               f"{per_block} bytes for this model)")
    return num_blocks


@dataclass(frozen=True)
class StartupTimes:
    weights_s: float
    compile_s: float  # graph build + compile (or load from MAX's cache) + weight binding


class ModelRunner:
    def __init__(self, source: ModelSource, *, dtype: DType, device: str, block_size: int, num_blocks: int,
                 weights: WeightFormat | None = None, float_activations: bool = False) -> None:
        self.source = source
        self.config = config = source.config
        self.device_name = device
        self.device, _ = resolve_device(device)
        self.spec = source.graph_spec(dtype=dtype, block_size=block_size, device=self.device, weights=weights,
                                      float_activations=float_activations)
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks

        started = time.perf_counter()
        if source.is_gguf:
            log.info("loading %s (%s)", source.path, source.describe())
        weights = source.load_weights(self.spec)
        if device != "cpu":
            weights = {name: buffer.to(self.device) for name, buffer in weights.items()}
        loaded = time.perf_counter()
        log.info("compiling the Qwen3 graph (%d layers, %s, %s); a first compile takes a minute or more, "
                 "MAX's compile cache makes later starts fast", config.num_hidden_layers, describe_run(self.spec),
                 device)
        session = InferenceSession(devices=[self.device])
        # A cold compile is a minute or more with no output of MAX's own; a warm start (seconds) logs nothing here.
        with report_while_slow(log, "still compiling the Qwen3 graph (%d s so far; only the first start of a "
                               "model shape is this slow)"):
            self.model: Model = session.load(build_qwen3_graph(self.spec), weights_registry=weights)
        compiled = time.perf_counter()
        self.startup = StartupTimes(weights_s=loaded - started, compile_s=compiled - loaded)
        log.info("model ready: weights %.1f s, compile/load %.1f s", self.startup.weights_s, self.startup.compile_s)

        cache_shape = self.spec.cache_shape(num_blocks)
        self.kv_cache = Buffer(dtype, cache_shape.shape, self.device)
        log.info("KV cache: %d blocks of %d tokens (%.2f GB, %s)", num_blocks, block_size,
                 cache_shape.bytes(dtype.size_in_bytes) / 1e9, dtype.name)

    @classmethod
    def from_pretrained(cls, model: str | Path | ModelSource, *, dtype: DType | str | None = None,
                        device: str = "cpu", quantization: str | None = None, block_size: int = 16,
                        num_blocks: int | None = None, kv_cache_bytes: float | None = None,
                        float_activations: bool = False) -> ModelRunner:
        """Reads the model (a checkpoint folder, a GGUF file, or an opened ModelSource) and its weights. `dtype`:
        float32, bfloat16, or auto/None (the checkpoint's own on CPU, bfloat16 on GPU: mili.dtypes.resolve_run_dtype);
        `quantization`: none/None, int8 or int4 (mili.quantization; not for GGUF files, which run their own types);
        `float_activations`: 4- and 6-bit weights meet float activations, not int8 ones (--float-activations).
        Sizes the KV cache from `num_blocks`, or from `kv_cache_bytes`: bytes, or a fraction (0, 1] of the memory
        left once the weights are loaded."""
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
        source = model if isinstance(model, ModelSource) else ModelSource.open(model)
        run_dtype = resolve_run_dtype(dtype, checkpoint_dtype=source.checkpoint_dtype, device=device)
        weights = parse_quantization(quantization)
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        if num_blocks is None:
            driver_device = resolve_device(device)[0]
            spec = source.graph_spec(dtype=run_dtype, block_size=block_size, device=driver_device, weights=weights,
                                     float_activations=float_activations)
            num_blocks = kv_cache_blocks(spec, kv_cache_bytes, driver_device)
        return cls(source, dtype=run_dtype, device=device, block_size=block_size, num_blocks=num_blocks,
                   weights=weights, float_activations=float_activations)

    @property
    def model_dir(self) -> Path:
        """The checkpoint folder or GGUF file the model was read from."""
        return self.source.path

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def dtype(self) -> DType:
        return self.spec.dtype

    @property
    def weight_format(self) -> WeightFormat:
        return self.spec.weight_format

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
