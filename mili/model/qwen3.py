"""Qwen3 (and Qwen2/Qwen2.5) as one MAX graph over MILI's paged KV cache.

    from mili.model.qwen3 import Qwen3GraphSpec, build_qwen3_graph, load_qwen3_weights

    spec = Qwen3GraphSpec(ModelConfig.from_pretrained(model_dir), dtype=DType.float32)
    graph = build_qwen3_graph(spec)
    model = session.load(graph, weights_registry=load_qwen3_weights(model_dir, spec))
    logits, = model.execute(*batch_buffers, kv_cache)        # inputs in BATCH_INPUTS order, cache last

One compiled graph serves any ragged batch (mili/engine/batch.py): prefills, prefill chunks, decodes and
speculative verifications of different sequences mixed, with every size symbolic. Per layer:

    x = rmsnorm(h)                       (fused with the previous layer's residual add)
    q, k, v = split(x @ Wqkv^T)          one fused projection (+ bqkv in float32: Qwen2)
    q, k = rope(head_norm(q)), rope(head_norm(k))   (no head_norm: Qwen2)
    kv_store(cache, k, v, slot_mapping)  in place
    o = paged_attention(q, cache) @ Wo^T
    x, h = rmsnorm(h + o), h + o         one fused op
    h += swiglu(x @ Wgate_up^T) @ Wdown^T

then the final norm and the LM head (tied or not), computed only for the rows in `logits_indices`.
Logits come out in float32 whatever the run dtype.

Projections and the LM head multiply through MAX's ops.matmul over dense weights, or through MILI's own
linear op over weights packed at load time (mili/model/packed_linear.py: bf16 panels, or int8 with a float16
scale per channel per group of inputs): `Qwen3GraphSpec.weights` says which. A tied embedding is then read
from the packed head (one copy). Weights are graph weights bound at load time, so
the compiled graph depends on the shapes only and MAX's on-disk compile cache serves every restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from max.driver import Buffer
from max.dtype import DType
from max.graph import BufferType, DeviceRef, Graph, TensorType, TensorValue, Weight, ops

from mili.config import ModelConfig
from mili.dtypes import numpy_to_buffer, to_numpy_f32
from mili.kernels import kernel_package
from mili.model import ops as mili_ops
from mili.model import packed_linear
from mili.model.kv_layout import KVCacheShape
from mili.model.packed_linear import DEFAULT_GROUP_SIZE, PackedShape, WeightFormat, int4_as_int8, pack_weight
from mili.model.rope import rope_table
from mili.weights import iter_weights

# The Batch inputs, in graph input order (all int32); the KV cache buffer follows them.
BATCH_INPUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_ids", ("tokens",)),
    ("positions", ("tokens",)),
    ("query_start", ("batch_plus_one",)),
    ("context_lens", ("batch",)),
    ("block_tables", ("batch", "max_blocks")),
    ("slot_mapping", ("tokens",)),
    ("logits_indices", ("logit_rows",)),
)
ROPE_TABLE = "rope_table"


@dataclass(frozen=True)
class Qwen3GraphSpec:
    """What a compiled Qwen3 graph depends on: the model's shape, run dtype (activations and KV cache), how the
    projection weights are stored (`weights`; None picks the default: packed bf16 for a bfloat16 run on CPU,
    dense otherwise), device and KV block size."""

    config: ModelConfig
    dtype: DType = DType.float32
    device: DeviceRef = DeviceRef.CPU()
    block_size: int = 16
    weights: WeightFormat | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    # WeightFormat.GGUF: how each packed graph weight is stored, as its file's tensor types make it
    # (mili/gguf/weights.py); the embedding is then packed too, whether tied or not.
    tensor_formats: tuple[tuple[str, PackedShape], ...] = ()
    # 4-bit weights (int4, GGUF's Q4_0 / Q4_1 / Q4_K) meet float activations in the int8 layout instead of
    # activations quantized to int8 (mili/model/packed_linear.py)
    float_activations: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in (DType.float32, DType.bfloat16):
            raise ValueError(f"run dtype must be float32 or bfloat16, got {self.dtype}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        if self.weights is None:
            packed_bf16 = self.dtype == DType.bfloat16 and self.device.is_cpu()
            object.__setattr__(self, "weights", WeightFormat.BF16 if packed_bf16 else WeightFormat.DENSE)
        if (self.weights is WeightFormat.GGUF) != bool(self.tensor_formats):
            raise ValueError("tensor_formats go with WeightFormat.GGUF, and only with it")

    @property
    def weight_format(self) -> WeightFormat:
        assert self.weights is not None  # resolved in __post_init__
        return self.weights

    @property
    def rope_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def weights_in_out(self) -> bool:
        """Whether dense projection weights are stored [in, out] (pre-transposed) rather than Hugging Face's
        [out, in]. MAX's CPU matmul folds the transpose of an [out, in] weight into float32 matmuls but
        copies the whole weight for bfloat16 ones (measured: a 1x1024 @ 1024x6144 bf16 product takes
        6.2 ms that way, 1.9 ms pre-transposed), so dense bfloat16 on CPU keeps weights pre-transposed."""
        return self.weight_format is WeightFormat.DENSE and self.dtype == DType.bfloat16 and self.device.is_cpu()

    @property
    def embedding_in_head(self) -> bool:
        """Whether the token embedding is read from the packed LM head (tied embeddings stored once)."""
        return self.config.tie_word_embeddings and self.weight_format.packed

    def is_packed(self, name: str) -> bool:
        """Whether graph weight `name` is stored packed for MILI's linear / embedding ops."""
        if not self.weight_format.packed:
            return False
        return is_projection(name) or (self.weight_format is WeightFormat.GGUF and name == "embed_tokens")

    def packed_shape(self, name: str) -> PackedShape:
        if self.weight_format is WeightFormat.GGUF:
            return dict(self.tensor_formats)[name]
        return self._packed(graph_shape(graph_weight_shapes(self.config), name))

    def _packed(self, shape: tuple[int, ...]) -> PackedShape:
        out_features, in_features = shape
        if self.weight_format is WeightFormat.INT4:  # MILI's int4: a float16 scale and offset per group
            fmt = WeightFormat.INT8 if self.float_activations else WeightFormat.INT4
            return PackedShape(fmt, out_features, in_features, self.group_size, DType.float16, offsets=True)
        return PackedShape(self.weight_format, out_features, in_features, self.group_size)

    def weight_types(self) -> dict[str, tuple[DType, tuple[int, ...]]]:
        """Every array the graph binds at load time, by name, with its dtype and declared shape. A packed
        projection `name` is one array (bf16) or `name.q` and `name.scales` (int8)."""
        shapes = graph_weight_shapes(self.config)
        types: dict[str, tuple[DType, tuple[int, ...]]] = {}
        for name in graph_names(self):
            shape = graph_shape(shapes, name)
            if self.is_packed(name):
                types |= {name + suffix: (dtype, packed) for suffix, dtype, packed in self.packed_shape(name).arrays()}
            elif not is_projection(name):
                types[name] = (self.weight_dtype(name), shape)
            else:
                types[name] = (self.dtype, shape[::-1] if self.weights_in_out else shape)
        return types

    def weight_dtype(self, name: str) -> DType:
        """The dtype of an unpacked graph weight: the run dtype, but float32 for the q/k/v bias, which is added to
        the projection's float32 output before the one rounding to the run dtype (as a biased matmul rounds)."""
        return DType.float32 if name.endswith("qkv_bias") else self.dtype

    def weight_bytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.size_in_bytes for dtype, shape in self.weight_types().values())

    def weight_bytes_per_token(self) -> int:
        """The weight bytes a decode step reads: every array but the embedding's where an LM head of its own is
        read instead (a step gathers one row of the table; a tied head read from the embedding reads it all)."""
        types = self.weight_types()
        has_head = any(name.partition(".")[0] == "lm_head" for name in types)
        return sum(int(np.prod(shape)) * dtype.size_in_bytes for name, (dtype, shape) in types.items()
                   if not (has_head and name.partition(".")[0] == "embed_tokens"))

    def cache_shape(self, num_blocks: int) -> KVCacheShape:
        c = self.config
        return KVCacheShape(c.num_hidden_layers, num_blocks, c.num_key_value_heads, self.block_size, c.head_dim)

    def cache_type(self) -> BufferType:
        c = self.config
        return BufferType(self.dtype, [c.num_hidden_layers, 2, "num_blocks", c.num_key_value_heads,
                                       self.block_size * c.head_dim], self.device)


