# Flash attention over the paged KV cache for a ragged batch (prefill, chunked prefill, decode and
# speculative verification are all the same op).
#
#   q:            [tokens, num_heads, head_dim]       new tokens of all sequences, back to back
#   cache:        see kv_cache.mojo (every layer; K transposed per block); read only here
#   layer:        [1] int32
#   query_start:  [batch + 1] int32                    sequence b owns q rows query_start[b] .. [b+1]
#   context_lens: [batch] int32                        cached + new tokens of b (new ones already stored)
#   block_tables: [batch, max_blocks] int32            physical block of each logical block of b
#   out:          [tokens, num_heads, head_dim]
#
# New token i of sequence b (q_len_b new tokens, context_len_b in the cache) attends to cache positions
# < context_len_b - q_len_b + i + 1 (causal). Query head h reads KV head h // (num_heads / kv_heads) (GQA).
# Scores are scaled by 1/sqrt(head_dim); softmax is online (running max and sum) in float32, one KV block
# at a time, so nothing of size context is ever materialised.
#
# CPU: a work item is (sequence, KV head, a tile of up to MAX_ROWS query rows = tokens x heads of that KV
# head's group). Its rows share every K/V block load. Scores for a block come from broadcast FMAs over the
# transposed K block (contiguous SIMD vectors of keys, no per-key horizontal sums). When there are too few
# items to keep every core busy (long-context decode at small batch), each item's key range is split into
# block-aligned parts computed in parallel, and their partial softmaxes (max, sum, unnormalised output)
# are merged afterwards.
# GPU: one thread block per (token, head); threads own one key each for scoring and output dims for the
# weighted V sum; block-wide max/sum reductions in shared memory.
import extensibility
from extensibility import InputTensor, OutputTensor, ManagedTensorSlice, IOSpec
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, barrier
from .cpu_parallel import parallel_for
from std.algorithm import vectorize
from std.memory import stack_allocation, AddressSpace
from std.sys import simd_width_of, num_physical_cores, size_of
from std.sys.intrinsics import prefetch, PrefetchOptions
from std.math import exp, sqrt, ceildiv, iota
from .kv_cache import CacheLayout, cache_layout
from .gpu_reduce import block_sum, block_max
from .convert import narrow

comptime MutableInputTensor = ManagedTensorSlice[IOSpec.MutableInput, ...]
comptime MAX_ROWS = 16  # query rows (tokens x heads) a CPU work item scores against each K block
comptime MIN_KEYS_PER_SPLIT = 256  # a split part smaller than this is not worth its merge
comptime NO_SCORE: Float32 = -1.0e30  # finite "minus infinity": exp() of it is 0 and it never makes NaN
comptime GPU_THREADS = 128
comptime F32_WIDTH = simd_width_of[DType.float32]()


@fieldwise_init
struct Tile(TrivialRegisterPassable):
    """One CPU work item: rows (tokens first_token..end_token x heads first_head..end_head) of sequence
    `seq` against keys [key_lo, key_hi), for KV head `kv_head`. A tile whose key range was split into
    `parts` consecutive tiles writes partial result slot `partial`; an unsplit one (parts = 1,
    partial = -1) writes the final output directly."""

    var seq: Int
    var kv_head: Int
    var first_head: Int
    var end_head: Int
    var first_token: Int
    var end_token: Int
    var key_lo: Int
    var key_hi: Int
    var partial: Int
    var parts: Int


@fieldwise_init
struct BatchShape(TrivialRegisterPassable):
    """Sizes of the ragged batch (its index arrays travel as separate pointers)."""

    var batch: Int
    var max_blocks: Int
    var num_heads: Int
    var group: Int  # query heads per KV head


@always_inline
def seq_q_len(query_start: Pointer[Int32, ...], seq: Int) -> Int:
    return Int(query_start.unsafe_load(seq + 1)) - Int(query_start.unsafe_load(seq))


@always_inline
def seq_first_key_limit(query_start: Pointer[Int32, ...], context_lens: Pointer[Int32, ...], seq: Int) -> Int:
    """Keys visible to the sequence's first new token (each later token sees one more)."""
    return Int(context_lens.unsafe_load(seq)) - seq_q_len(query_start, seq) + 1


