"""The graphs of kernel ops under test, built for any device.

CPU tests execute them; the virtual-GPU check compiles the very same graphs for sm_90. Dims are
symbolic so one compile serves every size a test throws at it.
"""

from __future__ import annotations

from dataclasses import dataclass

from max.dtype import DType
from max.graph import BufferType, DeviceRef, Graph, TensorType, ops

from mili.kernels import kernel_package
from mili.model import ops as mili_ops
from mili.model import packed_linear
from mili.model.packed_linear import DEFAULT_GROUP_SIZE, PackedShape, WeightFormat

SMALL_EPS = 1e-6
LARGE_EPS = 0.5  # big enough to change every output, so a dropped eps cannot pass unnoticed
DTYPES = (DType.float32, DType.bfloat16)
ROPE_HEAD_DIMS = (64, 128)
NUM_LAYERS = 3  # tests use a middle layer, so a wrong layer offset shows


def build_elementwise_graph(device: DeviceRef) -> Graph:
    """Per dtype: rmsnorm (two eps), add+rmsnorm, per-head norm, swiglu, and rope per head_dim.

    Inputs per dtype: x [rows, hidden], weight [hidden], residual [rows, hidden], gate_up [tokens, 2i],
    heads [tokens, heads, 64], head weight [64], then per rope head_dim: x [tokens, heads, d];
    shared: positions [tokens] int32, rope table [positions, 128] float32.
    """
    per_dtype = []
    for dtype in DTYPES:
        per_dtype += [TensorType(dtype, ["rows", "hidden"], device), TensorType(dtype, ["hidden"], device),
                      TensorType(dtype, ["rows", "hidden"], device), TensorType(dtype, ["tokens", "gate_up"], device),
                      TensorType(dtype, ["tokens", "heads", 64], device), TensorType(dtype, [64], device)]
        per_dtype += [TensorType(dtype, ["tokens", "heads", d], device) for d in ROPE_HEAD_DIMS]
    shared = [TensorType(DType.int32, ["tokens"], device)] + [
        TensorType(DType.float32, ["positions", d], device) for d in ROPE_HEAD_DIMS]
    with Graph("mili_elementwise_tests", input_types=per_dtype + shared,
               custom_extensions=[kernel_package()]) as graph:
        inputs = [v.tensor for v in graph.inputs]
        positions, tables = inputs[-1 - len(ROPE_HEAD_DIMS)], inputs[-len(ROPE_HEAD_DIMS):]
        stride = 6 + len(ROPE_HEAD_DIMS)
        outputs = []
        for i in range(len(DTYPES)):
            x, w, residual, gate_up, heads, head_w, *rope_inputs = inputs[i * stride:(i + 1) * stride]
            outputs += [mili_ops.rms_norm(x, w, SMALL_EPS), mili_ops.rms_norm(x, w, LARGE_EPS),
                        *mili_ops.add_rms_norm(x, residual, w, SMALL_EPS),
                        mili_ops.head_rms_norm(heads, head_w, SMALL_EPS), mili_ops.swiglu(gate_up)]
            outputs += [mili_ops.rope(r, positions, t) for r, t in zip(rope_inputs, tables, strict=True)]
        graph.output(*outputs)
    return graph


@dataclass(frozen=True)
class AttentionCase:
    """One compiled specialisation of the KV store + attention ops."""

    dtype: DType
    block_size: int
    head_dim: int


ATTENTION_CASES = (
    AttentionCase(DType.float32, block_size=16, head_dim=128),
    AttentionCase(DType.float32, block_size=8, head_dim=64),
    AttentionCase(DType.float32, block_size=32, head_dim=64),
    AttentionCase(DType.bfloat16, block_size=16, head_dim=128),
    AttentionCase(DType.bfloat16, block_size=32, head_dim=64),  # vdpbf16ps: two key vectors per block
    AttentionCase(DType.bfloat16, block_size=8, head_dim=64),  # float32 FMAs (a block is half a key vector)
)


ATTENTION_INPUTS_PER_CASE = 9


def attention_input_types(device: DeviceRef, case: AttentionCase) -> list[BufferType | TensorType]:
    """cache (mutable) [layers, 2, blocks, kv_heads, block_size * head_dim], k, v [new, kv_heads, d], slots [new],
    q [tokens, heads, d], layer [1], query_start [batch + 1], context_lens [batch], block_tables [batch, max_blocks]."""
    d, int32, key = case.head_dim, DType.int32, f"{case.dtype.name}_{case.block_size}_{case.head_dim}"
    return [
        BufferType(case.dtype, [NUM_LAYERS, 2, f"blocks_{key}", f"kv_heads_{key}", case.block_size * d], device),
        TensorType(case.dtype, [f"new_{key}", f"kv_heads_{key}", d], device),
        TensorType(case.dtype, [f"new_{key}", f"kv_heads_{key}", d], device),
        TensorType(int32, [f"new_{key}"], device), TensorType(case.dtype, [f"tokens_{key}", f"heads_{key}", d], device),
        TensorType(int32, [1], device), TensorType(int32, [f"batch_plus_1_{key}"], device),
        TensorType(int32, [f"batch_{key}"], device), TensorType(int32, [f"batch_{key}", f"max_blocks_{key}"], device),
    ]


