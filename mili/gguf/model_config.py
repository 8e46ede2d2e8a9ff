"""The ModelConfig of a Qwen3 or Qwen2 GGUF file, and its tensors' Hugging Face names.

llama.cpp's converter (convert_hf_to_gguf.py) writes a checkpoint's config.json as `<arch>.*` metadata keys and
renames its tensors (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`). This module reads them
back: `model_config_from_gguf` gives the ModelConfig that config.json would have given, and `hf_tensor_names` the
Hugging Face name of each GGUF tensor, so the graph loader can go on working in Hugging Face names.

The rules for what a config may say stay in one place, `ModelConfig.from_dict` (its messages are reworded here
to name the GGUF metadata keys), and the tensors a model has and their shapes in another, mili.weights'
`expected_shapes`; this module only translates names. Everything is checked against the file's tensors before
any weight is read: a missing, extra or mis-shaped tensor is a GGUFError naming it.

llama.cpp does not permute the q/k rows of Qwen2/Qwen3 (they use NEOX-style RoPE, rotating halves, as
transformers does), and transformers' GGUF loader does nothing to them either (its row un-permutation is for
llama and mistral only), so the mapping is names only: a tensor holds the same matrix under both names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import ReaderTensor

from mili.config import ConfigError, ModelConfig
from mili.gguf.files import GGUFError, GGUFModel
from mili.weights import expected_shapes

SUPPORTED_ARCHITECTURES = ("qwen3", "qwen2")
MAX_LISTED = 8  # tensors named in one message

# Hugging Face name -> llama.cpp's name (gguf-py's TensorNameMap for MODEL_ARCH.QWEN2 / QWEN3)
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_NAME = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<rest>.+)$")

# config.json field -> the metadata key (after "<arch>.") that carries it, to reword ModelConfig's messages
_CONFIG_KEYS = {
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "head_dim": "attention.key_length",
}
_TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for the Hugging Face tensor `hf_name` of a Qwen2/Qwen3 model."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_NAME.match(hf_name)
    if match is None or match["rest"] not in _LAYER_NAMES:
        raise KeyError(f"no GGUF name for the tensor '{hf_name}'")
    return f"blk.{match['layer']}.{_LAYER_NAMES[match['rest']]}"


def hf_tensor_names(config: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face tensor name, for every tensor a model with `config` has."""
    return {gguf_tensor_name(hf): hf for hf in expected_shapes(config)}


