"""`mili generate` drives the engine: its streamed text is the greedy continuation, dtypes are logged by name,
--quantization int8 reaches the model (and the log says so), and without --model it uses the built-in demo
model, as `mili serve` does."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mili.cli import main
from mili.engine.batch import Batch, SequenceChunk
from mili.engine.model_runner import ModelRunner
from mili.tokenizer import Tokenizer

pytestmark = pytest.mark.slow  # compiles the model graph (cached after the first run)

PROMPT = "The capital of France is"
NEW_TOKENS = 8


def greedy_reference(model_dir, prompt: str, new_tokens: int, quantization: str | None = None) -> str:
    """Argmax decoding on the bare model runner, decoded in one go."""
    tokenizer = Tokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(prompt)
    runner = ModelRunner.from_pretrained(model_dir, num_blocks=4, quantization=quantization)
    blocks = list(range(4))
    chunk, generated = SequenceChunk(ids, 0, blocks), []
    while len(generated) < new_tokens:
        token = int(np.argmax(runner.run(Batch.from_chunks([chunk], runner.block_size))[0]))
        if token in tokenizer.eos_token_ids:
            break
        generated.append(token)
        chunk = SequenceChunk([token], len(ids) + len(generated) - 1, blocks)
    return tokenizer.decode(generated)


def test_generate_streams_the_greedy_text_and_logs_dtypes_by_name(small_checkpoint_dir, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert main(["generate", "--model", str(small_checkpoint_dir), "--prompt", PROMPT,
                 "--max-tokens", str(NEW_TOKENS)]) == 0
    out = capsys.readouterr().out
    assert out == greedy_reference(small_checkpoint_dir, PROMPT, NEW_TOKENS) + "\n"
    messages = [record.getMessage() for record in caplog.records]
    assert any("float32" in m for m in messages)
    assert not any("DType." in m for m in messages), [m for m in messages if "DType." in m]


def test_generate_with_int8_weights_streams_the_int8_runners_text_and_says_so(small_checkpoint_dir, capsys, caplog):
    caplog.set_level(logging.INFO)
    assert main(["generate", "--model", str(small_checkpoint_dir), "--prompt", PROMPT,
                 "--max-tokens", str(NEW_TOKENS), "--quantization", "int8"]) == 0
    out = capsys.readouterr().out
    assert out == greedy_reference(small_checkpoint_dir, PROMPT, NEW_TOKENS, quantization="int8") + "\n"
    # the float32 checkpoint's auto dtype, with int8 weights
    assert any("float32 activations, int8 weights (group 32)" in r.getMessage() for r in caplog.records)


def test_generate_without_a_model_uses_the_demo(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("MILI_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.INFO)
    assert main(["generate", "--prompt", "Hi", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert any("built-in demo model (RANDOM weights" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints" / "mili-demo-qwen3-random" / "model.safetensors").exists()
