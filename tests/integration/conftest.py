"""Model runners and transformers references shared by the integration tests (one compile per config)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from mili.engine.model_runner import ModelRunner
from mili.checkpoints import TEST_CHECKPOINTS, cached_checkpoint
from tests.gguf_files import cached_gguf

NUM_BLOCKS = 192
# GGUF files (checkpoint:type recipe, tests/gguf_files.py) run beside the checkpoints: every supported tensor type
# somewhere, fused q/k/v and gate/up of mixed types, Qwen3 untied and Qwen2 tied.
GGUF_FILES = ["tiny-untied-gqa2-h256:mixed", "tiny-qwen2-tied-gqa2-d64:mixed"]
FP32_CHECKPOINTS = sorted(name for name, spec in TEST_CHECKPOINTS.items() if spec.dtype == "float32") + GGUF_FILES
BF16_CHECKPOINT = next(name for name, spec in TEST_CHECKPOINTS.items() if spec.dtype == "bfloat16")


@dataclass
class ModelPair:
    """MILI's runner and transformers' model for one checkpoint."""

    name: str
    path: Path  # the checkpoint folder, or the GGUF file
    runner: ModelRunner
    reference: PreTrainedModel  # Qwen3ForCausalLM or Qwen2ForCausalLM, float64 on CPU

    def reference_logits(self, token_ids: np.ndarray) -> np.ndarray:
        """transformers' logits at every position of one sequence, float64."""
        with torch.no_grad():
            return self.reference(torch.tensor(np.asarray(token_ids)[None], dtype=torch.long)).logits[0].numpy()


class BlockAllocator:
    """Hands out distinct, shuffled KV block ids so sequences never share pages by accident."""

    def __init__(self, num_blocks: int, seed: int | None = None) -> None:
        self.free = list(np.random.default_rng(seed).permutation(num_blocks))

    def take(self, tokens: int, block_size: int) -> list[int]:
        count = -(-tokens // block_size)
        if count > len(self.free):
            raise RuntimeError("test ran out of KV blocks; raise NUM_BLOCKS")
        taken, self.free = self.free[:count], self.free[count:]
        return [int(b) for b in taken]


@functools.cache
def model_pair(name: str) -> ModelPair:
    """MILI in float32 beside transformers in float64, for one test checkpoint or GGUF file ("checkpoint:recipe",
    which transformers dequantizes with gguf-py as it loads it), built once per session. A GGUF file runs with
    float activations here, its weights multiplied exactly as gguf-py dequantizes them, so that it meets the same
    bounds as a checkpoint (test_gguf_models.py runs its default: 4-bit tensors with int8 activations)."""
    if ":" in name:
        path = cached_gguf(*name.split(":"))
        reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float64)
    else:
        path = cached_checkpoint(name)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    runner = ModelRunner.from_pretrained(path, dtype="float32", num_blocks=NUM_BLOCKS, float_activations=":" in name)
    return ModelPair(name, path, runner, reference.eval())


@pytest.fixture(scope="session", params=FP32_CHECKPOINTS)
def fp32_pair(request) -> ModelPair:
    """Each float32 test checkpoint in turn."""
    return model_pair(request.param)


@pytest.fixture(scope="session")
def bf16_runner() -> ModelRunner:
    """The bfloat16 checkpoint run in bfloat16."""
    return ModelRunner.from_pretrained(cached_checkpoint(BF16_CHECKPOINT), dtype="bfloat16", num_blocks=NUM_BLOCKS)


@pytest.fixture(scope="session")
def bf16_checkpoint_fp32_runner() -> ModelRunner:
    """The same bfloat16 checkpoint run in float32 (the bf16 run's reference); its graph is the float32
    graph of the same-shaped float32 checkpoint, so MAX's compile cache serves it."""
    return ModelRunner.from_pretrained(cached_checkpoint(BF16_CHECKPOINT), dtype="float32", num_blocks=NUM_BLOCKS)
