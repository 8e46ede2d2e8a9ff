# Token embeddings read from a packed linear weight, so a tied embedding / LM head is stored once
# (the bf16 or int8 panel layout of linear.mojo; row `id` of the embedding is output channel `id` of the head).
#
# mili_packed_embedding_bf16:          ids [T] int32, w [panels, K2 * 32] bf16                  -> out [T, hidden]
# mili_packed_embedding_int8:          ids [T] int32, q, scales (linear.mojo, group G)           -> out [T, hidden]
# mili_packed_embedding_int8_offsets:  ids [T] int32, q, scales, offsets (linear.mojo, group G)  -> out [T, hidden]
# mili_packed_embedding_float:         ids [T] int32, w [panels, K * 16] float16 / float32       -> out [T, hidden]
# mili_packed_embedding_int4:          ids [T] int32, codes, scales (linear.mojo's 4-bit layout)  -> out [T, hidden]
# mili_packed_embedding_int4_offsets:  ids [T] int32, codes, scales, offsets                      -> out [T, hidden]
# mili_packed_embedding_int4_k:        ids [T] int32, codes, scales, mins, block scales, block mins -> out [T, hidden]
# mili_packed_embedding_int6:          ids [T] int32, codes, high, scales, block_scales (6-bit)    -> out [T, hidden]
# out[t, k] = W[ids[t], k] rounded to out's dtype (exact for bf16 -> float32 / bfloat16; int8 rows are
# q * scale (+ offset) in float32, then rounded; 4-bit rows (q - 8) * scale or q * scale + offset). An id outside the packed rows [0, panels * 16) is an error (ids in
# [vocab, panels * 16) read the zero padding; mili's ModelRunner refuses ids >= vocab before they get here).
# CPU: tokens split across cores when there are enough of them. GPU: one thread per output element.
import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, block_dim, grid_dim
from .cpu_parallel import parallel_ranges, tasks_for
from .convert import narrow
from .linear import GPU_THREADS, gpu_blocks
from .linear_layout import (
    PANEL, packed_bf16_weight, packed_float_weight, packed_int8_offset_weight, packed_int8_weight, int8_padded_k,
    bf16_panel_stride, INT4_GROUP, int4_panel_bytes, packed_int4_weight, INT6_SUBGROUP, int6_blocks,
    int6_high_panel_bytes, packed_int6_weight, int4_k_blocks, packed_int4_k_weight,
)


def check_ids(op: StaticString, ids: Pointer[Int32, ...], tokens: Int, rows: Int) raises:
    for t in range(tokens):
        var id = Int(ids.unsafe_load(t))
        if id < 0 or id >= rows:
            raise Error(op, ": token id ", id, " is outside the vocabulary's packed rows [0, ", rows, ")")


def check_columns(op: StaticString, columns: Int, expected: Int, hidden: Int) raises:
    if columns != expected:
        raise Error(op, ": packed weight has ", columns, " columns, expected ", expected, " for hidden = ", hidden)


def embedding_rows_cpu[out_dtype: DType, WeightFn: def(n: Int, k: Int) -> Float32, //](
    op: StaticString, out_ptr: MutPointer[Scalar[out_dtype], ...], ids_ptr: Pointer[Int32, ...], tokens: Int,
    hidden: Int, packed_rows: Int, weight: WeightFn, ctx: DeviceContext,
) raises:
    """Writes out[t, k] = weight(ids[t], k), tokens split across cores when there are enough of them."""
    check_ids(op, ids_ptr, tokens, packed_rows)

    def rows(start: Int, end: Int) raises {imm out_ptr, imm ids_ptr, imm hidden, imm weight}:
        for t in range(start, end):
            var id = Int(ids_ptr.unsafe_load(t))
            for k in range(hidden):
                out_ptr.unsafe_store(t * hidden + k, narrow[out_dtype](weight(id, k)))

    parallel_ranges(tokens, tasks_for(tokens * hidden * 16), rows, ctx)


@always_inline
def gpu_position(hidden: Int32, mut t: Int, mut k: Int, i: Int):
    t = i // Int(hidden)
    k = i - t * Int(hidden)


