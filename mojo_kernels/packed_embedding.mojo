# Token embeddings read from a packed linear weight, so a tied embedding / LM head is stored once
# (the bf16 or int8 panel layout of linear.mojo; row `id` of the embedding is output channel `id` of the head).
#
# mili_packed_embedding_bf16:  ids [T] int32, w [panels, K2 * 32] bf16        -> out [T, hidden]
# mili_packed_embedding_int8:  ids [T] int32, q, scales (linear.mojo, group G) -> out [T, hidden]
# out[t, k] = W[ids[t], k] rounded to out's dtype (exact for bf16 -> float32 / bfloat16; int8 rows are
# q * scale in float32, then rounded). An id outside the packed rows [0, panels * 16) is an error (ids in
# [vocab, panels * 16) read the zero padding; mili's ModelRunner refuses ids >= vocab before they get here).
# CPU: tokens split across cores when there are enough of them. GPU: one thread per output element.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, block_dim, grid_dim
from .cpu_parallel import parallel_ranges, tasks_for
from .convert import narrow
from .linear import GPU_THREADS, gpu_blocks
from .linear_layout import PANEL, packed_bf16_weight, packed_int8_weight, int8_padded_k, bf16_panel_stride


def check_ids(op: StaticString, ids: Pointer[Int32, ...], tokens: Int, rows: Int) raises:
    for t in range(tokens):
        var id = Int(ids.unsafe_load(t))
        if id < 0 or id >= rows:
            raise Error(op, ": token id ", id, " is outside the vocabulary's packed rows [0, ", rows, ")")


def embedding_bf16_gpu_kernel[out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    w_ptr: Pointer[BFloat16, ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var total = Int(tokens) * Int(hidden)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < total:
        var t = i // Int(hidden)
        var k = i - t * Int(hidden)
        out_ptr.unsafe_store(i, narrow[out_dtype](packed_bf16_weight(w_ptr, Int(hidden), Int(ids.unsafe_load(t)), k)))
        i += stride


def embedding_int8_gpu_kernel[out_dtype: DType, group: Int](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    q_ptr: Pointer[Int8, ImmutAnyOrigin], scale_ptr: Pointer[Float16, ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var total = Int(tokens) * Int(hidden)
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var stride = Int(grid_dim.x) * Int(block_dim.x)
    while i < total:
        var t = i // Int(hidden)
        var k = i - t * Int(hidden)
        var w = packed_int8_weight[group](q_ptr, scale_ptr, Int(hidden), Int(ids.unsafe_load(t)), k)
        out_ptr.unsafe_store(i, narrow[out_dtype](w))
        i += stride


@extensibility.register("mili_packed_embedding_bf16")
struct PackedEmbeddingBF16:
    """Rows `ids` of a bf16-packed [vocab, hidden] weight."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        w: InputTensor[dtype=DType.bfloat16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = ids.dim_size(0)
        var hidden = output.dim_size(1)
        if w.dim_size(1) != bf16_panel_stride(hidden):
            raise Error("mili_packed_embedding_bf16: packed weight has ", w.dim_size(1), " columns, expected ",
                        bf16_panel_stride(hidden), " for hidden = ", hidden)
        if tokens == 0:
            return
        comptime if target == "cpu":
            var out_ptr = output.unsafe_ptr()
            var ids_ptr = ids.unsafe_ptr()
            var w_ptr = w.unsafe_ptr()
            check_ids("mili_packed_embedding_bf16", ids_ptr, tokens, w.dim_size(0) * PANEL)

            def rows(start: Int, end: Int) raises {imm out_ptr, imm ids_ptr, imm w_ptr, imm hidden}:
                for t in range(start, end):
                    var id = Int(ids_ptr.unsafe_load(t))
                    for k in range(hidden):
                        out_ptr.unsafe_store(t * hidden + k, narrow[output.dtype](packed_bf16_weight(w_ptr, hidden, id, k)))

            parallel_ranges(tokens, tasks_for(tokens * hidden * 16), rows, ctx)
        elif target == "gpu":
            ctx.enqueue_function[embedding_bf16_gpu_kernel[output.dtype]](
                output.unsafe_ptr(), ids.unsafe_ptr(), w.unsafe_ptr(), Int32(tokens), Int32(hidden),
                grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_packed_embedding_bf16: unsupported target ", target)


@extensibility.register("mili_packed_embedding_int8")
struct PackedEmbeddingInt8[group_size: Int]:
    """Rows `ids` of an int8-packed [vocab, hidden] weight, dequantised."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        q: InputTensor[dtype=DType.int8, rank=2, ...],
        scales: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = ids.dim_size(0)
        var hidden = output.dim_size(1)
        if q.dim_size(1) != int8_padded_k(hidden, Self.group_size) * PANEL:
            raise Error("mili_packed_embedding_int8: packed weight has ", q.dim_size(1), " columns, expected ",
                        int8_padded_k(hidden, Self.group_size) * PANEL, " for hidden = ", hidden)
        if tokens == 0:
            return
        comptime if target == "cpu":
            var out_ptr = output.unsafe_ptr()
            var ids_ptr = ids.unsafe_ptr()
            var q_ptr = q.unsafe_ptr()
            var scale_ptr = scales.unsafe_ptr()
            check_ids("mili_packed_embedding_int8", ids_ptr, tokens, q.dim_size(0) * PANEL)

            def rows(start: Int, end: Int) raises {imm out_ptr, imm ids_ptr, imm q_ptr, imm scale_ptr, imm hidden}:
                for t in range(start, end):
                    var id = Int(ids_ptr.unsafe_load(t))
                    for k in range(hidden):
                        var w = packed_int8_weight[Self.group_size](q_ptr, scale_ptr, hidden, id, k)
                        out_ptr.unsafe_store(t * hidden + k, narrow[output.dtype](w))

            parallel_ranges(tokens, tasks_for(tokens * hidden * 16), rows, ctx)
        elif target == "gpu":
            ctx.enqueue_function[embedding_int8_gpu_kernel[output.dtype, Self.group_size]](
                output.unsafe_ptr(), ids.unsafe_ptr(), q.unsafe_ptr(), scales.unsafe_ptr(), Int32(tokens), Int32(hidden),
                grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_packed_embedding_int8: unsupported target ", target)
