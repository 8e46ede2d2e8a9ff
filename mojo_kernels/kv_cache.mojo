# The paged KV cache and the op that stores new tokens' K and V into it.
#
# One buffer holds every layer:  cache [num_layers, 2, num_blocks, kv_heads, block_size * head_dim]
# (index 0 of the second axis is K, 1 is V). Inside a block, for one layer and KV head:
#   V is chunk-major   [head_dim / C, block_size, C]  (C = V_CHUNK dims, or head_dim when it is not a
#                      multiple of V_CHUNK: then simply token-major [block_size, head_dim])
#   K is dim-major     [head_dim, block_size]  (transposed: the block's keys for one dim are contiguous)
# The transposed K lets attention score a whole block of keys with broadcast FMAs over contiguous
# SIMD vectors (no horizontal sums per key), and lets GPU threads that own one key each read coalesced.
# Chunked V serves the weighted V sum, which keeps a few output vectors of each row in registers and so
# takes the dims in passes over the block's keys (32 dims a pass with AVX2's 16 registers): each pass then
# reads one contiguous 1 KB run of the block (16 tokens x 32 bf16 dims) instead of one 64-byte line of every
# 256-byte token row. Measured at batch-1 decode over 28 layers' caches (benchmarks/mojo/attention_decode.mojo,
# context 576, Zen 3, six interleaved pairs): 140-191 us a layer against 194-232 token-major.
#
# mili_kv_store: k, v [tokens, kv_heads, head_dim]; slots [tokens] int32 with slot = block * block_size
# + offset, -1 = padding (skipped); layer [1] int32. Writes in place; nothing else in the cache changes.
import extensibility
from extensibility import InputTensor, ManagedTensorSlice, IOSpec
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, block_dim, grid_dim
from std.algorithm import vectorize
from std.sys import simd_width_of
from .cpu_parallel import parallel_ranges, tasks_for

comptime MutableInputTensor = ManagedTensorSlice[IOSpec.MutableInput, ...]
comptime GPU_THREADS = 256
comptime V_CHUNK = 32  # dims of a V chunk (64 bytes of bfloat16)


@always_inline
def v_chunk(head_dim: Int) -> Int:
    """Dims per V chunk for this head size: V_CHUNK, or the whole row when head_dim is not a multiple of it."""
    return V_CHUNK if head_dim % V_CHUNK == 0 else head_dim


