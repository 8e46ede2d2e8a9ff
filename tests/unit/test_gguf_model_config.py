"""ModelConfig from a GGUF file's metadata, checked against its tensors, and the GGUF -> Hugging Face tensor names.

The test checkpoints converted as llama.cpp's converter would (tests.gguf_files) must give the ModelConfig their
config.json gives. Every way a file can disagree with itself, or ask for what MILI cannot run, is a small file
written here with GGUFWriter directly (one layer, tiny tensors) and must be a GGUFError naming the key or tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from mili.checkpoints import QWEN3_BOS_TOKEN_ID, cached_checkpoint
from mili.config import ModelConfig
from mili.gguf.files import GGUFError, GGUFModel
from mili.gguf.model_config import hf_tensor_names, model_config_from_gguf
from mili.weights import expected_shapes
from tests.gguf_files import (FF, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, TYPE_RECIPES, VOCAB, cached_gguf, q4_k_m_rule,
                              tiny_metadata, tiny_tensors, write_tiny)

T = gguf.GGMLQuantizationType
FAMILIES = ["tiny-tied-gqa2-d64", "tiny-untied-mha-d128", "tiny-qwen2-tied-gqa2-d64"]  # qwen3 tied, untied; qwen2

# --- the test checkpoints as llama.cpp writes them ------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def written(request) -> tuple[Path, GGUFModel]:
    """(checkpoint folder, its F32 GGUF file opened); opening a file with Qwen's 151,936 tokens takes seconds."""
    return cached_checkpoint(request.param), GGUFModel.open(cached_gguf(request.param, "f32"))


def assert_config_json_equals(ours: ModelConfig, checkpoint_dir: Path) -> None:
    reference = ModelConfig.from_pretrained(checkpoint_dir)
    # What GGUF cannot carry or carries otherwise: the dtype the weights were saved in (a file mixes types), and
    # the pad token, which config.json leaves null and the converter takes from tokenizer_config.json.
    assert ours.checkpoint_dtype is None and reference.checkpoint_dtype == "float32"
    assert ours.pad_token_id == QWEN3_BOS_TOKEN_ID and reference.pad_token_id is None
    assert dataclasses.replace(ours, checkpoint_dtype="float32", pad_token_id=None) == reference


def test_config_of_a_written_file_is_that_of_config_json(written):
    checkpoint_dir, model = written
    assert_config_json_equals(model_config_from_gguf(model), checkpoint_dir)


def test_tensor_names_map_to_the_checkpoint_tensors_unpermuted(written):
    """Every GGUF tensor is the checkpoint tensor of its Hugging Face name, as it was (no row permutation)."""
    checkpoint_dir, model = written
    names = hf_tensor_names(model_config_from_gguf(model))
    reference = load_file(checkpoint_dir / "model.safetensors")
    tensors = {t.name: t for t in model.readers[0].tensors}
    assert set(tensors) == set(names) and set(names.values()) == set(reference)
    for gguf_name, hf_name in names.items():
        assert tensors[gguf_name].tensor_type == T.F32
        np.testing.assert_array_equal(tensors[gguf_name].data, reference[hf_name], err_msg=gguf_name)


def test_tensor_names_are_those_gguf_py_converts_to(written):
    """The converter names tensors with gguf-py's TensorNameMap; ours must agree for both families."""
    config = model_config_from_gguf(written[1])
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == config.model_type)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for gguf_name, hf_name in hf_tensor_names(config).items():
        assert name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")) == gguf_name


