"""Model and generation settings read from a Hugging Face Qwen3 or Qwen2/Qwen2.5 checkpoint folder.

`ModelConfig.from_pretrained(dir)` reads `config.json` as transformers 4 and 5 write it
(`rope_theta` or `rope_parameters`, `torch_dtype` or `dtype`) and rejects anything MILI cannot run
with an error naming the field. Defaults for absent fields are transformers' `Qwen3Config` / `Qwen2Config`
defaults, so a config means here what it means there. The two families differ in the attention block: Qwen2
has biases on the q/k/v projections and no per-head q/k norm, Qwen3 the reverse; Qwen2 has no `head_dim`
field (hidden_size / num_attention_heads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# config.json's architecture -> its model_type
SUPPORTED_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen2ForCausalLM": "qwen2"}
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")

# transformers' Qwen3Config / RotaryEmbeddingConfigMixin defaults for fields a config may omit.
_DEFAULTS: dict[str, Any] = {
    "head_dim": 128,
    "num_key_value_heads": 32,  # Qwen3Config's own default, whatever num_attention_heads is
    "rms_norm_eps": 1e-6,
    "rope_theta": 10_000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


class ConfigError(ValueError):
    """A config.json (or generation_config.json) that MILI cannot run; the message names the field."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a model folder needs the config.json written by transformers") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _positive_int(raw: dict[str, Any], name: str, default: Any = None) -> int:
    value = raw.get(name, default)
    if value is None:
        raise ConfigError(f"config.json lacks the required field '{name}'")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"config.json field '{name}' must be a positive integer, got {value!r}")
    return value


def _positive_float(raw: dict[str, Any], name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"config.json field '{name}' must be a positive number, got {value!r}")
    return float(value)


def _token_ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"'{name}' must be a token id or a list of token ids, got {value!r}")
    return tuple(ids)


