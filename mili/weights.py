"""Loads a Hugging Face Qwen3 or Qwen2 safetensors checkpoint as it is published.

One `model.safetensors`, or shards listed in `model.safetensors.index.json`. Files are memory-mapped
(MAX's `SafetensorWeights`); each tensor is converted to the run dtype on its own, so at most one
tensor's worth of memory exists twice, never the whole model. A tensor already in the run dtype is
handed over as the mapped file pages, with no copy at all.

Every tensor the model needs must be present with its exact shape; anything missing, extra or
mis-shaped is an error naming the tensor (and both shapes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from max.driver import Buffer
from max.dtype import DType
from max.graph.weights import SafetensorWeights
from safetensors import SafetensorError, safe_open

from mili.config import ModelConfig
from mili.dtypes import convert_buffer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DISK_DTYPES = (DType.float32, DType.float16, DType.bfloat16)
PROGRESS_MIN_BYTES = 256 << 20  # report progress only for checkpoints bigger than this
PROGRESS_INTERVAL_S = 2.0


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or cannot be read; the message names the tensor or file."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({exc!r})") from None
        missing = [n for n in names if not (model_dir / n).exists()]
        if missing:
            raise CheckpointError(f"{index_path} lists shard(s) that are not in {model_dir}: {', '.join(missing)}")
        return [model_dir / n for n in names]
    single = model_dir / SINGLE_FILE
    if single.exists():
        return [single]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Qwen3 (or Qwen2) checkpoint must hold, by its Hugging Face name, with its shape."""
    h, d = config.hidden_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (config.q_size, h),
            f"{p}.self_attn.k_proj.weight": (config.kv_size, h),
            f"{p}.self_attn.v_proj.weight": (config.kv_size, h),
            f"{p}.self_attn.o_proj.weight": (h, config.q_size),
        }
        if config.qkv_bias:
            shapes |= {f"{p}.self_attn.q_proj.bias": (config.q_size,), f"{p}.self_attn.k_proj.bias": (config.kv_size,),
                       f"{p}.self_attn.v_proj.bias": (config.kv_size,)}
        if config.qk_norm:
            shapes |= {f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)}
        shapes |= {
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (config.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": (config.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": (h, config.intermediate_size),
        }
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


class _Progress:
    """Logs 'loaded x of y' at most every PROGRESS_INTERVAL_S for big checkpoints."""

    def __init__(self, total_tensors: int, enabled: bool) -> None:
        self.total = total_tensors
        self.enabled = enabled
        self.start = self.last = time.monotonic()
        self.done = 0
        self.bytes = 0

    def step(self, nbytes: int) -> None:
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last >= PROGRESS_INTERVAL_S:
            self.last = now
            log.info("loading weights: %d/%d tensors, %.2f GB", self.done, self.total, self.bytes / 1e9)

    def finish(self) -> None:
        log.info(
            "loaded %d weight tensors (%.2f GB) in %.1fs", self.done, self.bytes / 1e9, time.monotonic() - self.start
        )


def _open(files: list[Path]) -> SafetensorWeights:
    # The safetensors library checks each header against the file (offsets within bounds, file fully
    # covered); MAX's reader does not, and would map a truncated file and read past its end.
    for path in files:
        try:
            with safe_open(path, framework="numpy"):
                pass
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from None
    return SafetensorWeights(files)


def _check_names(available: set[str], expected: dict[str, tuple[int, ...]], config: ModelConfig) -> None:
    missing = sorted(set(expected) - available)
    if missing:
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensor(s) the config requires, e.g. '{missing[0]}' "
            f"(shape {expected[missing[0]]}): {missing[:8]}"
        )
    extra = available - set(expected)
    if config.tie_word_embeddings:
        extra.discard("lm_head.weight")  # some exports keep a copy of the tied embedding; it is the same tensor
    if extra:
        raise CheckpointError(
            f"checkpoint holds {len(extra)} tensor(s) a {config.model_type} model with this config does not have, "
            f"e.g. '{min(extra)}': {sorted(extra)[:8]}"
        )


def iter_weights(model_dir: str | Path, config: ModelConfig, dtype: DType) -> Iterator[tuple[str, Buffer]]:
    """Yields (name, host Buffer in `dtype`) for every tensor of the model, one at a time."""
    files = checkpoint_files(model_dir)
    weights = _open(files)
    expected = expected_shapes(config)
    _check_names({name for name, _ in weights.items()}, expected, config)
    total_bytes = sum(f.stat().st_size for f in files)
    progress = _Progress(len(expected), enabled=total_bytes >= PROGRESS_MIN_BYTES)
    for name, shape in expected.items():
        try:
            data = weights[name].data().to_buffer()
        except ValueError as exc:
            raise CheckpointError(f"cannot read tensor '{name}' from {files}: {exc}") from None
        if tuple(data.shape) != shape:
            raise CheckpointError(f"tensor '{name}' has shape {tuple(data.shape)} in the checkpoint, expected {shape}")
        if data.dtype not in DISK_DTYPES:
            raise CheckpointError(f"tensor '{name}' is stored as {data.dtype}; expected bfloat16, float16 or float32")
        converted = convert_buffer(data, dtype)
        progress.step(converted.num_elements * dtype.size_in_bytes)
        yield name, converted
    progress.finish()


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: DType = DType.float32) -> dict[str, Buffer]:
    """All tensors of the model as host Buffers in `dtype`, keyed by Hugging Face name."""
    return dict(iter_weights(model_dir, config, dtype))
