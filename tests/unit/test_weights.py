"""Weight loading against the tensors transformers saved, every disk/run dtype pair, shards, and bad checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
import struct

import numpy as np
import pytest
import torch
from max.dtype import DType
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from mili import weights as weights_module
from mili.config import ModelConfig
from mili.dtypes import to_numpy_f32
from mili.weights import CheckpointError, checkpoint_files, expected_shapes, load_weights

RUN_DTYPES = {DType.float32: torch.float32, DType.bfloat16: torch.bfloat16}


def reference_state_dict(model_dir) -> dict[str, torch.Tensor]:
    """What transformers itself loads (tied lm_head resolved), as saved on disk."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_weights_equal(loaded: dict, reference: dict[str, torch.Tensor], run_dtype: DType, tied: bool) -> None:
    expected_names = set(reference) - ({"lm_head.weight"} if tied else set())
    assert set(loaded) == expected_names
    for name, buffer in loaded.items():
        assert buffer.dtype == run_dtype, name
        want = reference[name].to(RUN_DTYPES[run_dtype]).float().numpy()  # torch's own conversion
        np.testing.assert_array_equal(to_numpy_f32(buffer), want, err_msg=name)


@pytest.mark.parametrize("run_dtype", sorted(RUN_DTYPES, key=str))
def test_loads_exactly_what_transformers_saved(checkpoint_dir, run_dtype):
    config = ModelConfig.from_pretrained(checkpoint_dir)
    loaded = load_weights(checkpoint_dir, config, run_dtype)
    assert_weights_equal(loaded, reference_state_dict(checkpoint_dir), run_dtype, config.tie_word_embeddings)


@pytest.fixture(scope="module")
def reference_model(small_checkpoint_dir):
    return Qwen3ForCausalLM.from_pretrained(small_checkpoint_dir, dtype=torch.float32)


def save_variant(model, small_checkpoint_dir, out_dir, dtype=torch.float32, **save_kwargs):
    model.to(dtype).save_pretrained(out_dir, **save_kwargs)
    model.to(torch.float32)
    shutil.copyfile(small_checkpoint_dir / "generation_config.json", out_dir / "generation_config.json")
    return out_dir


@pytest.mark.parametrize("disk_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("run_dtype", sorted(RUN_DTYPES, key=str))
def test_half_precision_on_disk_converts_like_torch(reference_model, small_checkpoint_dir, tmp_path,
                                                    disk_dtype, run_dtype):
    model_dir = save_variant(reference_model, small_checkpoint_dir, tmp_path, disk_dtype)
    config = ModelConfig.from_pretrained(model_dir)
    assert config.checkpoint_dtype == str(disk_dtype).removeprefix("torch.")
    assert_weights_equal(load_weights(model_dir, config, run_dtype), reference_state_dict(model_dir),
                         run_dtype, tied=True)


def test_sharded_checkpoint(reference_model, small_checkpoint_dir, tmp_path):
    model_dir = save_variant(reference_model, small_checkpoint_dir, tmp_path, max_shard_size="4MB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (model_dir / "model.safetensors").exists()
    assert checkpoint_files(model_dir) == sorted(model_dir / s for s in shards)
    config = ModelConfig.from_pretrained(model_dir)
    assert_weights_equal(load_weights(model_dir, config, DType.float32), reference_state_dict(model_dir),
                         DType.float32, tied=True)


def test_tied_checkpoint_with_a_redundant_lm_head_copy_loads(small_checkpoint_dir, tmp_path):
    shutil.copytree(small_checkpoint_dir, tmp_path, dirs_exist_ok=True)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = ModelConfig.from_pretrained(tmp_path)
    assert "lm_head.weight" not in load_weights(tmp_path, config)


def test_big_checkpoints_report_progress(small_checkpoint_dir, monkeypatch, caplog):
    monkeypatch.setattr(weights_module, "PROGRESS_MIN_BYTES", 0)
    monkeypatch.setattr(weights_module, "PROGRESS_INTERVAL_S", 0.0)
    config = ModelConfig.from_pretrained(small_checkpoint_dir)
    with caplog.at_level(logging.INFO, logger="mili.weights"):
        load_weights(small_checkpoint_dir, config)
    progress = [r.message for r in caplog.records if r.message.startswith("loading weights:")]
    assert len(progress) == len(expected_shapes(config))
    assert progress[-1].startswith(f"loading weights: {len(progress)}/{len(progress)} tensors")
    assert any(r.message.startswith(f"loaded {len(progress)} weight tensors") for r in caplog.records)


# ----------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def broken_copy(small_checkpoint_dir, tmp_path):
    """A writable copy of the small checkpoint and its config, to damage."""
    shutil.copytree(small_checkpoint_dir, tmp_path, dirs_exist_ok=True)
    return tmp_path, ModelConfig.from_pretrained(tmp_path)


def rewrite_tensors(model_dir, edit) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_no_weight_files(broken_copy):
    model_dir, config = broken_copy
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_weights(model_dir, config)


def test_index_naming_a_missing_shard(broken_copy):
    model_dir, config = broken_copy
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_weights(model_dir, config)


def test_corrupt_header(broken_copy):
    model_dir, config = broken_copy
    data = (model_dir / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    garbage = b"{" + b"x" * (header_len - 1)
    (model_dir / "model.safetensors").write_bytes(data[:8] + garbage + data[8 + header_len:])
    with pytest.raises(CheckpointError, match="cannot read safetensors file.*model.safetensors"):
        load_weights(model_dir, config)


def test_truncated_file(broken_copy):
    model_dir, config = broken_copy
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(model_dir, config)


def test_wrong_shape_names_tensor_and_both_shapes(broken_copy):
    model_dir, config = broken_copy
    name = "model.layers.1.self_attn.k_proj.weight"
    rewrite_tensors(model_dir, lambda t: t.__setitem__(name, torch.zeros(config.kv_size + 1, config.hidden_size)))
    expected = f"tensor '{name}' has shape ({config.kv_size + 1}, {config.hidden_size}) in the checkpoint, " \
               f"expected ({config.kv_size}, {config.hidden_size})"
    with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_weights(model_dir, config)


def test_missing_tensor_is_named(broken_copy):
    model_dir, config = broken_copy
    rewrite_tensors(model_dir, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*'model.layers.0.mlp.up_proj.weight'"):
        load_weights(model_dir, config)


def test_extra_tensor_is_named(broken_copy):
    model_dir, config = broken_copy
    rewrite_tensors(model_dir, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(4)))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.q_proj.bias'"):
        load_weights(model_dir, config)


def test_untied_config_needs_lm_head(broken_copy):
    model_dir, _ = broken_copy
    raw = json.loads((model_dir / "config.json").read_text()) | {"tie_word_embeddings": False}
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="'lm_head.weight'"):
        load_weights(model_dir, ModelConfig.from_pretrained(model_dir))


def test_integer_tensor_is_rejected(broken_copy):
    model_dir, config = broken_copy
    rewrite_tensors(model_dir, lambda t: t.__setitem__("model.norm.weight", torch.ones(config.hidden_size,
                                                                                      dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is stored as"):
        load_weights(model_dir, config)