@always_inline
def v_offset(block_size: Int, head_dim: Int, token: Int, dim: Int) -> Int:
    """Offset of V[token, dim] inside one (block, head) V block ([head_dim / C, block_size, C])."""
    var chunk = v_chunk(head_dim)
    return (dim // chunk) * (block_size * chunk) + token * chunk + dim % chunk


@fieldwise_init
struct CacheLayout(TrivialRegisterPassable):
    """Element offsets into the cache buffer for one layer."""

    var num_blocks: Int
    var kv_heads: Int
    var block_size: Int
    var head_dim: Int
    var layer: Int

    @always_inline
    def block_elems(self) -> Int:
        return self.block_size * self.head_dim

    @always_inline
    def k_block(self, block: Int, head: Int) -> Int:
        """Offset of the [head_dim, block_size] K block of (block, head) in this layer."""
        return (((self.layer * 2) * self.num_blocks + block) * self.kv_heads + head) * self.block_elems()

    @always_inline
    def v_block(self, block: Int, head: Int) -> Int:
        """Offset of the chunk-major V block of (block, head) in this layer (v_offset inside it)."""
        return (((self.layer * 2 + 1) * self.num_blocks + block) * self.kv_heads + head) * self.block_elems()


def cache_layout[block_size: Int, head_dim: Int](
    cache: MutableInputTensor[rank=5, ...], layer: Int
) raises -> CacheLayout:
    """Checks the cache shape against the compile-time block size and head dim, and the layer index."""
    if cache.dim_size(4) != block_size * head_dim:
        raise Error("KV cache last dim is ", cache.dim_size(4), ", expected block_size * head_dim = ",
                    block_size * head_dim)
    if cache.dim_size(1) != 2:
        raise Error("KV cache second dim must be 2 (K, V), got ", cache.dim_size(1))
    if layer < 0 or layer >= cache.dim_size(0):
        raise Error("layer ", layer, " is outside the KV cache's ", cache.dim_size(0), " layers")
    return CacheLayout(cache.dim_size(2), cache.dim_size(3), block_size, head_dim, layer)


@always_inline
def store_token_kv[dtype: DType](
    cache_ptr: MutPointer[Scalar[dtype], ...],
    layout: CacheLayout,
    slot: Int,
    k_ptr: Pointer[Scalar[dtype], ...],
    v_ptr: Pointer[Scalar[dtype], ...],
    src_row: Int,
):
    """Writes one token's K and V (rows of [kv_heads, head_dim] starting at `src_row`) at `slot`."""
    var block = slot // layout.block_size
    var offset = slot - block * layout.block_size
    for h in range(layout.kv_heads):
        var k_base = layout.k_block(block, h) + offset
        var v_base = layout.v_block(block, h)
        var src = src_row + h * layout.head_dim
        for d in range(layout.head_dim):  # K is transposed in the block: one strided store per dim
            cache_ptr.unsafe_store(k_base + d * layout.block_size, k_ptr.unsafe_load(src + d))
        var chunk = v_chunk(layout.head_dim)
        for c in range(0, layout.head_dim, chunk):  # V: the token's row of each chunk is contiguous
            var dst = v_base + v_offset(layout.block_size, layout.head_dim, offset, c)

            def copy_v[w: Int](d: Int) {imm cache_ptr, imm v_ptr, imm dst, imm src, imm c}:
                cache_ptr.unsafe_store(dst + d, v_ptr.unsafe_load[width=w](src + c + d))

            vectorize[simd_width_of[dtype]()](chunk, copy_v)


def check_slots(slots_ptr: Pointer[Int32, ...], tokens: Int, layout: CacheLayout) raises:
    var capacity = layout.num_blocks * layout.block_size
    for t in range(tokens):
        var slot = Int(slots_ptr.unsafe_load(t))
        if slot < -1 or slot >= capacity:
            raise Error("slot ", slot, " of token ", t, " is outside the KV cache (", capacity, " slots)")


def kv_store_cpu[dtype: DType](
    cache_ptr: MutPointer[Scalar[dtype], ...],
    layout: CacheLayout,
    k_ptr: Pointer[Scalar[dtype], ...],
    v_ptr: Pointer[Scalar[dtype], ...],
    slots_ptr: Pointer[Int32, ...],
    tokens: Int,
    ctx: DeviceContext,
) raises:
    check_slots(slots_ptr, tokens, layout)
    var row = layout.kv_heads * layout.head_dim

    def do_tokens(start: Int, end: Int) raises {imm cache_ptr, imm layout, imm k_ptr, imm v_ptr, imm slots_ptr, imm row}:
        for t in range(start, end):
            var slot = Int(slots_ptr.unsafe_load(t))
            if slot >= 0:
                store_token_kv[dtype](cache_ptr, layout, slot, k_ptr, v_ptr, t * row)

    parallel_ranges(tokens, tasks_for(tokens * row), do_tokens, ctx)


def kv_store_gpu_kernel[dtype: DType](
    cache_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    k_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    v_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    slots_ptr: Pointer[Int32, ImmutAnyOrigin],
    layer_ptr: Pointer[Int32, ImmutAnyOrigin],
    num_blocks: Int32, kv_heads: Int32, block_size: Int32, head_dim: Int32,
):
    """One block per token; threads stride over kv_heads * head_dim elements."""
    var t = Int(block_idx.x)
    var slot = Int(slots_ptr.unsafe_load(t))
    if slot < 0:
        return
    var layout = CacheLayout(Int(num_blocks), Int(kv_heads), Int(block_size), Int(head_dim),
                             Int(layer_ptr.unsafe_load(0)))
    var block = slot // layout.block_size
    var offset = slot - block * layout.block_size
    var row = layout.kv_heads * layout.head_dim
    var i = Int(thread_idx.x)
    while i < row:
        var h = i // layout.head_dim
        var d = i - h * layout.head_dim
        cache_ptr.unsafe_store(layout.k_block(block, h) + d * layout.block_size + offset,
                               k_ptr.unsafe_load(t * row + i))
        cache_ptr.unsafe_store(layout.v_block(block, h) + v_offset(layout.block_size, layout.head_dim, offset, d),
                               v_ptr.unsafe_load(t * row + i))
        i += Int(block_dim.x)


@extensibility.register("mili_kv_store")
struct KVStore[block_size: Int, head_dim: Int]:
    """Stores K and V of the new tokens into the paged cache at their slots, in place."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        cache: MutableInputTensor[rank=5, ...],
        k: InputTensor[dtype=cache.dtype, rank=3, ...],
        v: InputTensor[dtype=cache.dtype, rank=3, ...],
        slots: InputTensor[dtype=DType.int32, rank=1, ...],
        layer: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = k.dim_size(0)
        if k.dim_size(2) != Self.head_dim or k.dim_size(1) != cache.dim_size(3):
            raise Error("mili_kv_store: k must be [tokens, ", cache.dim_size(3), ", ", Self.head_dim, "]")
        if v.dim_size(0) != tokens or v.dim_size(1) != k.dim_size(1) or v.dim_size(2) != k.dim_size(2):
            raise Error("mili_kv_store: v must have k's shape")
        if slots.dim_size(0) != tokens:
            raise Error("mili_kv_store: ", slots.dim_size(0), " slots for ", tokens, " tokens")
        comptime if target == "cpu":
            var layout = cache_layout[Self.block_size, Self.head_dim](cache, Int(layer.unsafe_ptr().unsafe_load(0)))
            kv_store_cpu[cache.dtype](cache.unsafe_ptr(), layout, k.unsafe_ptr(), v.unsafe_ptr(),
                                      slots.unsafe_ptr(), tokens, ctx)
        elif target == "gpu":
            if tokens == 0:
                return
            ctx.enqueue_function[kv_store_gpu_kernel[cache.dtype]](
                cache.unsafe_ptr(), k.unsafe_ptr(), v.unsafe_ptr(), slots.unsafe_ptr(), layer.unsafe_ptr(),
                Int32(cache.dim_size(2)), Int32(cache.dim_size(3)), Int32(Self.block_size), Int32(Self.head_dim),
                grid_dim=tokens, block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_kv_store: unsupported target ", target)