def _rope_theta(raw: dict[str, Any]) -> float:
    """Reads RoPE settings from either spelling: v4 `rope_theta` + `rope_scaling`, v5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    legacy_theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"config.json field 'rope_parameters' must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(
                f"config.json field 'rope_parameters.rope_type' is {rope_type!r}; MILI supports only "
                "'default' RoPE (no YaRN or other scaling yet)"
            )
        theta = params.get("rope_theta", legacy_theta if legacy_theta is not None else _DEFAULTS["rope_theta"])
        if legacy_theta is not None and float(legacy_theta) != float(theta):
            raise ConfigError(
                f"config.json disagrees with itself: 'rope_theta' is {legacy_theta} but "
                f"'rope_parameters.rope_theta' is {theta}"
            )
        return _positive_float(raw, "rope_parameters.rope_theta", theta)
    if scaling is not None:
        scaling_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if scaling_type != "default":
            raise ConfigError(
                f"config.json field 'rope_scaling' is {scaling!r}; MILI supports only unscaled RoPE"
            )
    theta = legacy_theta if legacy_theta is not None else _DEFAULTS["rope_theta"]
    return _positive_float(raw, "rope_theta", theta)


def _checkpoint_dtype(raw: dict[str, Any]) -> str | None:
    new, old = raw.get("dtype"), raw.get("torch_dtype")
    if new is not None and old is not None and new != old:
        raise ConfigError(f"config.json disagrees with itself: 'dtype' is {new!r} but 'torch_dtype' is {old!r}")
    value = new if new is not None else old
    if value is None:
        return None
    name, field_name = str(value).removeprefix("torch."), "dtype" if new is not None else "torch_dtype"
    if name not in CHECKPOINT_DTYPES:
        raise ConfigError(
            f"config.json field '{field_name}' is {value!r}; expected one of {', '.join(CHECKPOINT_DTYPES)}"
        )
    return name


def _model_type(raw: dict[str, Any]) -> str:
    """The family, 'qwen3' or 'qwen2', from `architectures` and `model_type` (which must agree)."""
    architectures = raw.get("architectures")
    model_type = raw.get("model_type")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if architectures is not None:
        if not isinstance(architectures, list) or not architectures:
            raise ConfigError(f"config.json field 'architectures' must be a non-empty list, got {architectures!r}")
        families = {SUPPORTED_ARCHITECTURES.get(a) for a in architectures}
        if None in families or len(families) != 1:
            raise ConfigError(f"config.json field 'architectures' is {architectures!r}; MILI runs {supported}")
        family = families.pop()
        if model_type is not None and model_type != family:
            raise ConfigError(f"config.json disagrees with itself: 'architectures' is {architectures!r} but "
                              f"'model_type' is {model_type!r}")
        return family
    if model_type is None:
        raise ConfigError("config.json names neither 'architectures' nor 'model_type'; cannot tell it is Qwen3 or "
                          "Qwen2")
    if model_type not in SUPPORTED_ARCHITECTURES.values():
        raise ConfigError(f"config.json field 'model_type' is {model_type!r}; MILI runs "
                          f"{', '.join(repr(t) for t in SUPPORTED_ARCHITECTURES.values())}")
    return model_type


def _check_unsupported_features(raw: dict[str, Any], num_layers: int, model_type: str) -> None:
    if model_type == "qwen3" and raw.get("attention_bias", False):
        raise ConfigError("config.json field 'attention_bias' is true; Qwen3 checkpoints have no attention bias")
    # Qwen2 configs carry sliding_window and max_window_layers even when use_sliding_window is false (unused then)
    if raw.get("use_sliding_window", False):
        raise ConfigError("config.json field 'use_sliding_window' is true; MILI supports only full attention")
    act = raw.get("hidden_act", _DEFAULTS["hidden_act"])
    if act != "silu":
        raise ConfigError(f"config.json field 'hidden_act' is {act!r}; Qwen3 uses 'silu'")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != num_layers:
            raise ConfigError(
                f"config.json field 'layer_types' must list one entry per layer ({num_layers}), got {layer_types!r}"
            )
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ConfigError(f"config.json field 'layer_types' contains {other}; MILI supports only 'full_attention'")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Qwen3 or Qwen2 model: everything the graph builder and the KV cache need."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = _DEFAULTS["rms_norm_eps"]
    rope_theta: float = _DEFAULTS["rope_theta"]
    max_position_embeddings: int = _DEFAULTS["max_position_embeddings"]
    tie_word_embeddings: bool = _DEFAULTS["tie_word_embeddings"]
    checkpoint_dtype: str | None = None  # dtype the weights were saved in, when the config says
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    model_type: str = "qwen3"  # or "qwen2": q/k/v biases instead of the per-head q/k norm

    @property
    def qkv_bias(self) -> bool:
        """Whether the q/k/v projections add a bias (Qwen2, Qwen2.5)."""
        return self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Whether queries and keys get a per-head RMSNorm before RoPE (Qwen3)."""
        return self.model_type == "qwen3"

    @property
    def q_size(self) -> int:
        """Width of the query projection output (heads * head_dim; need not equal hidden_size)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def gqa_group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Reads `model_dir/config.json`."""
        return cls.from_dict(_read_json(Path(model_dir) / "config.json"))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validates a config.json dict; raises ConfigError naming the first bad field."""
        model_type = _model_type(raw)
        vocab = _positive_int(raw, "vocab_size")
        heads = _positive_int(raw, "num_attention_heads")
        kv_heads = _positive_int(raw, "num_key_value_heads", _DEFAULTS["num_key_value_heads"])
        num_layers = _positive_int(raw, "num_hidden_layers")
        if heads % kv_heads != 0:
            raise ConfigError(
                f"config.json field 'num_attention_heads' ({heads}) must be a multiple of "
                f"'num_key_value_heads' ({kv_heads})"
            )
        hidden = _positive_int(raw, "hidden_size")
        if model_type == "qwen2" and "head_dim" not in raw:  # Qwen2Config has none: hidden_size split evenly
            if hidden % heads:
                raise ConfigError(f"config.json field 'hidden_size' ({hidden}) must be a multiple of "
                                  f"'num_attention_heads' ({heads}) in a Qwen2 model")
            head_dim = hidden // heads
        else:
            head_dim = _positive_int(raw, "head_dim", _DEFAULTS["head_dim"])
        if head_dim % 2:
            raise ConfigError(f"config.json field 'head_dim' must be even for rotary embeddings, got {head_dim}")
        _check_unsupported_features(raw, num_layers, model_type)
        tie = raw.get("tie_word_embeddings", _DEFAULTS["tie_word_embeddings"])
        if not isinstance(tie, bool):
            raise ConfigError(f"config.json field 'tie_word_embeddings' must be true or false, got {tie!r}")
        eos_ids = _token_ids(raw.get("eos_token_id"), "eos_token_id")
        bos_ids = _token_ids(raw.get("bos_token_id"), "bos_token_id")
        pad_ids = _token_ids(raw.get("pad_token_id"), "pad_token_id")
        for name, ids in (("eos_token_id", eos_ids), ("bos_token_id", bos_ids), ("pad_token_id", pad_ids)):
            if any(i >= vocab for i in ids):
                raise ConfigError(f"config.json field '{name}' ({list(ids)}) is outside the vocabulary of {vocab}")
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_positive_int(raw, "intermediate_size"),
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_float(raw, "rms_norm_eps", raw.get("rms_norm_eps", _DEFAULTS["rms_norm_eps"])),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=_positive_int(
                raw, "max_position_embeddings", _DEFAULTS["max_position_embeddings"]
            ),
            tie_word_embeddings=tie,
            checkpoint_dtype=_checkpoint_dtype(raw),
            bos_token_id=bos_ids[0] if bos_ids else None,
            eos_token_ids=eos_ids,
            pad_token_id=pad_ids[0] if pad_ids else None,
            model_type=model_type,
        )


@dataclass(frozen=True)
class GenerationConfig:
    """Defaults from `generation_config.json`: stop tokens and the model's suggested sampling settings."""

    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> GenerationConfig:
        """Reads `model_dir/generation_config.json`; a folder without one gets empty defaults."""
        path = Path(model_dir) / "generation_config.json"
        if not path.exists():
            return cls()
        raw = _read_json(path)
        bos = _token_ids(raw.get("bos_token_id"), "generation_config.json bos_token_id")
        pad = _token_ids(raw.get("pad_token_id"), "generation_config.json pad_token_id")
        sampling = {k: raw[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in raw}
        return cls(
            eos_token_ids=_token_ids(raw.get("eos_token_id"), "generation_config.json eos_token_id"),
            bos_token_id=bos[0] if bos else None,
            pad_token_id=pad[0] if pad else None,
            sampling_defaults=sampling,
        )