def graph_shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    """A graph weight's [out, in] shape from graph_weight_shapes; a tied LM head has the embedding's."""
    return shapes[name] if name in shapes else shapes["embed_tokens"]


def _layer_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The per-layer weights of the graph (fused where the checkpoint stores them apart), by suffix."""
    h, d, qkv = config.hidden_size, config.head_dim, config.q_size + 2 * config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm": (h,), "qkv_proj": (qkv, h)}
    if config.qkv_bias:
        shapes["qkv_bias"] = (qkv,)
    if config.qk_norm:
        shapes |= {"q_norm": (d,), "k_norm": (d,)}
    return shapes | {
        "o_proj": (h, config.q_size),
        "post_attention_layernorm": (h,),
        "gate_up_proj": (2 * config.intermediate_size, h),
        "down_proj": (h, config.intermediate_size),
    }


def is_projection(name: str) -> bool:
    return name == "lm_head" or name.endswith("_proj")


def graph_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The model's weights as the graph names them (q/k/v and gate/up fused), in Hugging Face's
    [out, in] orientation; `Qwen3GraphSpec.weight_types` gives the arrays a graph actually binds."""
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (config.vocab_size, config.hidden_size)}
    for i in range(config.num_hidden_layers):
        shapes |= {f"layers.{i}.{name}": shape for name, shape in _layer_weight_shapes(config).items()}
    shapes["norm"] = (config.hidden_size,)
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (config.vocab_size, config.hidden_size)
    return shapes