def expected_gguf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GGUF file of `config` must hold, with its shape as GGUFReader reports it: ggml's dimension
    order, fastest first, so a Hugging Face [out, in] matrix is [in, out]."""
    return {gguf_tensor_name(hf): tuple(reversed(shape)) for hf, shape in expected_shapes(config).items()}


@dataclass(frozen=True)
class _Keys:
    """The metadata keys of one architecture."""

    arch: str

    def __call__(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"


def _architecture(model: GGUFModel) -> str:
    arch = model.value("general.architecture", str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{model.name}: 'general.architecture' is {arch!r}; MILI runs "
                        f"{', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} (Qwen3, Qwen2 and Qwen2.5)")
    return arch


def _check_rope_scaling(model: GGUFModel, key: _Keys) -> None:
    scaling = model.value(key("rope.scaling.type"), str, None)
    if scaling not in (None, "none"):
        raise GGUFError(f"{model.name}: '{key('rope.scaling.type')}' is {scaling!r}; MILI supports only unscaled "
                        "RoPE ('none')")
    # Without a type llama.cpp scales linearly by this factor, so a factor alone is scaling too.
    factor = model.value(key("rope.scaling.factor"), float, None)
    if scaling is None and factor not in (None, 0.0, 1.0):
        raise GGUFError(f"{model.name}: '{key('rope.scaling.factor')}' is {factor}; MILI supports only unscaled RoPE")


def _head_dim(model: GGUFModel, key: _Keys, hidden: int, heads: int) -> int:
    """Key and value head size: `attention.key_length` / `.value_length` (written from config.json's head_dim,
    so always for Qwen3), else hidden / heads as llama.cpp takes it (Qwen2); required when that is no integer."""
    default = hidden // heads if heads > 0 and hidden % heads == 0 else ...
    k_len = model.value(key("attention.key_length"), int, default)
    v_len = model.value(key("attention.value_length"), int, default)
    if k_len != v_len:
        raise GGUFError(f"{model.name}: '{key('attention.key_length')}' ({k_len}) and "
                        f"'{key('attention.value_length')}' ({v_len}) differ; Qwen attention has one head size")
    return k_len


def _tensors(model: GGUFModel) -> dict[str, ReaderTensor]:
    tensors: dict[str, ReaderTensor] = {}
    for path, reader in zip(model.paths, model.readers, strict=True):
        for tensor in reader.tensors:
            if tensor.name in tensors:
                raise GGUFError(f"{path.name}: tensor '{tensor.name}' appears twice in the model")
            tensors[tensor.name] = tensor
    return tensors


def _shape(tensor: ReaderTensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape)


def _vocab_size(model: GGUFModel, tensors: dict[str, ReaderTensor]) -> int:
    """The rows of the token embedding (config.json's vocab_size), which the tokenizer must fill exactly."""
    tokens = model.value("tokenizer.ggml.tokens", list, None)
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(_shape(embedding)) != 2:
        if tokens is None:  # nothing else says; the tensor check names the tensor
            raise GGUFError(f"{model.name}: no 2-D tensor 'token_embd.weight' to take the vocabulary size from")
        return len(tokens)
    rows = _shape(embedding)[1]
    if tokens is not None and len(tokens) != rows:
        raise GGUFError(f"{model.name}: 'tokenizer.ggml.tokens' has {len(tokens)} tokens but 'token_embd.weight' has "
                        f"{rows} rows; llama.cpp's converter writes one token per row")
    return rows


def _decimal(value: float) -> float:
    """The shortest decimal that a float32 key rounds from: GGUF stores floats in 32 bits, so config.json's
    rms_norm_eps 1e-06 comes back as 9.99999997e-07; this gives 1e-06 again (the same float32 either way)."""
    return float(str(np.float32(value)))


def _config_dict(model: GGUFModel, arch: str, tensors: dict[str, ReaderTensor]) -> dict[str, Any]:
    """config.json as transformers would write it for this file."""
    key = _Keys(arch)
    raw: dict[str, Any] = {"model_type": arch, "vocab_size": _vocab_size(model, tensors)}
    for field, suffix in _CONFIG_KEYS.items():
        if field in ("rms_norm_eps", "rope_theta"):
            raw[field] = _decimal(model.value(key(suffix), float))
        elif field != "head_dim":
            raw[field] = model.value(key(suffix), int)
    raw["head_dim"] = _head_dim(model, key, raw["hidden_size"], raw["num_attention_heads"])
    raw["tie_word_embeddings"] = "output.weight" not in tensors
    for field, suffix in _TOKEN_KEYS.items():
        raw[field] = model.value(f"tokenizer.ggml.{suffix}", int, None)
    return raw


def _reworded(exc: ConfigError, model: GGUFModel, arch: str) -> GGUFError:
    """ModelConfig's message about config.json, naming the GGUF metadata keys instead of its fields."""
    names = {field: f"{arch}.{suffix}" for field, suffix in _CONFIG_KEYS.items()}
    names |= {field: f"tokenizer.ggml.{suffix}" for field, suffix in _TOKEN_KEYS.items()}
    text = re.sub(r"'(\w+)'", lambda m: f"'{names.get(m[1], m[1])}'", str(exc))
    text = text.replace("config.json field", "metadata key").replace("config.json", "the file")
    return GGUFError(f"{model.name}: {text}")


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_tensors(model: GGUFModel, config: ModelConfig, tensors: dict[str, ReaderTensor] | None = None) -> None:
    """Every tensor `config` needs is in the file with its shape, and no other; a GGUFError names all that
    disagree (shapes in GGUF's order, [in, out] for a matrix)."""
    tensors = _tensors(model) if tensors is None else tensors
    expected = expected_gguf_shapes(config)
    missing = [name for name in expected if name not in tensors]
    extra = sorted(set(tensors) - set(expected))
    misshaped = [f"'{name}' is {list(_shape(tensors[name]))}, expected {list(shape)}"
                 for name, shape in expected.items() if name in tensors and _shape(tensors[name]) != shape]
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} tensor(s) the metadata implies: {_listed(missing)}")
    if misshaped:
        problems.append(f"has {len(misshaped)} tensor(s) of the wrong shape ([in, out] for a matrix, as GGUF "
                        f"orders them): {_listed(misshaped)}")
    if extra:
        problems.append(f"holds {len(extra)} tensor(s) a {config.model_type} model with this metadata does not have: "
                        f"{_listed(extra)}")
    if problems:
        raise GGUFError(f"{model.name} does not match its own metadata: it " + "; it ".join(problems))


def model_config_from_gguf(model: GGUFModel) -> ModelConfig:
    """The ModelConfig of a Qwen3 or Qwen2 GGUF model, checked against its tensors; a GGUFError names the key or
    tensor that MILI cannot run or that disagrees.

    GGUF does not carry `checkpoint_dtype` (left None: a file mixes tensor types), and a Qwen model's
    `pad_token_id` comes from its tokenizer (`tokenizer.ggml.padding_token_id`), which config.json leaves null."""
    arch = _architecture(model)
    _check_rope_scaling(model, _Keys(arch))
    tensors = _tensors(model)
    try:
        config = ModelConfig.from_dict(_config_dict(model, arch, tensors))
    except ConfigError as exc:
        raise _reworded(exc, model, arch) from None
    check_tensors(model, config, tensors)
    return config
