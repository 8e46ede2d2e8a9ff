"""The built-in demo model of `mili serve`: written with numpy on first use, a valid Qwen3 checkpoint."""

from __future__ import annotations

from max.dtype import DType

from mili import ModelConfig, Tokenizer, load_weights
from mili.server.demo import demo_model_dir


def test_demo_checkpoint_is_written_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MILI_CACHE_DIR", str(tmp_path))
    folder = demo_model_dir()
    assert folder.parent == tmp_path / "checkpoints"
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert demo_model_dir() == folder and (folder / "model.safetensors").stat().st_mtime == mtime  # cached
    config = ModelConfig.from_pretrained(folder)
    weights = load_weights(folder, config, DType.float32)
    assert len(weights) == 1 + 11 * config.num_hidden_layers + 1
    assert Tokenizer.from_pretrained(folder).encode("Hello, world!") == [9707, 11, 1879, 0]