# Graph weight name -> the Hugging Face tensors it is made of, concatenated along the first axis.
def hf_sources(name: str, config: ModelConfig) -> tuple[str, ...]:
    if name in ("embed_tokens", "norm"):
        return (f"model.{name}.weight",)
    if name == "lm_head":
        return ("lm_head.weight",) if not config.tie_word_embeddings else ("model.embed_tokens.weight",)
    prefix, _, part = name.rpartition(".")
    hf = f"model.{prefix}"
    return {
        "input_layernorm": (f"{hf}.input_layernorm.weight",),
        "post_attention_layernorm": (f"{hf}.post_attention_layernorm.weight",),
        "qkv_proj": (f"{hf}.self_attn.q_proj.weight", f"{hf}.self_attn.k_proj.weight", f"{hf}.self_attn.v_proj.weight"),
        "qkv_bias": (f"{hf}.self_attn.q_proj.bias", f"{hf}.self_attn.k_proj.bias", f"{hf}.self_attn.v_proj.bias"),
        "q_norm": (f"{hf}.self_attn.q_norm.weight",),
        "k_norm": (f"{hf}.self_attn.k_norm.weight",),
        "o_proj": (f"{hf}.self_attn.o_proj.weight",),
        "gate_up_proj": (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
        "down_proj": (f"{hf}.mlp.down_proj.weight",),
    }[part]


def graph_names(spec: Qwen3GraphSpec) -> list[str]:
    """The graph's weights before packing splits them into arrays (`weight_types` lists the arrays)."""
    names = list(graph_weight_shapes(spec.config))
    if spec.config.tie_word_embeddings and (spec.weights_in_out or spec.weight_format.packed):
        names.append("lm_head")
        if spec.embedding_in_head:
            names.remove("embed_tokens")
    return names


def load_qwen3_weights(model_dir: str | Path, spec: Qwen3GraphSpec) -> dict[str, Buffer]:
    """The weights registry for `session.load(build_qwen3_graph(spec), weights_registry=...)`: the
    checkpoint's tensors in the run dtype, q/k/v and gate/up fused, projections packed if the spec says so,
    plus the RoPE table."""
    config = spec.config
    hf: dict[str, Buffer] = {}
    registry: dict[str, Buffer] = {}
    pending = {name: hf_sources(name, config) for name in graph_names(spec)}
    for hf_name, buffer in iter_weights(model_dir, config, spec.dtype):
        hf[hf_name] = buffer
        # Build a graph weight as soon as its parts are loaded, so the unfused copies are dropped early.
        for name in [n for n, parts in pending.items() if hf_name in parts and all(p in hf for p in parts)]:
            parts = pending.pop(name)
            registry |= _graph_weight(name, [hf[p] for p in parts], spec)
            for part in parts:
                if not any(part in other for other in pending.values()):
                    del hf[part]
    if pending:
        raise ValueError(f"weights never completed: {sorted(pending)[:4]}")
    registry[ROPE_TABLE] = Buffer.from_numpy(rope_table(config.head_dim, config.rope_theta, spec.rope_positions))
    return registry


def _graph_weight(name: str, parts: list[Buffer], spec: Qwen3GraphSpec) -> dict[str, Buffer]:
    """One graph weight's arrays from its checkpoint tensors: fused along the output axis, then packed, or
    transposed if the spec stores dense weights [in, out]. Going through float32 is exact for bfloat16 too;
    bf16 packing of bfloat16 tensors moves their bits without converting."""
    if spec.is_packed(name):
        if spec.weight_format is WeightFormat.BF16 and all(p.dtype == DType.bfloat16 for p in parts):
            fused = np.concatenate([p.view(DType.uint16).to_numpy() for p in parts], axis=0)
        else:
            fused = np.concatenate([to_numpy_f32(p) for p in parts], axis=0)
        packed = pack_weight(fused, spec.weight_format, spec.group_size)
        if spec.packed_shape(name).format is not packed.shape.format:  # int4 with float activations
            packed = int4_as_int8(packed)
        return packed.buffers(name)
    transpose = spec.weights_in_out and is_projection(name)
    dtype = spec.weight_dtype(name)
    if len(parts) == 1 and not transpose and parts[0].dtype == dtype:
        return {name: parts[0]}
    fused = np.concatenate([to_numpy_f32(p) for p in parts], axis=0)
    return {name: numpy_to_buffer(np.ascontiguousarray(fused.T) if transpose else fused, dtype)}


class _Weights:
    """Declares graph weights on first use, so the graph body reads like the model."""

    def __init__(self, spec: Qwen3GraphSpec) -> None:
        self.spec = spec
        self.types = spec.weight_types()
        self.values: dict[str, TensorValue] = {}

    def __call__(self, name: str) -> TensorValue:
        if name not in self.values:  # a tied embedding is used twice but declared once
            dtype, shape = self.types[name]
            self.values[name] = TensorValue(Weight(name, dtype, shape, self.spec.device))
        return self.values[name]

    def packed(self, name: str) -> list[TensorValue]:
        """The arrays of packed projection `name`, in PackedShape.arrays() order."""
        return [self(name + suffix) for suffix, _, _ in self.spec.packed_shape(name).arrays()]

    def rope_table(self) -> TensorValue:
        c = self.spec.config
        return TensorValue(Weight(ROPE_TABLE, DType.float32, (self.spec.rope_positions, c.head_dim), self.spec.device))


def _linear(x: TensorValue, weight: TensorValue, in_out: bool) -> TensorValue:
    """x @ W^T for the projection W, stored [in, out] (`in_out`) or [out, in] as Hugging Face keeps it."""
    return ops.matmul(x, weight if in_out else ops.transpose(weight, 0, 1))


def build_qwen3_graph(spec: Qwen3GraphSpec, name: str = "qwen3") -> Graph:
    """The whole model as one graph. Inputs: BATCH_INPUTS (int32), then the KV cache buffer (mutated in
    place). Output: float32 logits [len(logits_indices), vocab_size]."""
    c, device = spec.config, spec.device
    input_types = [TensorType(DType.int32, list(dims), device) for _, dims in BATCH_INPUTS] + [spec.cache_type()]
    with Graph(name, input_types=input_types, custom_extensions=[kernel_package()]) as graph:
        *batch, cache_value = graph.inputs
        ids, positions, query_start, context_lens, block_tables, slots, logits_indices = (v.tensor for v in batch)
        cache = cache_value.buffer
        w = _Weights(spec)
        table = w.rope_table()
        tokens = ids.shape[0]
        eps = c.rms_norm_eps

        def linear(x: TensorValue, name: str, out_dtype: DType | None = None) -> TensorValue:
            if spec.weight_format.packed:
                shape = spec.packed_shape(name)
                return packed_linear.linear(x, w.packed(name), shape, shape.out_features, out_dtype=out_dtype)
            y = _linear(x, w(name), spec.weights_in_out)
            return y if out_dtype is None or out_dtype == y.dtype else ops.cast(y, out_dtype)

        table_name = "lm_head" if spec.embedding_in_head else "embed_tokens"
        if spec.is_packed(table_name):
            h = packed_linear.embedding(ids, w.packed(table_name), spec.packed_shape(table_name), c.hidden_size,
                                        spec.dtype)
        else:
            h = ops.gather(w("embed_tokens"), ids, axis=0)
        x = mili_ops.rms_norm(h, w("layers.0.input_layernorm"), eps)
        for i in range(c.num_hidden_layers):
            p = f"layers.{i}."
            layer = ops.constant(np.array([i], np.int32), DType.int32, device)
            if c.qkv_bias:
                qkv = ops.cast(linear(x, p + "qkv_proj", DType.float32) + w(p + "qkv_bias"), spec.dtype)
            else:
                qkv = linear(x, p + "qkv_proj")
            q, k, v = ops.split(qkv, [c.q_size, c.kv_size, c.kv_size], axis=1)
            q = ops.reshape(q, [tokens, c.num_attention_heads, c.head_dim])
            k = ops.reshape(k, [tokens, c.num_key_value_heads, c.head_dim])
            v = ops.reshape(v, [tokens, c.num_key_value_heads, c.head_dim])
            q = mili_ops.rope(mili_ops.head_rms_norm(q, w(p + "q_norm"), eps) if c.qk_norm else q, positions, table)
            k = mili_ops.rope(mili_ops.head_rms_norm(k, w(p + "k_norm"), eps) if c.qk_norm else k, positions, table)
            mili_ops.kv_store(cache, k, v, slots, layer, spec.block_size)
            attn = mili_ops.paged_attention(cache, q, layer, query_start, context_lens, block_tables, spec.block_size)
            o = linear(ops.reshape(attn, [tokens, c.q_size]), p + "o_proj")
            x, h = mili_ops.add_rms_norm(o, h, w(p + "post_attention_layernorm"), eps)
            mlp = linear(mili_ops.swiglu(linear(x, p + "gate_up_proj")), p + "down_proj")
            if i + 1 < c.num_hidden_layers:
                x, h = mili_ops.add_rms_norm(mlp, h, w(f"layers.{i + 1}.input_layernorm"), eps)
            else:
                h = h + mlp

        rows = mili_ops.rms_norm(ops.gather(h, logits_indices, axis=0), w("norm"), eps)
        head = "lm_head" if "lm_head" in graph_names(spec) else "embed_tokens"
        # MILI's linear op writes float32 logits directly; MAX's matmul makes them in the run dtype, then a cast.
        graph.output(linear(rows, head, DType.float32))
    return graph