def build_attention_graph(device: DeviceRef) -> Graph:
    """Per ATTENTION_CASES case, in order: kv_store(new k, v at slots), then paged_attention(q) over the same cache.
    All cases share one
    graph because each graph costs ~18 s of fixed compile time on two cores and a case only ~2 s more.

    Inputs: attention_input_types of each case in turn (dims named per case). Outputs: the attention
    [tokens, heads, d] of each case.
    """
    types = [t for case in ATTENTION_CASES for t in attention_input_types(device, case)]
    with Graph("mili_attention_tests", input_types=types, custom_extensions=[kernel_package()]) as graph:
        outputs = []
        for i, case in enumerate(ATTENTION_CASES):
            cache, k, v, slots, q, layer, query_start, context_lens, block_tables = graph.inputs[
                i * ATTENTION_INPUTS_PER_CASE:(i + 1) * ATTENTION_INPUTS_PER_CASE]
            mili_ops.kv_store(cache.buffer, k.tensor, v.tensor, slots.tensor, layer.tensor, case.block_size)
            outputs.append(mili_ops.paged_attention(cache.buffer, q.tensor, layer.tensor, query_start.tensor,
                                                    context_lens.tensor, block_tables.tensor, case.block_size))
        graph.output(*outputs)
    return graph


@dataclass(frozen=True)
class LinearCase:
    """One specialisation of MILI's linear op: weight layout, activation dtype, output dtype."""

    layout: PackedShape  # its format, group size, scale dtype and offsets (the sizes are the test's)
    x_dtype: DType
    out_dtype: DType

    @property
    def name(self) -> str:
        return f"{layout_name(self.layout)} x:{self.x_dtype.name} out:{self.out_dtype.name}"


def layout(fmt: WeightFormat, group_size: int = DEFAULT_GROUP_SIZE, scale_dtype: DType = DType.float16,
           offsets: bool = False) -> PackedShape:
    return PackedShape(fmt, 1, 1, group_size, scale_dtype, offsets)


def layout_name(shape: PackedShape) -> str:
    if shape.format in (WeightFormat.INT6, WeightFormat.INT4_K):
        return shape.format.value
    if shape.format is WeightFormat.INT4:
        return f"int4/{shape.scale_dtype.name}" + ("+offsets" if shape.offsets else "+zero point")
    if shape.format is not WeightFormat.INT8:
        return shape.format.value
    return f"int8/g{shape.group_size}/{shape.scale_dtype.name}" + ("+offsets" if shape.offsets else "")


