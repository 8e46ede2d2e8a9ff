"""Shared fixtures: the random-weight test checkpoints (written once, cached across runs), and the seed of
every randomised test (printed; replay one with MILI_TEST_SEED=<seed>)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
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


@pytest.fixture
def seed(request) -> int:
    """A fresh seed for each test, or MILI_TEST_SEED to replay one; printed (pytest shows it on failure)."""
    value = int(os.environ.get("MILI_TEST_SEED") or secrets.randbits(32))
    print(f"{request.node.nodeid}: seed {value} (replay with MILI_TEST_SEED={value})")
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
