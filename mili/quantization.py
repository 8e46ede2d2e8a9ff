"""The user-facing choice of weight format (`--quantization`, `LLM(..., quantization=...)`), and how a
run's formats are named in logs and /status.

    parse_quantization("int8")  -> WeightFormat.INT8   (int8 weight-only, a float16 scale per group of 32 inputs)
    parse_quantization("int4")  -> WeightFormat.INT4   (4-bit codes, a float16 scale and offset per 32 inputs)
    parse_quantization(None)    -> None                (the graph spec's default, see Qwen3GraphSpec)
    describe_run(spec)          -> "bfloat16 activations, int8 weights (group 32)"

Only the flag's names live here; what each format is lives in mili/model/packed_linear.py, and which format
an unquantized run gets (packed bf16 for bfloat16 on CPU, dense otherwise) in Qwen3GraphSpec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mili.model.packed_linear import WeightFormat

if TYPE_CHECKING:
    from mili.model.qwen3 import Qwen3GraphSpec

NONE = "none"
# --quantization choice -> the weight format it asks for (None: the spec's default for the run dtype)
_FORMATS: dict[str, WeightFormat | None] = {NONE: None, "int8": WeightFormat.INT8, "int4": WeightFormat.INT4}
QUANTIZATIONS = tuple(_FORMATS)


def parse_quantization(value: str | None) -> WeightFormat | None:
    """`"int8"` / `"int4"` -> WeightFormat.INT8 / INT4; `"none"` or None -> None; anything else is a ValueError
    naming the choices."""
    key = NONE if value is None else value.lower()
    if key not in _FORMATS:
        raise ValueError(f"unsupported quantization {value!r}: choose {', '.join(QUANTIZATIONS[:-1])} or "
                         f"{QUANTIZATIONS[-1]}")
    return _FORMATS[key]


def weight_group_size(spec: Qwen3GraphSpec) -> int | None:
    """Inputs per scale of int8 or int4 weights, or None when the weights are not quantized."""
    return spec.group_size if spec.weight_format in (WeightFormat.INT8, WeightFormat.INT4) else None


LOW_BIT_FORMATS = (WeightFormat.INT4, WeightFormat.INT4_K, WeightFormat.INT6)


def linear_activations(spec: Qwen3GraphSpec) -> str:
    """What the linear layers' weights meet: "int8" where 4- or 6-bit weights run (activations quantized per row
    per 32 inputs), else the run dtype's name (/status's `activations`)."""
    if spec.weight_format in LOW_BIT_FORMATS and not spec.float_activations:
        return "int8"
    if spec.weight_format is WeightFormat.GGUF and any(leaf.format in LOW_BIT_FORMATS
                                                         for _, s in spec.tensor_formats for leaf in s.leaves()):
        return "int8"
    return spec.dtype.name


def describe_weights(spec: Qwen3GraphSpec) -> str:
    """`int8 weights (group 32)`, `packed bf16 weights`, `dense float32 weights`, or for a GGUF file `GGUF
    weights as stored, 0.41 GB read per token`."""
    fmt = spec.weight_format
    meeting = ("float activations, each weight decoded exactly" if spec.float_activations else
               "activations quantized to int8 per 32 inputs")
    if fmt is WeightFormat.INT8:
        return f"int8 weights (group {spec.group_size})"
    if fmt is WeightFormat.INT4:
        return f"int4 weights (group {spec.group_size}, 5.0 bits a weight) meeting {meeting}"
    if fmt is WeightFormat.GGUF:
        low_bit = spec.float_activations or linear_activations(spec) == "int8"
        how = f"; its 4- and 6-bit tensors meet {meeting}" if low_bit else ""
        return f"GGUF weights as stored, {spec.weight_bytes_per_token() / 1e9:.2f} GB read per token{how}"
    return "packed bf16 weights" if fmt is WeightFormat.BF16 else f"dense {spec.dtype.name} weights"


def describe_run(spec: Qwen3GraphSpec) -> str:
    """The run dtype and the weight format in words, for startup logs."""
    return f"{spec.dtype.name} activations, {describe_weights(spec)}"