Q6_K_LIKE = layout(WeightFormat.INT8, 16, DType.float32)  # GGUF Q6_K: 16-weight groups, float32 scales
Q4_K_LIKE = layout(WeightFormat.INT8, 32, DType.float32, offsets=True)  # Q4_K / Q5_K
Q4_1_LIKE = layout(WeightFormat.INT8, 32, DType.float16, offsets=True)  # Q4_1 / Q5_1
INT4_Q4_0 = layout(WeightFormat.INT4, 32, DType.float16)  # GGUF Q4_0: zero point 8
INT4_Q4_K = layout(WeightFormat.INT4, 32, DType.float32, offsets=True)  # GGUF Q4_K
INT4_OFFSETS = layout(WeightFormat.INT4, 32, DType.float16, offsets=True)  # --quantization int4, GGUF Q4_1
INT6 = layout(WeightFormat.INT6, 16)  # GGUF Q6_K
INT4_K = layout(WeightFormat.INT4_K, 32, offsets=True)  # GGUF Q4_K as stored
LINEAR_CASES = (
    LinearCase(layout(WeightFormat.BF16), DType.float32, DType.float32),
    LinearCase(layout(WeightFormat.BF16), DType.bfloat16, DType.bfloat16),
    LinearCase(layout(WeightFormat.BF16), DType.bfloat16, DType.float32),  # the LM head of a bfloat16 run
    LinearCase(layout(WeightFormat.INT8), DType.float32, DType.float32),
    LinearCase(layout(WeightFormat.INT8), DType.bfloat16, DType.bfloat16),
    LinearCase(layout(WeightFormat.INT8), DType.bfloat16, DType.float32),
    LinearCase(layout(WeightFormat.INT8, group_size=128), DType.float32, DType.float32),
    LinearCase(Q6_K_LIKE, DType.float32, DType.float32),
    LinearCase(Q6_K_LIKE, DType.bfloat16, DType.float32),
    LinearCase(Q4_K_LIKE, DType.float32, DType.float32),
    LinearCase(Q4_K_LIKE, DType.bfloat16, DType.bfloat16),
    LinearCase(Q4_1_LIKE, DType.float32, DType.float32),
    LinearCase(INT4_Q4_0, DType.bfloat16, DType.float32),
    LinearCase(INT4_Q4_0, DType.float32, DType.float32),
    LinearCase(INT4_Q4_K, DType.bfloat16, DType.bfloat16),
    LinearCase(INT4_OFFSETS, DType.bfloat16, DType.bfloat16),
    LinearCase(INT4_OFFSETS, DType.float32, DType.float32),
    LinearCase(INT6, DType.bfloat16, DType.float32),
    LinearCase(INT4_K, DType.bfloat16, DType.bfloat16),
    LinearCase(INT4_K, DType.float32, DType.float32),
    LinearCase(INT6, DType.float32, DType.bfloat16),
    LinearCase(layout(WeightFormat.FLOAT16), DType.float32, DType.float32),
    LinearCase(layout(WeightFormat.FLOAT16), DType.bfloat16, DType.bfloat16),
    LinearCase(layout(WeightFormat.FLOAT32), DType.bfloat16, DType.float32),
)
# (weight layout, output dtype) of the packed-embedding cases
EMBEDDING_CASES = ((layout(WeightFormat.BF16), DType.bfloat16), (layout(WeightFormat.INT8), DType.float32),
                   (Q6_K_LIKE, DType.bfloat16), (Q4_K_LIKE, DType.float32), (Q4_1_LIKE, DType.bfloat16),
                   (INT4_Q4_0, DType.float32), (INT4_Q4_K, DType.float32), (INT4_OFFSETS, DType.bfloat16),
                   (INT6, DType.float32), (INT4_K, DType.bfloat16),
                   (layout(WeightFormat.FLOAT16), DType.float32), (layout(WeightFormat.FLOAT32), DType.bfloat16))


def linear_input_types(device: DeviceRef) -> list[TensorType]:
    """x [m, k] per activation dtype, n_marker [n] (gives the graph the output width), ids [tokens], then the
    packed arrays of every distinct layout, in the order linear_layouts() lists them."""
    types = [TensorType(dtype, ["m", "k"], device) for dtype in DTYPES]
    types += [TensorType(DType.int32, ["n"], device), TensorType(DType.int32, ["tokens"], device)]
    for i, shape in enumerate(linear_layouts()):
        for suffix, dtype, _ in shape.arrays():
            key = f"layout{i}{suffix.replace('.', '_')}"
            types.append(TensorType(dtype, [f"{key}_rows", f"{key}_cols"], device))
    return types


def linear_layouts() -> list[PackedShape]:
    """Every distinct layout the cases use, in a fixed order."""
    return list(dict.fromkeys([c.layout for c in LINEAR_CASES] + [shape for shape, _ in EMBEDDING_CASES]))


def build_linear_graph(device: DeviceRef) -> Graph:
    """Every LINEAR_CASES op on shared inputs, then every EMBEDDING_CASES gather (hidden = k), then the CPU
    kernel family for each activation dtype (CPU only). Outputs in that order."""
    with Graph("mili_linear_tests", input_types=linear_input_types(device),
               custom_extensions=[kernel_package()]) as graph:
        values = [v.tensor for v in graph.inputs]
        xs = dict(zip(DTYPES, values[:len(DTYPES)], strict=True))
        marker, ids = values[len(DTYPES)], values[len(DTYPES) + 1]
        arrays, at = {}, len(DTYPES) + 2
        for shape in linear_layouts():
            count = len(shape.arrays())
            arrays[shape], at = values[at:at + count], at + count
        outputs = [packed_linear.linear(xs[c.x_dtype], arrays[c.layout], c.layout, marker.shape[0],
                                        out_dtype=c.out_dtype) for c in LINEAR_CASES]
        outputs += [packed_linear.embedding(ids, arrays[shape], shape, xs[DType.float32].shape[1], out_dtype)
                    for shape, out_dtype in EMBEDDING_CASES]
        if device.is_cpu():
            outputs += [packed_linear.kernel_family(ops.reshape(xs[d], [-1])) for d in DTYPES]
        graph.output(*outputs)
    return graph


def build_all_graphs(device: DeviceRef) -> list[Graph]:
    return [build_elementwise_graph(device), build_attention_graph(device), build_linear_graph(device)]