def validate_batch(
    query_start: Pointer[Int32, ...],
    context_lens: Pointer[Int32, ...],
    block_tables: Pointer[Int32, ...],
    batch: BatchShape,
    tokens: Int,
    layout: CacheLayout,
) raises:
    """Host-side checks that keep every cache read in bounds."""
    if Int(query_start.unsafe_load(0)) != 0 or Int(query_start.unsafe_load(batch.batch)) != tokens:
        raise Error("query_start must start at 0 and end at the number of tokens (", tokens, ")")
    for b in range(batch.batch):
        var q_len = seq_q_len(query_start, b)
        var context = Int(context_lens.unsafe_load(b))
        if q_len < 1:
            raise Error("sequence ", b, " has ", q_len, " new tokens; every sequence needs at least one")
        if context < q_len:
            raise Error("sequence ", b, ": context_len ", context, " is less than its ", q_len, " new tokens")
        var blocks = ceildiv(context, layout.block_size)
        if blocks > batch.max_blocks:
            raise Error("sequence ", b, ": context_len ", context, " needs ", blocks, " blocks, its table has ",
                        batch.max_blocks)
        for j in range(blocks):
            var block = Int(block_tables.unsafe_load(b * batch.max_blocks + j))
            if block < 0 or block >= layout.num_blocks:
                raise Error("sequence ", b, ": block table entry ", j, " = ", block, " is not a cache block (0..",
                            layout.num_blocks - 1, ")")


