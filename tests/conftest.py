"""Shared fixtures: the random-weight test checkpoints (written once, cached across runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mili.checkpoints import TEST_CHECKPOINTS, cached_checkpoint, qwen3_tokenizer_dir


@pytest.fixture(scope="session", params=sorted(TEST_CHECKPOINTS))
def checkpoint_dir(request) -> Path:
    """Each test checkpoint in turn (tied/untied, GQA 1/2/4, head_dim 64/128, fp32 and bf16 on disk)."""
    return cached_checkpoint(request.param)


@pytest.fixture(scope="session")
def small_checkpoint_dir() -> Path:
    return cached_checkpoint("tiny-tied-gqa2-d64")


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return qwen3_tokenizer_dir()
