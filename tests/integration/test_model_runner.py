"""The model runner's contract beyond numerics: clear errors for bad batches, devices and sizes; examples run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from max.driver import accelerator_count

from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.model_runner import ModelRunner, resolve_device
from tests.integration.conftest import NUM_BLOCKS, model_pair
from tests.integration.helpers import run_chunk

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = "tiny-tied-gqa2-d64"


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return model_pair(CHECKPOINT).runner


@pytest.mark.parametrize("chunk, message", [
    (SequenceChunk([151936], 0, [0]), r"token ids must lie in \[0, 151936\)"),
    (SequenceChunk([5], 0, [NUM_BLOCKS]), rf"block ids must lie in \[0, {NUM_BLOCKS}\)"),
    (SequenceChunk([5], 40960, [0] * 2561), "position 40960 is beyond the model's 40960 positions"),
])
def test_bad_batches_fail_clearly_and_the_runner_goes_on(runner: ModelRunner, chunk, message):
    with pytest.raises(ValueError, match=message):
        runner.run(Batch.from_chunks([chunk], runner.block_size))
    logits = run_chunk(runner, [1, 2, 3], 0, [0], LogitRows.LAST)
    assert logits.shape == (1, runner.config.vocab_size) and np.isfinite(logits).all()


def test_kv_cache_sizing(runner: ModelRunner):
    assert runner.num_blocks == NUM_BLOCKS
    c = runner.config
    per_block = c.num_hidden_layers * 2 * c.num_key_value_heads * runner.block_size * c.head_dim * 4
    with pytest.raises(ValueError, match="give num_blocks or kv_cache_bytes, not both"):
        ModelRunner.from_pretrained(model_pair(CHECKPOINT).path, num_blocks=4, kv_cache_bytes=per_block)
    with pytest.raises(ValueError, match="holds no block"):
        ModelRunner.from_pretrained(model_pair(CHECKPOINT).path, kv_cache_bytes=per_block - 1)


def test_unknown_or_missing_devices_are_named():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if accelerator_count() == 0:
        with pytest.raises(ValueError, match="finds no GPU"):
            resolve_device("gpu")


@pytest.mark.parametrize("script", ["graph_api.py", "prefill_decode.py"])
def test_examples_run(runner: ModelRunner, script: str):
    """The README's examples, on the small checkpoint (its graph is already in MAX's compile cache)."""
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(model_pair(CHECKPOINT).path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example printed nothing"


def test_cli_generate_streams_the_greedy_continuation(runner: ModelRunner, capsys):
    from mili.cli import main
    from mili.tokenizer import Tokenizer
    from tests.integration.conftest import BlockAllocator
    from tests.integration.helpers import greedy_generate

    path = model_pair(CHECKPOINT).path
    tokenizer = Tokenizer.from_pretrained(path)
    prompt = "The quick brown fox"
    ids = np.array(tokenizer.encode(prompt))
    expected, _ = greedy_generate(runner, ids, 8, BlockAllocator(NUM_BLOCKS).take(len(ids) + 8, 16))
    expected = expected[:next((i for i, t in enumerate(expected) if t in tokenizer.eos_token_ids), 8)]
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"


def test_cli_generate_names_bad_flags(tmp_path):
    from mili.cli import main

    with pytest.raises(SystemExit, match="--max-tokens must be at least 1"):
        main(["generate", "--model", str(model_pair(CHECKPOINT).path), "--prompt", "hi", "--max-tokens", "0"])
    with pytest.raises(SystemExit, match="--model .* no such folder"):
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])


def test_kv_cache_from_a_fraction_of_free_memory(monkeypatch):
    from mili.engine import model_runner
    from mili.engine.model_runner import available_memory_bytes, kv_cache_budget

    assert 0 < available_memory_bytes()
    free = 20_000_000_000  # pinned: the real figure moves while other tests allocate and free
    monkeypatch.setattr(model_runner, "available_memory_bytes", lambda: free)
    assert kv_cache_budget(0.5, weight_bytes=0) == free // 2
    assert kv_cache_budget(0.5, weight_bytes=free) == 0
    assert kv_cache_budget(3e9, weight_bytes=0) == 3_000_000_000
    with pytest.raises(ValueError, match="must be positive"):
        kv_cache_budget(0, weight_bytes=0)