def plan_tiles(
    query_start: Pointer[Int32, ...],
    context_lens: Pointer[Int32, ...],
    batch: BatchShape,
    layout: CacheLayout,
    workers: Int,
    mut tiles: List[Tile],
    mut split_groups: List[Int],
) -> Int:
    """Fills `tiles` with the work items and `split_groups` with the index of the first part of each
    split tile; returns how many partial-result slots they use."""
    var tokens_per_tile = max(1, MAX_ROWS // batch.group)
    var heads_per_tile = min(batch.group, MAX_ROWS)
    var base_items = 0
    for b in range(batch.batch):
        base_items += ceildiv(seq_q_len(query_start, b), tokens_per_tile) * ceildiv(batch.group, heads_per_tile)
    base_items *= layout.kv_heads
    var wanted = 4 * workers  # enough items that uneven ones still balance across cores
    var partials = 0
    for b in range(batch.batch):
        var q_len = seq_q_len(query_start, b)
        var keys = Int(context_lens.unsafe_load(b))
        var splits = 1
        if base_items < wanted:
            splits = max(1, min(ceildiv(wanted, base_items), keys // MIN_KEYS_PER_SPLIT))
        # Block-aligned split boundaries: every part starts on a block.
        var keys_per_split = ceildiv(ceildiv(keys, splits), layout.block_size) * layout.block_size
        splits = ceildiv(keys, keys_per_split)
        for g in range(layout.kv_heads):
            for h0 in range(0, batch.group, heads_per_tile):
                for i0 in range(0, q_len, tokens_per_tile):
                    if splits > 1:
                        split_groups.append(len(tiles))
                    for s in range(splits):
                        var slot = -1
                        if splits > 1:
                            slot = partials
                            partials += 1
                        tiles.append(Tile(b, g, h0, min(batch.group, h0 + heads_per_tile), i0,
                                          min(q_len, i0 + tokens_per_tile), s * keys_per_split,
                                          min(keys, (s + 1) * keys_per_split), slot, splits))
    return partials


def attend_tile[dtype: DType, head_dim: Int, block_size: Int](
    tile: Tile,
    batch: BatchShape,
    query_start: Pointer[Int32, ...],
    context_lens: Pointer[Int32, ...],
    block_tables: Pointer[Int32, ...],
    layout: CacheLayout,
    q_ptr: Pointer[Scalar[dtype], ...],
    cache_ptr: Pointer[Scalar[dtype], ...],
    out_ptr: MutPointer[Scalar[dtype], ...],
    partial_ptr: MutPointer[Float32, ...],
    scale: Float32,
):
    """Attention of one tile's rows over keys [key_lo, key_hi): final output, or a partial result
    (max, sum, unnormalised output per row) when the tile is one part of a split key range."""
    comptime D = head_dim
    comptime BS = block_size
    comptime KC = min(BS, F32_WIDTH)  # keys scored per SIMD vector
    comptime LINE_ELEMS = 64 // size_of[dtype]()  # elements per cache line
    comptime assert BS % KC == 0, "block_size must be a multiple of the key chunk"
    comptime assert D % 4 == 0, "head_dim must be a multiple of 4"
    var heads = tile.end_head - tile.first_head
    var rows = (tile.end_token - tile.first_token) * heads
    var q_rows = stack_allocation[MAX_ROWS * D, Float32]()
    var acc = stack_allocation[MAX_ROWS * D, Float32]()
    var scores = stack_allocation[MAX_ROWS * BS, Float32]()
    var row_max = stack_allocation[MAX_ROWS, Float32]()
    var row_sum = stack_allocation[MAX_ROWS, Float32]()
    var row_limit = stack_allocation[MAX_ROWS, Int]()
    var row_keys = stack_allocation[MAX_ROWS, Int]()
    var token_base = Int(query_start.unsafe_load(tile.seq))
    var first_limit = seq_first_key_limit(query_start, context_lens, tile.seq)

    var max_limit = 0
    for r in range(rows):
        var i = tile.first_token + r // heads
        var head = tile.kv_head * batch.group + tile.first_head + r % heads
        var q_base = ((token_base + i) * batch.num_heads + head) * D
        for d in range(D):
            q_rows.unsafe_store(r * D + d, q_ptr.unsafe_load(q_base + d).cast[DType.float32]() * scale)
        for d in range(D):
            acc.unsafe_store(r * D + d, 0)
        row_max.unsafe_store(r, NO_SCORE)
        row_sum.unsafe_store(r, 0)
        var limit = min(first_limit + i, tile.key_hi)
        row_limit.unsafe_store(r, limit)
        max_limit = max(max_limit, limit)

    var table_row = tile.seq * batch.max_blocks
    var block_start = tile.key_lo
    while block_start < max_limit:
        var physical = Int(block_tables.unsafe_load(table_row + block_start // BS))
        var k_block = layout.k_block(physical, tile.kv_head)
        var v_block = layout.v_block(physical, tile.kv_head)
        if block_start + BS < max_limit:
            # Blocks are scattered in memory, so the hardware prefetcher cannot see the next one coming:
            # ask for it while this one is computed (decode is a pure stream over K and V).
            var next_physical = Int(block_tables.unsafe_load(table_row + block_start // BS + 1))
            var next_k = layout.k_block(next_physical, tile.kv_head)
            var next_v = layout.v_block(next_physical, tile.kv_head)
            for offset in range(0, BS * D, LINE_ELEMS):
                prefetch[PrefetchOptions().for_read().high_locality()](cache_ptr.unsafe_offset(next_k + offset))
                prefetch[PrefetchOptions().for_read().high_locality()](cache_ptr.unsafe_offset(next_v + offset))
        for r in range(rows):
            var n = max(0, min(BS, row_limit.unsafe_load(r) - block_start))
            row_keys.unsafe_store(r, n)
            if n == 0:
                continue
            # Scores of this row against the block's keys, KC keys per vector.
            var best = SIMD[DType.float32, KC](NO_SCORE)
            for c in range(0, n, KC):
                # Four independent accumulators hide the FMA latency of one long chain over head_dim.
                var s0 = SIMD[DType.float32, KC](0)
                var s1 = SIMD[DType.float32, KC](0)
                var s2 = SIMD[DType.float32, KC](0)
                var s3 = SIMD[DType.float32, KC](0)
                var q_row = r * D
                var k_col = k_block + c
                for d in range(0, D, 4):
                    s0 += q_rows.unsafe_load(q_row + d) * cache_ptr.unsafe_load[width=KC](
                        k_col + d * BS).cast[DType.float32]()
                    s1 += q_rows.unsafe_load(q_row + d + 1) * cache_ptr.unsafe_load[width=KC](
                        k_col + (d + 1) * BS).cast[DType.float32]()
                    s2 += q_rows.unsafe_load(q_row + d + 2) * cache_ptr.unsafe_load[width=KC](
                        k_col + (d + 2) * BS).cast[DType.float32]()
                    s3 += q_rows.unsafe_load(q_row + d + 3) * cache_ptr.unsafe_load[width=KC](
                        k_col + (d + 3) * BS).cast[DType.float32]()
                var s = (s0 + s1) + (s2 + s3)
                var valid = iota[DType.int32, KC]().lt(SIMD[DType.int32, KC](Int32(n - c)))
                s = valid.select(s, SIMD[DType.float32, KC](NO_SCORE))
                scores.unsafe_store(r * BS + c, s)
                best = max(best, s)
            # Online softmax: rescale what was accumulated under the old running max.
            var old_max = row_max.unsafe_load(r)
            var new_max = max(old_max, best.reduce_max())
            var alpha = exp(old_max - new_max)
            var block_sum = SIMD[DType.float32, KC](0)
            for c in range(0, n, KC):
                var p = exp(scores.unsafe_load[width=KC](r * BS + c) - new_max)
                scores.unsafe_store(r * BS + c, p)
                block_sum += p
            row_sum.unsafe_store(r, row_sum.unsafe_load(r) * alpha + block_sum.reduce_add())
            row_max.unsafe_store(r, new_max)
            if alpha != 1.0:
                def rescale[w: Int](d: Int) {imm acc, imm r, imm alpha}:
                    acc.unsafe_store(r * D + d, acc.unsafe_load[width=w](r * D + d) * alpha)

                vectorize[F32_WIDTH](D, rescale)
        # Weighted sum of V rows. A row's whole output (head_dim floats) stays in registers across the
        # block's keys; the V block is read from L1 for the tile's other rows.
        for r in range(rows):
            var n = row_keys.unsafe_load(r)
            if n == 0:
                continue
            var out_row = acc.unsafe_load[width=D](r * D)
            for t in range(n):
                var v = cache_ptr.unsafe_load[width=D](v_block + t * D).cast[DType.float32]()
                out_row += scores.unsafe_load(r * BS + t) * v
            acc.unsafe_store(r * D, out_row)
        block_start += BS

    for r in range(rows):
        if tile.partial >= 0:
            var base = (tile.partial * MAX_ROWS + r) * (D + 2)
            partial_ptr.unsafe_store(base, row_max.unsafe_load(r))
            partial_ptr.unsafe_store(base + 1, row_sum.unsafe_load(r))
            for d in range(D):
                partial_ptr.unsafe_store(base + 2 + d, acc.unsafe_load(r * D + d))
        else:
            var i = tile.first_token + r // heads
            var head = tile.kv_head * batch.group + tile.first_head + r % heads
            var out_base = ((token_base + i) * batch.num_heads + head) * D
            var inv_sum = 1.0 / row_sum.unsafe_load(r)
            for d in range(D):
                out_ptr.unsafe_store(out_base + d, narrow[dtype](acc.unsafe_load(r * D + d) * inv_sum))


def merge_partials[dtype: DType, head_dim: Int](
    tiles: List[Tile],
    first: Int,
    batch: BatchShape,
    query_start: Pointer[Int32, ...],
    out_ptr: MutPointer[Scalar[dtype], ...],
    partial_ptr: Pointer[Float32, ...],
):
    """Combines the split results of one tile (tiles[first ..< first + parts]) into the output."""
    comptime D = head_dim
    var tile = tiles[first]
    var parts = tile.parts
    var heads = tile.end_head - tile.first_head
    var rows = (tile.end_token - tile.first_token) * heads
    var token_base = Int(query_start.unsafe_load(tile.seq))
    for r in range(rows):
        var overall_max = NO_SCORE
        for s in range(parts):
            var base = (tiles[first + s].partial * MAX_ROWS + r) * (D + 2)
            overall_max = max(overall_max, partial_ptr.unsafe_load(base))
        var total = Float32(0)
        for s in range(parts):
            var base = (tiles[first + s].partial * MAX_ROWS + r) * (D + 2)
            total += partial_ptr.unsafe_load(base + 1) * exp(partial_ptr.unsafe_load(base) - overall_max)
        var i = tile.first_token + r // heads
        var head = tile.kv_head * batch.group + tile.first_head + r % heads
        var out_base = ((token_base + i) * batch.num_heads + head) * D
        for d in range(D):
            var value = Float32(0)
            for s in range(parts):
                var base = (tiles[first + s].partial * MAX_ROWS + r) * (D + 2)
                value += partial_ptr.unsafe_load(base + 2 + d) * exp(partial_ptr.unsafe_load(base) - overall_max)
            out_ptr.unsafe_store(out_base + d, narrow[dtype](value / total))


def paged_attention_cpu[dtype: DType, head_dim: Int, block_size: Int](
    out_ptr: MutPointer[Scalar[dtype], ...],
    q_ptr: Pointer[Scalar[dtype], ...],
    cache_ptr: Pointer[Scalar[dtype], ...],
    layout: CacheLayout,
    query_start: Pointer[Int32, ...],
    context_lens: Pointer[Int32, ...],
    block_tables: Pointer[Int32, ...],
    batch: BatchShape,
    tokens: Int,
    ctx: DeviceContext,
) raises:
    validate_batch(query_start, context_lens, block_tables, batch, tokens, layout)
    var tiles = List[Tile]()
    var split_groups = List[Int]()
    var num_partials = plan_tiles(query_start, context_lens, batch, layout, num_physical_cores(), tiles,
                                  split_groups)
    var partials = List[Float32](length=max(1, num_partials * MAX_ROWS * (head_dim + 2)), fill=0)
    var partial_ptr = partials.unsafe_ptr()
    var scale = 1.0 / sqrt(Float32(head_dim))
    var num_tiles = len(tiles)

    def run_tile(i: Int) raises {imm tiles, imm batch, imm query_start, imm context_lens, imm block_tables, imm layout, imm q_ptr, imm cache_ptr, imm out_ptr, imm partial_ptr, imm scale}:
        attend_tile[dtype, head_dim, block_size](tiles[i], batch, query_start, context_lens, block_tables,
                                                 layout, q_ptr, cache_ptr, out_ptr, partial_ptr, scale)

    parallel_for(num_tiles, run_tile, ctx)
    if len(split_groups) == 0:
        return

    def merge_group(g: Int) raises {imm tiles, imm split_groups, imm batch, imm query_start, imm out_ptr, imm partial_ptr}:
        merge_partials[dtype, head_dim](tiles, split_groups[g], batch, query_start, out_ptr, partial_ptr)

    parallel_for(len(split_groups), merge_group, ctx)
    _ = len(partials)  # the partial results must outlive both phases


def paged_attention_gpu_kernel[dtype: DType, head_dim: Int, block_size: Int](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    q_ptr: Pointer[Scalar[dtype], ImmutAnyOrigin],
    cache_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    layer_ptr: Pointer[Int32, ImmutAnyOrigin],
    query_start: Pointer[Int32, ImmutAnyOrigin],
    context_lens: Pointer[Int32, ImmutAnyOrigin],
    block_tables: Pointer[Int32, ImmutAnyOrigin],
    batch_size: Int32,
    num_heads: Int32,
    kv_heads: Int32,
    num_blocks: Int32,
    max_blocks: Int32,
):
    """One block per (token, head): grid (tokens, num_heads)."""
    comptime D = head_dim
    comptime BS = block_size
    comptime DIMS_PER_THREAD = 4  # output dims each thread owns: head_dim <= 4 * GPU_THREADS
    comptime assert D <= DIMS_PER_THREAD * GPU_THREADS, "head_dim too large for the GPU attention kernel"
    var token = Int(block_idx.x)
    var head = Int(block_idx.y)
    var tid = Int(thread_idx.x)
    # The sequence owning this token: the last b with query_start[b] <= token.
    var lo = 0
    var hi = Int(batch_size)
    while hi - lo > 1:
        var mid = (lo + hi) // 2
        if Int(query_start.unsafe_load(mid)) <= token:
            lo = mid
        else:
            hi = mid
    var seq = lo
    var q_len = Int(query_start.unsafe_load(seq + 1)) - Int(query_start.unsafe_load(seq))
    var i = token - Int(query_start.unsafe_load(seq))
    var limit = Int(context_lens.unsafe_load(seq)) - q_len + i + 1
    var kv_head = head // (Int(num_heads) // Int(kv_heads))
    var layout = CacheLayout(Int(num_blocks), Int(kv_heads), BS, D, Int(layer_ptr.unsafe_load(0)))
    var table_row = seq * Int(max_blocks)

    var q_shared = stack_allocation[D, Float32, address_space=AddressSpace.SHARED]()
    var p_shared = stack_allocation[GPU_THREADS, Float32, address_space=AddressSpace.SHARED]()
    var scratch = stack_allocation[GPU_THREADS, Float32, address_space=AddressSpace.SHARED]()
    var scale = 1.0 / sqrt(Float32(D))
    var d = tid
    while d < D:
        q_shared.unsafe_store(d, q_ptr.unsafe_load((token * Int(num_heads) + head) * D + d).cast[DType.float32]() * scale)
        d += GPU_THREADS
    barrier()

    var acc = SIMD[DType.float32, DIMS_PER_THREAD](0)
    var running_max = NO_SCORE
    var running_sum = Float32(0)
    var chunk = 0
    while chunk < limit:
        var t = chunk + tid
        var score = NO_SCORE
        if t < limit:
            var physical = Int(block_tables.unsafe_load(table_row + t // BS))
            var k_base = layout.k_block(physical, kv_head) + t % BS
            var s = Float32(0)
            for dd in range(D):
                s += q_shared.unsafe_load(dd) * cache_ptr.unsafe_load(k_base + dd * BS).cast[DType.float32]()
            score = s
        var new_max = max(running_max, block_max[GPU_THREADS](scratch, tid, score))
        var p = Float32(0)
        if t < limit:
            p = exp(score - new_max)
        var alpha = exp(running_max - new_max)
        running_sum = running_sum * alpha + block_sum[GPU_THREADS](scratch, tid, p)
        running_max = new_max
        p_shared.unsafe_store(tid, p)
        barrier()
        var n = min(GPU_THREADS, limit - chunk)
        for k in range(DIMS_PER_THREAD):
            var dim = tid + k * GPU_THREADS
            if dim < D:
                var a = acc[k] * alpha
                for tt in range(n):
                    var key = chunk + tt
                    var physical = Int(block_tables.unsafe_load(table_row + key // BS))
                    var v = cache_ptr.unsafe_load(layout.v_block(physical, kv_head) + (key % BS) * D + dim)
                    a += p_shared.unsafe_load(tt) * v.cast[DType.float32]()
                acc[k] = a
        barrier()  # p_shared is rewritten by the next chunk
        chunk += GPU_THREADS

    for k in range(DIMS_PER_THREAD):
        var dim = tid + k * GPU_THREADS
        if dim < D:
            out_ptr.unsafe_store((token * Int(num_heads) + head) * D + dim, (acc[k] / running_sum).cast[dtype]())


@extensibility.register("mili_paged_attention")
struct PagedAttention[block_size: Int, head_dim: Int]:
    """Causal GQA attention of the new tokens over the paged KV cache, for a ragged batch."""

    @staticmethod
    def execute[
        target: StaticString,
    ](
        output: OutputTensor[rank=3, ...],
        cache: MutableInputTensor[dtype=output.dtype, rank=5, ...],
        q: InputTensor[dtype=output.dtype, rank=3, ...],
        layer: InputTensor[dtype=DType.int32, rank=1, ...],
        query_start: InputTensor[dtype=DType.int32, rank=1, ...],
        context_lens: InputTensor[dtype=DType.int32, rank=1, ...],
        block_tables: InputTensor[dtype=DType.int32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var tokens = q.dim_size(0)
        var num_heads = q.dim_size(1)
        var kv_heads = cache.dim_size(3)
        var batch_size = context_lens.dim_size(0)
        if q.dim_size(2) != Self.head_dim:
            raise Error("mili_paged_attention: q has head_dim ", q.dim_size(2), ", expected ", Self.head_dim)
        if num_heads % kv_heads != 0:
            raise Error("mili_paged_attention: ", num_heads, " query heads are not a multiple of ", kv_heads,
                        " KV heads")
        if query_start.dim_size(0) != batch_size + 1 or block_tables.dim_size(0) != batch_size:
            raise Error("mili_paged_attention: query_start needs batch + 1 entries and block_tables batch rows")
        if tokens == 0:
            return
        comptime if target == "cpu":
            var layout = cache_layout[Self.block_size, Self.head_dim](cache, Int(layer.unsafe_ptr().unsafe_load(0)))
            var batch = BatchShape(batch_size, block_tables.dim_size(1), num_heads, num_heads // kv_heads)
            paged_attention_cpu[output.dtype, Self.head_dim, Self.block_size](
                output.unsafe_ptr(), q.unsafe_ptr(), cache.unsafe_ptr(), layout, query_start.unsafe_ptr(),
                context_lens.unsafe_ptr(), block_tables.unsafe_ptr(), batch, tokens, ctx)
        elif target == "gpu":
            ctx.enqueue_function[paged_attention_gpu_kernel[output.dtype, Self.head_dim, Self.block_size]](
                output.unsafe_ptr(), q.unsafe_ptr(), cache.unsafe_ptr(), layer.unsafe_ptr(),
                query_start.unsafe_ptr(), context_lens.unsafe_ptr(), block_tables.unsafe_ptr(),
                Int32(batch_size), Int32(num_heads), Int32(kv_heads), Int32(cache.dim_size(2)),
                Int32(block_tables.dim_size(1)),
                grid_dim=(tokens, num_heads), block_dim=GPU_THREADS,
            )
        else:
            raise Error("mili_paged_attention: unsupported target ", target)
