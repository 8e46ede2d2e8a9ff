"""ModelConfig against transformers' Qwen3Config, both config spellings, and every rejection."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from mili.config import ConfigError, GenerationConfig, ModelConfig

V5_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "max_position_embeddings": 2048, "tie_word_embeddings": True, "dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "use_sliding_window": False,
    "layer_types": ["full_attention", "full_attention"],
}


def v4_spelling(config: dict) -> dict:
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype", "layer_types")}
    return old | {"rope_theta": config["rope_parameters"]["rope_theta"], "rope_scaling": None,
                  "torch_dtype": config["dtype"]}


def write_config(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def assert_matches_transformers(ours: ModelConfig, model_dir) -> None:
    ref = AutoConfig.from_pretrained(model_dir)
    assert ours.vocab_size == ref.vocab_size
    assert ours.hidden_size == ref.hidden_size
    assert ours.intermediate_size == ref.intermediate_size
    assert ours.num_hidden_layers == ref.num_hidden_layers
    assert ours.num_attention_heads == ref.num_attention_heads
    assert ours.num_key_value_heads == ref.num_key_value_heads
    assert ours.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert ours.rms_norm_eps == ref.rms_norm_eps
    assert ours.rope_theta == ref.rope_parameters["rope_theta"]
    assert ours.max_position_embeddings == ref.max_position_embeddings
    assert ours.tie_word_embeddings == ref.tie_word_embeddings


def test_test_checkpoints_match_transformers(checkpoint_dir):
    assert_matches_transformers(ModelConfig.from_pretrained(checkpoint_dir), checkpoint_dir)


@pytest.mark.parametrize("spelling", ["v5", "v4"])
def test_both_spellings_read_like_transformers(tmp_path, spelling):
    raw = V5_CONFIG if spelling == "v5" else v4_spelling(V5_CONFIG)
    ours = ModelConfig.from_pretrained(write_config(tmp_path, raw))
    assert_matches_transformers(ours, tmp_path)
    assert ours.rope_theta == 500000.0
    assert ours.checkpoint_dtype == "bfloat16"
    assert ours.gqa_group_size == 2 and ours.q_size == 128 and ours.kv_size == 64
    assert ours.eos_token_ids == (2,)


def test_absent_fields_take_transformers_defaults(tmp_path):
    raw = {k: V5_CONFIG[k] for k in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                                      "num_hidden_layers")} | {"num_attention_heads": 64}
    ours = ModelConfig.from_pretrained(write_config(tmp_path, raw))
    assert_matches_transformers(ours, tmp_path)
    assert ours.num_key_value_heads == 32  # Qwen3Config's default, as odd as it is
    assert ours.checkpoint_dtype is None
    # With fewer heads than that default, the config is inconsistent, here as in transformers.
    write_config(tmp_path, raw | {"num_attention_heads": 4})
    with pytest.raises(ConfigError, match="'num_key_value_heads'"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("change,field", [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"model_type": "qwen2"}, "model_type"),
    ({"architectures": None, "model_type": None}, "architectures"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"hidden_size": 64.5}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"head_dim": 33}, "head_dim"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, "rope_parameters.rope_theta"),
    ({"rope_theta": 10000.0}, "rope_theta"),  # disagrees with rope_parameters
    ({"torch_dtype": "float16"}, "torch_dtype"),  # disagrees with dtype
    ({"dtype": "int8"}, "dtype"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"eos_token_id": 5000}, "eos_token_id"),
])
def test_bad_values_are_rejected_naming_the_field(tmp_path, change, field):
    raw = {k: v for k, v in (V5_CONFIG | change).items() if v is not None}
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_pretrained(write_config(tmp_path, raw))


# Qwen2.5-0.5B-Instruct's config.json as published (transformers 4 spelling): no head_dim, sliding-window fields
# that use_sliding_window: false leaves unused.
QWEN2_5_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
    "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 14,
    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_a_qwen2_config_reads_like_transformers(tmp_path):
    ours = ModelConfig.from_pretrained(write_config(tmp_path, QWEN2_5_CONFIG))
    assert_matches_transformers(ours, tmp_path)
    assert (ours.model_type, ours.head_dim, ours.qkv_bias, ours.qk_norm) == ("qwen2", 64, True, False)
    qwen3 = ModelConfig.from_pretrained(write_config(tmp_path, V5_CONFIG))
    assert (qwen3.model_type, qwen3.qkv_bias, qwen3.qk_norm) == ("qwen3", False, True)
    with_head_dim = ModelConfig.from_pretrained(write_config(tmp_path, QWEN2_5_CONFIG | {"head_dim": 128}))
    assert with_head_dim.head_dim == 128  # as transformers' Qwen2Attention: getattr(config, "head_dim", ...)


@pytest.mark.parametrize("change,message", [
    ({"use_sliding_window": True}, "'use_sliding_window' is true"),
    ({"hidden_size": 900}, "'hidden_size' \\(900\\) must be a multiple of 'num_attention_heads' \\(14\\)"),
    ({"model_type": "qwen3"}, "'architectures' is \\['Qwen2ForCausalLM'\\] but 'model_type' is 'qwen3'"),
    ({"architectures": ["Qwen2ForCausalLM", "Qwen3ForCausalLM"]}, "'architectures'"),
    ({"architectures": None, "model_type": "llama"}, "'model_type' is 'llama'; MILI runs 'qwen3', 'qwen2'"),
])
def test_bad_qwen2_configs_are_refused_naming_the_field(tmp_path, change, message):
    raw = {k: v for k, v in (QWEN2_5_CONFIG | change).items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_pretrained(write_config(tmp_path, raw))


def test_v4_rope_scaling_is_rejected(tmp_path):
    raw = v4_spelling(V5_CONFIG) | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConfigError, match="'rope_scaling'"):
        ModelConfig.from_pretrained(write_config(tmp_path, raw))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_pretrained(tmp_path)


def test_generation_config(checkpoint_dir, tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    ours = GenerationConfig.from_pretrained(checkpoint_dir)
    ref = HFGenerationConfig.from_pretrained(checkpoint_dir)
    assert set(ours.eos_token_ids) == set(ref.eos_token_id)
    assert ours.sampling_defaults == {"temperature": ref.temperature, "top_p": ref.top_p, "top_k": ref.top_k}
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig()  # absent file: no defaults