def embedding_bf16_gpu_kernel[out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    w_ptr: Pointer[BFloat16, ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var t = 0
    var k = 0
    while i < Int(tokens) * Int(hidden):
        gpu_position(hidden, t, k, i)
        out_ptr.unsafe_store(i, narrow[out_dtype](packed_bf16_weight(w_ptr, Int(hidden), Int(ids.unsafe_load(t)), k)))
        i += Int(grid_dim.x) * Int(block_dim.x)


def embedding_int8_gpu_kernel[out_dtype: DType, scale_dtype: DType, group: Int, OFFSETS: Bool](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    q_ptr: Pointer[Int8, ImmutAnyOrigin], scale_ptr: Pointer[Scalar[scale_dtype], ImmutAnyOrigin],
    offset_ptr: Pointer[Float32, ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var t = 0
    var k = 0
    while i < Int(tokens) * Int(hidden):
        gpu_position(hidden, t, k, i)
        var n = Int(ids.unsafe_load(t))
        var w: Float32
        comptime if OFFSETS:
            w = packed_int8_offset_weight[group](q_ptr, scale_ptr, offset_ptr, Int(hidden), n, k)
        else:
            w = packed_int8_weight[group](q_ptr, scale_ptr, Int(hidden), n, k)
        out_ptr.unsafe_store(i, narrow[out_dtype](w))
        i += Int(grid_dim.x) * Int(block_dim.x)


def embedding_float_gpu_kernel[out_dtype: DType, w_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    w_ptr: Pointer[Scalar[w_dtype], ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var t = 0
    var k = 0
    while i < Int(tokens) * Int(hidden):
        gpu_position(hidden, t, k, i)
        out_ptr.unsafe_store(i, narrow[out_dtype](packed_float_weight(w_ptr, Int(hidden), Int(ids.unsafe_load(t)), k)))
        i += Int(grid_dim.x) * Int(block_dim.x)


def embedding_int4_gpu_kernel[out_dtype: DType, scale_dtype: DType, OFFSETS: Bool](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    codes: Pointer[UInt8, ImmutAnyOrigin], scale_ptr: Pointer[Scalar[scale_dtype], ImmutAnyOrigin],
    offset_ptr: Pointer[Scalar[scale_dtype], ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var t = 0
    var k = 0
    while i < Int(tokens) * Int(hidden):
        gpu_position(hidden, t, k, i)
        var w = packed_int4_weight[OFFSETS](codes, scale_ptr, offset_ptr, Int(hidden), Int(ids.unsafe_load(t)), k)
        out_ptr.unsafe_store(i, narrow[out_dtype](w))
        i += Int(grid_dim.x) * Int(block_dim.x)


def embedding_int6_gpu_kernel[out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    codes: Pointer[UInt8, ImmutAnyOrigin], high_bits: Pointer[UInt8, ImmutAnyOrigin],
    scale_ptr: Pointer[Int8, ImmutAnyOrigin], block_ptr: Pointer[Float16, ImmutAnyOrigin], tokens: Int32,
    hidden: Int32,
):
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var t = 0
    var k = 0
    while i < Int(tokens) * Int(hidden):
        gpu_position(hidden, t, k, i)
        var w = packed_int6_weight(codes, high_bits, scale_ptr, block_ptr, Int(hidden), Int(ids.unsafe_load(t)), k)
        out_ptr.unsafe_store(i, narrow[out_dtype](w))
        i += Int(grid_dim.x) * Int(block_dim.x)


def embedding_int4_k_gpu_kernel[out_dtype: DType](
    out_ptr: Pointer[Scalar[out_dtype], MutAnyOrigin], ids: Pointer[Int32, ImmutAnyOrigin],
    codes: Pointer[UInt8, ImmutAnyOrigin], scale_ptr: Pointer[UInt8, ImmutAnyOrigin],
    min_ptr: Pointer[UInt8, ImmutAnyOrigin], block_ptr: Pointer[Float16, ImmutAnyOrigin],
    block_min_ptr: Pointer[Float16, ImmutAnyOrigin], tokens: Int32, hidden: Int32,
):
    var i = Int(block_idx.x) * Int(block_dim.x) + Int(thread_idx.x)
    var t = 0
    var k = 0
    while i < Int(tokens) * Int(hidden):
        gpu_position(hidden, t, k, i)
        var w = packed_int4_k_weight(codes, scale_ptr, min_ptr, block_ptr, block_min_ptr, Int(hidden),
                                     Int(ids.unsafe_load(t)), k)
        out_ptr.unsafe_store(i, narrow[out_dtype](w))
        i += Int(grid_dim.x) * Int(block_dim.x)


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
        comptime op = "mili_packed_embedding_bf16"
        var tokens = ids.dim_size(0)
        var hidden = output.dim_size(1)
        check_columns(op, w.dim_size(1), bf16_panel_stride(hidden), hidden)
        if tokens == 0:
            return
        comptime if target == "cpu":
            var w_ptr = w.unsafe_ptr()

            def weight(n: Int, k: Int) {imm w_ptr, imm hidden} -> Float32:
                return packed_bf16_weight(w_ptr, hidden, n, k)

            embedding_rows_cpu(op, output.unsafe_ptr(), ids.unsafe_ptr(), tokens, hidden, w.dim_size(0) * PANEL,
                               weight, ctx)
        elif target == "gpu":
            ctx.enqueue_function[embedding_bf16_gpu_kernel[output.dtype]](
                output.unsafe_ptr(), ids.unsafe_ptr(), w.unsafe_ptr(), Int32(tokens), Int32(hidden),
                grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
            )
        else:
            raise Error(op, ": unsupported target ", target)


def embedding_int8[OFFSETS: Bool, group: Int, target: StaticString](
    op: StaticString, output: OutputTensor[rank=2, ...], ids: InputTensor[dtype=DType.int32, rank=1, ...],
    q: InputTensor[dtype=DType.int8, rank=2, ...], scales: InputTensor[rank=2, ...],
    offset_ptr: Pointer[Float32, ImmutAnyOrigin], ctx: DeviceContext,
) raises:
    """Both int8 embeddings; without OFFSETS `offset_ptr` is never read."""
    if scales.dtype != DType.float16 and scales.dtype != DType.float32:
        raise Error(op, ": scales must be float16 or float32, got ", scales.dtype)
    var tokens = ids.dim_size(0)
    var hidden = output.dim_size(1)
    check_columns(op, q.dim_size(1), int8_padded_k(hidden, group) * PANEL, hidden)
    if tokens == 0:
        return
    comptime if target == "cpu":
        var q_ptr = q.unsafe_ptr()
        var scale_ptr = scales.unsafe_ptr()

        def weight(n: Int, k: Int) {imm q_ptr, imm scale_ptr, imm offset_ptr, imm hidden} -> Float32:
            comptime if OFFSETS:
                return packed_int8_offset_weight[group](q_ptr, scale_ptr, offset_ptr, hidden, n, k)
            else:
                return packed_int8_weight[group](q_ptr, scale_ptr, hidden, n, k)

        embedding_rows_cpu(op, output.unsafe_ptr(), ids.unsafe_ptr(), tokens, hidden, q.dim_size(0) * PANEL,
                           weight, ctx)
    elif target == "gpu":
        ctx.enqueue_function[embedding_int8_gpu_kernel[output.dtype, scales.dtype, group, OFFSETS]](
            output.unsafe_ptr(), ids.unsafe_ptr(), q.unsafe_ptr(), scales.unsafe_ptr(), offset_ptr, Int32(tokens),
            Int32(hidden), grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
        )
    else:
        raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_packed_embedding_int8")
struct PackedEmbeddingInt8[group_size: Int]:
    """Rows `ids` of an int8-packed [vocab, hidden] weight (float16 or float32 scales), dequantised."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        q: InputTensor[dtype=DType.int8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        # No offsets: the offset pointer is a stand-in that is never read.
        var unused = rebind[Pointer[Float32, ImmutAnyOrigin]](q.unsafe_ptr().unsafe_bitcast[Float32]())
        embedding_int8[False, Self.group_size, target]("mili_packed_embedding_int8", output, ids, q, scales, unused,
                                                       ctx)


@extensibility.register("mili_packed_embedding_int8_offsets")
struct PackedEmbeddingInt8Offsets[group_size: Int]:
    """Rows `ids` of an int8-packed [vocab, hidden] weight with offsets (W = q * scale + offset), dequantised."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        q: InputTensor[dtype=DType.int8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        offsets: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mili_packed_embedding_int8_offsets"
        if offsets.dim_size(0) != scales.dim_size(0) or offsets.dim_size(1) != scales.dim_size(1):
            raise Error(op, ": offsets are [", offsets.dim_size(0), ", ", offsets.dim_size(1), "], the scales [",
                        scales.dim_size(0), ", ", scales.dim_size(1), "]")
        var offset_ptr = rebind[Pointer[Float32, ImmutAnyOrigin]](offsets.unsafe_ptr())
        embedding_int8[True, Self.group_size, target](op, output, ids, q, scales, offset_ptr, ctx)


@extensibility.register("mili_packed_embedding_float")
struct PackedEmbeddingFloat:
    """Rows `ids` of a float16 / float32 [vocab, hidden] weight in k-major panels."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        w: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mili_packed_embedding_float"
        if w.dtype != DType.float16 and w.dtype != DType.float32:
            raise Error(op, ": weights must be float16 or float32, got ", w.dtype)
        var tokens = ids.dim_size(0)
        var hidden = output.dim_size(1)
        check_columns(op, w.dim_size(1), hidden * PANEL, hidden)
        if tokens == 0:
            return
        comptime if target == "cpu":
            var w_ptr = w.unsafe_ptr()

            def weight(n: Int, k: Int) {imm w_ptr, imm hidden} -> Float32:
                return packed_float_weight(w_ptr, hidden, n, k)

            embedding_rows_cpu(op, output.unsafe_ptr(), ids.unsafe_ptr(), tokens, hidden, w.dim_size(0) * PANEL,
                               weight, ctx)
        elif target == "gpu":
            ctx.enqueue_function[embedding_float_gpu_kernel[output.dtype, w.dtype]](
                output.unsafe_ptr(), ids.unsafe_ptr(), w.unsafe_ptr(), Int32(tokens), Int32(hidden),
                grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
            )
        else:
            raise Error(op, ": unsupported target ", target)


def embedding_int4[OFFSETS: Bool, target: StaticString](
    op: StaticString, output: OutputTensor[rank=2, ...], ids: InputTensor[dtype=DType.int32, rank=1, ...],
    codes: InputTensor[dtype=DType.uint8, rank=2, ...], scales: InputTensor[rank=2, ...],
    offsets: InputTensor[rank=2, ...], ctx: DeviceContext,
) raises:
    """Both 4-bit embeddings; without OFFSETS `offsets` is a stand-in that is never read."""
    if scales.dtype != DType.float16 and scales.dtype != DType.float32:
        raise Error(op, ": scales must be float16 or float32, got ", scales.dtype)
    comptime if OFFSETS:
        if offsets.dtype != scales.dtype or offsets.dim_size(0) != scales.dim_size(0) or \
                offsets.dim_size(1) != scales.dim_size(1):
            raise Error(op, ": offsets must have the scales' dtype and shape")
    var tokens = ids.dim_size(0)
    var hidden = output.dim_size(1)
    check_columns(op, codes.dim_size(1), int4_panel_bytes(hidden), hidden)
    check_columns(op, scales.dim_size(1), int8_padded_k(hidden, INT4_GROUP) // INT4_GROUP * PANEL, hidden)
    if tokens == 0:
        return
    var offset_ptr = rebind[Pointer[Scalar[scales.dtype], ImmutAnyOrigin]](
        offsets.unsafe_ptr().unsafe_bitcast[Scalar[scales.dtype]]())
    comptime if target == "cpu":
        var code_ptr = codes.unsafe_ptr()
        var scale_ptr = rebind[Pointer[Scalar[scales.dtype], ImmutAnyOrigin]](scales.unsafe_ptr())

        def weight(n: Int, k: Int) {imm code_ptr, imm scale_ptr, imm offset_ptr, imm hidden} -> Float32:
            return packed_int4_weight[OFFSETS](code_ptr, scale_ptr, offset_ptr, hidden, n, k)

        embedding_rows_cpu(op, output.unsafe_ptr(), ids.unsafe_ptr(), tokens, hidden, codes.dim_size(0) * PANEL,
                           weight, ctx)
    elif target == "gpu":
        ctx.enqueue_function[embedding_int4_gpu_kernel[output.dtype, scales.dtype, OFFSETS]](
            output.unsafe_ptr(), ids.unsafe_ptr(), codes.unsafe_ptr(), scales.unsafe_ptr(), offset_ptr,
            Int32(tokens), Int32(hidden), grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
        )
    else:
        raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_packed_embedding_int4")
struct PackedEmbeddingInt4:
    """Rows `ids` of a 4-bit [vocab, hidden] weight with zero point 8: (q - 8) * scale."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        embedding_int4[False, target]("mili_packed_embedding_int4", output, ids, codes, scales, scales, ctx)


@extensibility.register("mili_packed_embedding_int4_offsets")
struct PackedEmbeddingInt4Offsets:
    """Rows `ids` of a 4-bit [vocab, hidden] weight with offsets: q * scale + offset."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[rank=2, ...],
        offsets: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        embedding_int4[True, target]("mili_packed_embedding_int4_offsets", output, ids, codes, scales, offsets, ctx)


@extensibility.register("mili_packed_embedding_int6")
struct PackedEmbeddingInt6:
    """Rows `ids` of a 6-bit [vocab, hidden] weight (GGUF's Q6_K): (q - 32) * block_scale * scale."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        high_bits: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[dtype=DType.int8, rank=2, ...],
        block_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mili_packed_embedding_int6"
        var tokens = ids.dim_size(0)
        var hidden = output.dim_size(1)
        check_columns(op, codes.dim_size(1), int4_panel_bytes(hidden), hidden)
        check_columns(op, high_bits.dim_size(1), int6_high_panel_bytes(hidden), hidden)
        check_columns(op, scales.dim_size(1), int8_padded_k(hidden, INT4_GROUP) // INT6_SUBGROUP * PANEL, hidden)
        check_columns(op, block_scales.dim_size(1), int6_blocks(hidden) * PANEL, hidden)
        if tokens == 0:
            return
        comptime if target == "cpu":
            var code_ptr = codes.unsafe_ptr()
            var high_ptr = high_bits.unsafe_ptr()
            var scale_ptr = scales.unsafe_ptr()
            var block_ptr = block_scales.unsafe_ptr()

            def weight(n: Int, k: Int) {imm code_ptr, imm high_ptr, imm scale_ptr, imm block_ptr, imm hidden} -> Float32:
                return packed_int6_weight(code_ptr, high_ptr, scale_ptr, block_ptr, hidden, n, k)

            embedding_rows_cpu(op, output.unsafe_ptr(), ids.unsafe_ptr(), tokens, hidden, codes.dim_size(0) * PANEL,
                               weight, ctx)
        elif target == "gpu":
            ctx.enqueue_function[embedding_int6_gpu_kernel[output.dtype]](
                output.unsafe_ptr(), ids.unsafe_ptr(), codes.unsafe_ptr(), high_bits.unsafe_ptr(), scales.unsafe_ptr(),
                block_scales.unsafe_ptr(), Int32(tokens), Int32(hidden), grid_dim=gpu_blocks(tokens * hidden),
                block_dim=GPU_THREADS,
            )
        else:
            raise Error(op, ": unsupported target ", target)


@extensibility.register("mili_packed_embedding_int4_k")
struct PackedEmbeddingInt4K:
    """Rows `ids` of a [vocab, hidden] weight in GGUF Q4_K's layout: q * (block_scale * scale) - block_min * min."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=2, ...],
        ids: InputTensor[dtype=DType.int32, rank=1, ...],
        codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        scales: InputTensor[dtype=DType.uint8, rank=2, ...],
        mins: InputTensor[dtype=DType.uint8, rank=2, ...],
        block_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        block_mins: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime op = "mili_packed_embedding_int4_k"
        var tokens = ids.dim_size(0)
        var hidden = output.dim_size(1)
        var groups = int8_padded_k(hidden, INT4_GROUP) // INT4_GROUP
        check_columns(op, codes.dim_size(1), int4_panel_bytes(hidden), hidden)
        check_columns(op, scales.dim_size(1), groups * PANEL, hidden)
        check_columns(op, mins.dim_size(1), groups * PANEL, hidden)
        check_columns(op, block_scales.dim_size(1), int4_k_blocks(hidden) * PANEL, hidden)
        check_columns(op, block_mins.dim_size(1), int4_k_blocks(hidden) * PANEL, hidden)
        if tokens == 0:
            return
        comptime if target == "cpu":
            var code_ptr = codes.unsafe_ptr()
            var scale_ptr = scales.unsafe_ptr()
            var min_ptr = mins.unsafe_ptr()
            var block_ptr = block_scales.unsafe_ptr()
            var block_min_ptr = block_mins.unsafe_ptr()

            def weight(n: Int, k: Int) {imm code_ptr, imm scale_ptr, imm min_ptr, imm block_ptr, imm block_min_ptr, imm hidden} -> Float32:
                return packed_int4_k_weight(code_ptr, scale_ptr, min_ptr, block_ptr, block_min_ptr, hidden, n, k)

            embedding_rows_cpu(op, output.unsafe_ptr(), ids.unsafe_ptr(), tokens, hidden, codes.dim_size(0) * PANEL,
                               weight, ctx)
        elif target == "gpu":
            ctx.enqueue_function[embedding_int4_k_gpu_kernel[output.dtype]](
                output.unsafe_ptr(), ids.unsafe_ptr(), codes.unsafe_ptr(), scales.unsafe_ptr(), mins.unsafe_ptr(),
                block_scales.unsafe_ptr(), block_mins.unsafe_ptr(), Int32(tokens), Int32(hidden),
                grid_dim=gpu_blocks(tokens * hidden), block_dim=GPU_THREADS,
            )
        else:
            raise Error(op, ": unsupported target ", target)
