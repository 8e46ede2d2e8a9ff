"""A GGUF model's tensors as the Qwen3 graph's weights, each run as its file stores it.

    formats = gguf_tensor_formats(model, config)          # how each packed graph weight is laid out
    spec = Qwen3GraphSpec(config, dtype, weights=WeightFormat.GGUF, tensor_formats=formats)
    registry = load_gguf_weights(model, spec)              # the arrays, for session.load(...)

Every projection, the LM head and the embedding are packed for MILI's linear / embedding ops without losing a
bit (mili/model/packed_linear.py has the layouts):
- F32 / F16 tensors: k-major float32 / float16 panels of the very values; BF16: the bf16 panels;
- 4-bit tensors (Q4_0, Q4_1, Q4_K): 4-bit codes two to a byte with a scale and an offset (Q4_0: zero point 8)
  per 32 inputs, which the op multiplies with activations quantized to int8 per 32 inputs, as llama.cpp does
  (mojo_kernels/linear_int4.mojo); with `float_activations` they take the int8 layout below instead;
- Q4_K tensors alone: the same codes with Q4_K's own two levels of scales and mins (4.5 bits a weight);
- Q6_K tensors: 6-bit codes (a nibble plane and a 2-bit plane) with their int8 scales per 16 inputs and float16
  block scales per 256, as stored, with activations quantized the same way (mojo_kernels/linear_int6.mojo);
- other quantized tensors (Q8_0, Q5_0, Q5_1, Q5_K; with `float_activations` also Q4_0, Q4_1, Q4_K and Q6_K):
  int8 codes with a scale (and an offset) per group of 16 or 32 inputs (mili/gguf/repack.py), equal to gguf-py's
  dequantization in every bit; the op multiplies them with float activations.
The graph fuses q/k/v and gate/up into one projection; a file may store the parts in different types (a Q4_K_M
file keeps attn_v in Q6_K beside Q4_K q and k). Parts join in one layout where that layout is each part's own
(Q4_0 with Q4_1: 4-bit codes with offsets; Q5_0 with Q5_1, or any quantized mix with float activations: the int8
layout's finest group, with offsets if any part has them); otherwise each run of parts of one type keeps its own
layout and runs as an op of its own (WeightFormat.PARTS: Q4_K q and k as Q4_K, v as Q6_K), since one joint
layout would widen them all (int8 codes, or float32 for mixed float types). Norm
weights and the Qwen2 q/k/v biases are small and take the run dtype (biases float32), as they do for safetensors
checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, ReaderTensor
from gguf.quants import dequantize
from max.driver import Buffer
from max.dtype import DType

from mili.config import ModelConfig
from mili.dtypes import bf16_bits_to_f32, numpy_to_buffer
from mili.gguf.files import GGUFError, GGUFModel
from mili.gguf.model_config import hf_tensor_names
from mili.gguf.repack import QUANTIZED_TYPES, GroupedCodes, grouped_codes, join_rows, q4_k_parts, q6_k_parts
from mili.model.packed_linear import (INT4_GROUP, INT4_ZERO_POINT, INT6_SUBGROUP, PackedShape, PackedWeight,
                                      WeightFormat, pack_bf16, pack_float, pack_grouped, pack_int4, pack_int4_k,
                                      pack_int6)
from mili.model.qwen3 import ROPE_TABLE, Qwen3GraphSpec, graph_names, graph_shape, graph_weight_shapes, \
    hf_sources, is_projection
from mili.model.rope import rope_table

GGML = GGMLQuantizationType
FLOAT_TYPES = {GGML.F32: WeightFormat.FLOAT32, GGML.F16: WeightFormat.FLOAT16, GGML.BF16: WeightFormat.BF16}
SUPPORTED_TYPES = frozenset(FLOAT_TYPES) | QUANTIZED_TYPES
# Quantized types whose scales are float16 values (the K-quants' are products of two scales: float32).
FLOAT16_SCALE_TYPES = frozenset({GGML.Q8_0, GGML.Q4_0, GGML.Q5_0, GGML.Q4_1, GGML.Q5_1})
OFFSET_TYPES = frozenset({GGML.Q4_1, GGML.Q5_1, GGML.Q4_K, GGML.Q5_K})
GROUP_SIZES = {GGML.Q6_K: 16}  # every other quantized type: 32
# Types whose codes are 4 bits (MILI's 4-bit layout runs them), and those of them with a float16 scale and offset.
INT4_TYPES = frozenset({GGML.Q4_0, GGML.Q4_1, GGML.Q4_K})


def supported_type_names() -> str:
    return ", ".join(sorted(t.name for t in SUPPORTED_TYPES))


def packed_weight_names(config: ModelConfig) -> list[str]:
    """The graph weights a GGUF model packs: every projection, the LM head (the embedding's tensor when tied) and,
    when untied, the embedding."""
    names = [name for name in graph_weight_shapes(config) if is_projection(name)]
    if config.tie_word_embeddings:
        names.append("lm_head")
    else:
        names.append("embed_tokens")
    return names


class _Tensors:
    """The model's tensors by graph weight: which GGUF tensors make each one (fused along the output axis)."""

    def __init__(self, model: GGUFModel, config: ModelConfig) -> None:
        self.model = model
        self.config = config
        self.by_name: dict[str, ReaderTensor] = {t.name: t for reader in model.readers for t in reader.tensors}
        self.gguf_name = {hf: gguf for gguf, hf in hf_tensor_names(config).items()}

    def parts(self, graph_name: str) -> list[ReaderTensor]:
        return [self.by_name[self.gguf_name[hf]] for hf in hf_sources(graph_name, self.config)]


def tensor_layout(types: list[GGMLQuantizationType], out_features: int, in_features: int, *,
                  float_activations: bool = False) -> PackedShape:
    """How a graph weight made of tensors of `types` is packed (module docstring)."""
    unique = set(types)
    if len(unique) == 1 and types[0] in FLOAT_TYPES:
        return PackedShape(FLOAT_TYPES[types[0]], out_features, in_features)
    if unique == {GGML.Q4_K} and not float_activations:
        return PackedShape(WeightFormat.INT4_K, out_features, in_features, INT4_GROUP, DType.float16, offsets=True)
    if unique == {GGML.Q6_K} and not float_activations:
        return PackedShape(WeightFormat.INT6, out_features, in_features, INT6_SUBGROUP)
    if unique <= INT4_TYPES and not float_activations:
        # Q4_0 alone keeps its zero point; beside a type with minimums its parts take offsets of -8 * scale.
        offsets = unique != {GGML.Q4_0}
        scale_dtype = DType.float32 if GGML.Q4_K in unique else DType.float16  # -8 * a float16 scale is one too
        return PackedShape(WeightFormat.INT4, out_features, in_features, INT4_GROUP, scale_dtype, offsets)
    if unique <= QUANTIZED_TYPES:
        group = min(GROUP_SIZES.get(t, 32) for t in types)
        scale_dtype = DType.float16 if unique <= FLOAT16_SCALE_TYPES else DType.float32
        return PackedShape(WeightFormat.INT8, out_features, in_features, group, scale_dtype,
                           offsets=bool(unique & OFFSET_TYPES))
    return PackedShape(WeightFormat.FLOAT32, out_features, in_features)


def fused_layout(parts: list[tuple[GGMLQuantizationType, int]], in_features: int, *,
                 float_activations: bool = False) -> PackedShape:
    """How a graph weight fused from parts of (type, rows), in output order, is packed: one layout where joining
    keeps every run of one type in its own format, else a PARTS layout of the runs' own (module docstring)."""
    out_features = sum(rows for _, rows in parts)
    joined = tensor_layout([t for t, _ in parts], out_features, in_features, float_activations=float_activations)
    runs = [(t, sum(rows for _, rows in run)) for t, run in groupby(parts, key=lambda part: part[0])]
    own = [tensor_layout([t], rows, in_features, float_activations=float_activations) for t, rows in runs]
    if all(layout.format is joined.format for layout in own):
        return joined
    return PackedShape(WeightFormat.PARTS, out_features, in_features, parts=tuple(own))


def check_tensor_types(model: GGUFModel) -> None:
    """A GGUFError naming the first tensor of a type MILI does not run (e.g. IQ2_XXS), its type and the types MILI
    runs; checked when a model is opened, before anything is loaded."""
    for reader in model.readers:
        for tensor in reader.tensors:
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise GGUFError(f"{model.name}: tensor '{tensor.name}' is {tensor.tensor_type.name}, a type MILI does "
                                f"not run; supported: {supported_type_names()}")


def gguf_tensor_formats(model: GGUFModel, config: ModelConfig, *,
                        float_activations: bool = False) -> tuple[tuple[str, PackedShape], ...]:
    """(graph weight, layout) for every weight the model packs, from its tensors' types (module docstring)."""
    check_tensor_types(model)
    tensors = _Tensors(model, config)
    shapes = graph_weight_shapes(config)
    formats = []
    for name in packed_weight_names(config):
        parts = tensors.parts(name)
        out_features, in_features = graph_shape(shapes, name)
        layout = fused_layout([(t.tensor_type, _shape(t)[0]) for t in parts], in_features,
                              float_activations=float_activations)
        if layout.out_features != out_features:
            raise GGUFError(f"{model.name}: {' + '.join(t.name for t in parts)} have {layout.out_features} rows, "
                            f"the model's {name} needs {out_features}")
        formats.append((name, layout))
    return tuple(formats)


def _shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """[rows, cols] (or [n]): GGUF stores dimensions fastest first, the reverse of numpy's order."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _stored(tensor: ReaderTensor, dtype: type) -> np.ndarray:
    """A float tensor's values as stored: GGUFReader hands F32 / F16 over typed and BF16 as bytes, so the bytes are
    viewed as `dtype` either way."""
    return np.asarray(tensor.data).view(dtype).reshape(_shape(tensor))


def _float32(tensor: ReaderTensor) -> np.ndarray:
    """A tensor's values as float32 [rows, cols] (or [n]), exact for every supported type."""
    if tensor.tensor_type == GGML.BF16:
        return bf16_bits_to_f32(_stored(tensor, np.uint16))
    if tensor.tensor_type == GGML.F16:
        return _stored(tensor, np.float16).astype(np.float32)
    if tensor.tensor_type == GGML.F32:
        return _stored(tensor, np.float32)
    return dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(_shape(tensor))


def pack_parts(parts: list[ReaderTensor], layout: PackedShape) -> PackedWeight:
    """The graph weight made of `parts` (fused along the output axis) in `layout`, every value unchanged."""
    if layout.format is WeightFormat.PARTS:
        arrays, rest = [], list(parts)
        for run_layout in layout.parts:
            run = []
            while sum(_shape(p)[0] for p in run) < run_layout.out_features:
                run.append(rest.pop(0))
            arrays += pack_parts(run, run_layout).arrays
        return PackedWeight(layout, tuple(arrays))
    if layout.format is WeightFormat.BF16:
        return PackedWeight(layout, (pack_bf16(np.concatenate([_stored(p, np.uint16) for p in parts])),))
    if layout.format in (WeightFormat.FLOAT16, WeightFormat.FLOAT32):
        if layout.format is WeightFormat.FLOAT16:
            values = np.concatenate([_stored(p, np.float16) for p in parts])
        else:
            values = np.concatenate([_float32(p) for p in parts])
        return pack_float(values, layout.format)
    if layout.format is WeightFormat.INT4_K:
        q4 = [q4_k_parts(np.asarray(p.data), *_shape(p)) for p in parts]
        return pack_int4_k(*(np.concatenate([getattr(part, field) for part in q4])
                             for field in ("codes", "scales", "mins", "block_scales", "block_mins")))
    if layout.format is WeightFormat.INT6:
        q6 = [q6_k_parts(np.asarray(p.data), *_shape(p)) for p in parts]
        return pack_int6(*(np.concatenate([getattr(part, field) for part in q6])
                           for field in ("codes", "scales", "block_scales")))
    grouped = [grouped_codes(p.tensor_type, np.asarray(p.data), *_shape(p)) for p in parts]
    if layout.format is WeightFormat.INT4:
        return _pack_4bit(grouped, layout)
    joined = join_rows(grouped)
    if joined.group != layout.group_size or (joined.offsets is not None) != layout.offsets:
        raise AssertionError(f"{parts[0].name}: repacked as groups of {joined.group} (offsets: "
                             f"{joined.offsets is not None}), the layout says {layout.group_size} ({layout.offsets})")
    return pack_grouped(joined.q, joined.scales, joined.offsets, joined.group, layout.scale_dtype)


def _pack_4bit(parts: list[GroupedCodes], layout: PackedShape) -> PackedWeight:
    """4-bit parts (Q4_0's codes -8..7, Q4_1's and Q4_K's 0..15) joined along N in the 4-bit layout: codes 0..15,
    Q4_0's shifted by its zero point, and given offsets of -8 * scale where the layout has offsets (the op's
    arithmetic is then the same as with the zero point, and the embedding's (q + 8) * d - 8d equals gguf-py's
    q * d, though a zero comes out +0.0 where gguf-py's may be -0.0)."""
    codes, scales, offsets = [], [], []
    for part in parts:
        if part.offsets is None:
            codes.append((part.q + INT4_ZERO_POINT).astype(np.uint8))
            offsets.append(-INT4_ZERO_POINT * part.scales)
        else:
            codes.append(part.q.astype(np.uint8))
            offsets.append(part.offsets)
        scales.append(part.scales)
    return pack_int4(np.concatenate(codes), np.concatenate(scales),
                     np.concatenate(offsets) if layout.offsets else None, layout.scale_dtype)


def load_gguf_weights(model: GGUFModel, spec: Qwen3GraphSpec) -> dict[str, Buffer]:
    """The weights registry of `build_qwen3_graph(spec)` for a GGUF model (spec.weights is WeightFormat.GGUF)."""
    config = spec.config
    tensors = _Tensors(model, config)
    registry: dict[str, Buffer] = {}
    for name in graph_names(spec):
        parts = tensors.parts(name)
        if spec.is_packed(name):
            registry |= pack_parts(parts, spec.packed_shape(name)).buffers(name)
        else:
            values = np.concatenate([_float32(p) for p in parts])
            registry[name] = numpy_to_buffer(values, spec.weight_dtype(name))
    registry[ROPE_TABLE] = Buffer.from_numpy(rope_table(config.head_dim, config.rope_theta, spec.rope_positions))
    return registry


@dataclass(frozen=True)
class TypeUsage:
    """How much of a model one tensor type stores."""

    type_name: str
    tensors: int
    weights: int
    nbytes: int


def type_usage(model: GGUFModel) -> list[TypeUsage]:
    """Per tensor type, its tensors, weights and stored bytes, most bytes first (`mili info`)."""
    usage: dict[str, list[int]] = {}
    for reader in model.readers:
        for tensor in reader.tensors:
            entry = usage.setdefault(tensor.tensor_type.name, [0, 0, 0])
            entry[0] += 1
            entry[1] += int(tensor.n_elements)
            entry[2] += int(tensor.n_bytes)
    rows = [TypeUsage(name, *counts) for name, counts in usage.items()]
    return sorted(rows, key=lambda row: -row.nbytes)


def matrix_types(model: GGUFModel) -> set[str]:
    """The types of the model's matrices (its 1-D norms and biases are F32 in every file)."""
    return {t.tensor_type.name for reader in model.readers for t in reader.tensors if len(t.shape) > 1}


def bits_per_weight(model: GGUFModel) -> float:
    usage = type_usage(model)
    return 8 * sum(u.nbytes for u in usage) / max(1, sum(u.weights for u in usage))


def file_type_name(model: GGUFModel) -> str:
    """`general.file_type` as llama.cpp names it (`Q4_K_M`), else the types of the matrices (`Q8_0+F16`)."""
    code = model.value("general.file_type", int, None)
    try:
        file_type = LlamaFileType(code)
    except ValueError:
        file_type = LlamaFileType.GUESSED
    if file_type is LlamaFileType.GUESSED:  # llama.cpp writes it for mixes it has no name for
        return "+".join(sorted(matrix_types(model))) or "unknown"
    return file_type.name.removeprefix("MOSTLY_").removeprefix("ALL_")


def file_type_summary(model: GGUFModel) -> str:
    """`GGUF Q4_K_M, 4.9 bits/weight` (the stored bytes of every tensor over its weights, as llama.cpp counts)."""
    return f"GGUF {file_type_name(model)}, {bits_per_weight(model):.1f} bits/weight"