def test_a_quantized_file_has_the_same_config():
    """Tensor shapes are checked in elements, whatever the blocks they are stored in."""
    model = GGUFModel.open(cached_gguf("tiny-qwen2-tied-gqa2-d64", "q8_0"))
    assert_config_json_equals(model_config_from_gguf(model), cached_checkpoint("tiny-qwen2-tied-gqa2-d64"))
    types = {t.name: t.tensor_type for t in model.readers[0].tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == T.Q8_0
    assert types["blk.0.attn_q.bias"] == types["output_norm.weight"] == T.F32
    assert model.value("general.file_type", int) == gguf.LlamaFileType.MOSTLY_Q8_0


# --- the Q4_K_M recipe ----------------------------------------------------------------------------------------

def _q4_k_m_types(config: ModelConfig) -> dict[str, T]:
    """The type Q4_K_M gives each matrix of `config`, by GGUF name."""
    rule, shapes = q4_k_m_rule(config), expected_shapes(config)
    return {name: rule(name, shapes[hf]) for name, hf in hf_tensor_names(config).items() if len(shapes[hf]) == 2}


def test_q4_k_m_follows_llama_quantize():
    # Qwen3-0.6B's shape, 12 layers: llama.cpp counts attn_v/ffn_down in name order (blk.10 before blk.2)
    config = ModelConfig(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    types = _q4_k_m_types(config)
    assert types["token_embd.weight"] == T.Q6_K  # tied: quantized as the output
    six_bit = {i for i in range(12) if types[f"blk.{i}.attn_v.weight"] == T.Q6_K}
    assert six_bit == {i for i in range(12) if types[f"blk.{i}.ffn_down.weight"] == T.Q6_K} == {0, 4, 7, 8, 9, 11}
    assert {types[f"blk.3.{n}.weight"] for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} == {T.Q4_K}


def test_q4_k_m_falls_back_where_rows_are_no_whole_super_blocks():
    config = ModelConfig.from_pretrained(cached_checkpoint("tiny-tied-gqa2-d64"))  # hidden 96, intermediate 160
    types = _q4_k_m_types(config)
    assert types["token_embd.weight"] == T.Q8_0  # output-like with 96 columns
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_v.weight"] == T.Q5_0  # Q4_K's fallback
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == T.Q8_0  # Q6_K's (the last layer)
    assert types["blk.0.attn_output.weight"] == T.Q4_K  # 4 heads x 64 = 256 columns
    untied = _q4_k_m_types(ModelConfig.from_pretrained(cached_checkpoint("tiny-untied-mha-d128")))
    assert untied["output.weight"] == T.Q8_0 and untied["token_embd.weight"] == T.Q5_0


def test_k_quant_recipes_are_written_with_random_blocks():
    pytest.importorskip("tests.gguf_blocks", reason="tests.gguf_blocks (random K-quant blocks) is not there yet")
    assert TYPE_RECIPES["q4_k_m"].k_quants
    model = GGUFModel.open(cached_gguf("tiny-qwen2-tied-gqa2-d64", "q4_k_m"))
    types = {t.name: t.tensor_type for t in model.readers[0].tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_K and types["token_embd.weight"] == T.Q6_K
    assert model_config_from_gguf(model).hidden_size == 256


# --- small hand-written files ---------------------------------------------------------------------------------

def config_of(path: Path) -> ModelConfig:
    return model_config_from_gguf(GGUFModel.open(path))


@pytest.mark.parametrize("arch", ["qwen3", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_tiny_files_read(tmp_path, arch, tied):
    config = config_of(write_tiny(tmp_path / "m.gguf", arch, tensors=tiny_tensors(arch, tied)))
    head_dim = HEAD_DIM if arch == "qwen3" else HIDDEN // HEADS  # Qwen2 files have no key_length: hidden / heads
    assert config == ModelConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=1, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1, eos_token_ids=(2,), model_type=arch)
    assert set(hf_tensor_names(config)) == set(tiny_tensors(arch, tied))


def without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    assert key in mapping
    return {k: v for k, v in mapping.items() if k != key}


BAD_FILES = {
    "unknown architecture": (
        dict(arch="llama", metadata={"llama.block_count": 1}),
        r"'general.architecture' is 'llama'; MILI runs 'qwen3', 'qwen2'"),
    "missing key": (
        dict(metadata=without(tiny_metadata(), "qwen3.attention.head_count")),
        r"lacks the metadata key 'qwen3.attention.head_count'"),
    "missing tensor": (
        dict(tensors=without(tiny_tensors(), "blk.0.attn_k_norm.weight")),
        r"lacks 1 tensor\(s\) the metadata implies: blk.0.attn_k_norm.weight"),
    "mis-shaped tensor": (
        dict(tensors=tiny_tensors() | {"blk.0.ffn_up.weight": (FF + 32, HIDDEN)}),
        r"wrong shape \(\[in, out\] .*\): 'blk.0.ffn_up.weight' is \[32, 96\], expected \[32, 64\]"),
    "extra tensor": (
        dict(tensors=tiny_tensors() | {"blk.0.attn_q.bias": (HEADS * HEAD_DIM,)}),
        r"holds 1 tensor\(s\) a qwen3 model with this metadata does not have: blk.0.attn_q.bias"),
    "extra layer": (
        dict(tensors=tiny_tensors() | {"blk.1.attn_norm.weight": (HIDDEN,)}),
        r"does not have: blk.1.attn_norm.weight"),
    "qwen3 tensors in a qwen2 file": (
        dict(arch="qwen2", tensors=tiny_tensors("qwen3")),
        r"lacks 3 tensor\(s\) the metadata implies: blk.0.attn_q.bias, blk.0.attn_k.bias, blk.0.attn_v.bias; it has "
        r"4 tensor\(s\) of the wrong shape .*; it holds 2 tensor\(s\) a qwen2 model"),
    "head dims disagreeing": (
        dict(metadata=tiny_metadata() | {"qwen3.attention.value_length": 16}),
        r"'qwen3.attention.key_length' \(24\) and 'qwen3.attention.value_length' \(16\) differ"),
    "rope scaling": (
        dict(metadata=tiny_metadata() | {"qwen3.rope.scaling.type": "yarn", "qwen3.rope.scaling.factor": 4.0}),
        r"'qwen3.rope.scaling.type' is 'yarn'; MILI supports only unscaled RoPE"),
    "rope scaling factor alone": (
        dict(metadata=tiny_metadata() | {"qwen3.rope.scaling.factor": 4.0}),
        r"'qwen3.rope.scaling.factor' is 4.0"),
    "heads not a multiple of kv heads": (
        dict(metadata=tiny_metadata() | {"qwen3.attention.head_count": 3, "qwen3.attention.head_count_kv": 2}),
        r"metadata key 'qwen3.attention.head_count' \(3\) must be a multiple of 'qwen3.attention.head_count_kv' \(2\)"),
    "odd head size": (
        dict(metadata=tiny_metadata() | {"qwen3.attention.key_length": 25, "qwen3.attention.value_length": 25}),
        r"metadata key 'qwen3.attention.key_length' must be even for rotary embeddings, got 25"),
    "zero layers": (
        dict(metadata=tiny_metadata() | {"qwen3.block_count": 0}),
        r"metadata key 'qwen3.block_count' must be a positive integer, got 0"),
    "eos outside the vocabulary": (
        dict(metadata=tiny_metadata() | {"tokenizer.ggml.eos_token_id": VOCAB}),
        rf"'tokenizer.ggml.eos_token_id' \(\[{VOCAB}\]\) is outside the vocabulary of {VOCAB}"),
    "qwen2 heads not splitting hidden": (
        dict(arch="qwen2", metadata=tiny_metadata("qwen2") | {"qwen2.attention.head_count": 3,
                                                              "qwen2.attention.head_count_kv": 1}),
        r"lacks the metadata key 'qwen2.attention.key_length'"),
    "tokens not filling the embedding": (
        dict(metadata=tiny_metadata() | {"tokenizer.ggml.tokens": ["a", "b", "c"]}),
        rf"'tokenizer.ggml.tokens' has 3 tokens but 'token_embd.weight' has {VOCAB} rows"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_are_refused_naming_what_is_wrong(tmp_path, case):
    kwargs, message = BAD_FILES[case]
    with pytest.raises(GGUFError, match=message) as raised:
        config_of(write_tiny(tmp_path / "bad.gguf", **kwargs))
    assert str(raised.value).startswith("bad.gguf")
