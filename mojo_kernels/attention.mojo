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
# CPU: a work item (tile) is (sequence, a run of KV heads, a tile of up to MAX_ROWS query rows = tokens x
# heads of those KV heads' groups). A tile walks the sequence's blocks once; inside a block it takes its KV
# heads in turn, which lie side by side in the cache (one head's block is only 4 KB). Rows that share a KV head
# share every K/V vector load and its widening to float32: scores come from broadcast FMAs over the
# transposed K block (contiguous SIMD vectors of keys, no per-key horizontal sums), a few rows at a time; the
# weighted V sum keeps a chunk of each row's output in registers across the keys. With a bfloat16 cache on a
# CPU with AVX512_BF16 both products use vdpbf16ps instead (two bf16 multiply-adds per float32 lane): K rows
# d and d + 1 (and V rows t and t + 1) are interleaved into pairs once for all rows, queries and the bf16-rounded
# probabilities are broadcast pairs. The online softmax takes STEP_KEYS keys (several blocks) per step, so
# its per-row work (max, rescale, sums) is paid once per step rather than per block.
# Every row takes its keys in parts of PART_KEYS keys at fixed positions (0, PART_KEYS, ...): each part's softmax
# (max, sum, unnormalised output) starts afresh, and the parts are folded into the row's result one after the
# other, in order (fold_weights / fold). A sequence with a single token tile (decode, short verification) computes
# its parts in parallel, one tile each, and merges them afterwards with the same fold; a longer one folds them as
# it walks its keys. So a row's arithmetic depends on its own keys alone, not on how its sequence was chunked nor
# on the rest of the batch: a decode, a short chunk, a verification row and the same row inside a long prefill
# give the same bits. Tiles get fewer KV heads when there would otherwise be fewer tiles than cores.
# GPU: one thread block per (token, head); threads own one key each for scoring and output dims for the
# weighted V sum; block-wide max/sum reductions in shared memory.
import extensibility
from extensibility import InputTensor, OutputTensor, ManagedTensorSlice, IOSpec
from max.gpu.host import DeviceContext
from max.gpu import block_idx, thread_idx, barrier
from .cpu_parallel import parallel_for, for_row_groups
from std.algorithm import vectorize
from std.memory import stack_allocation, AddressSpace
from std.sys import simd_width_of, num_physical_cores, size_of
from std.sys.intrinsics import prefetch, PrefetchOptions
from std.math import exp, sqrt, ceildiv, iota
from .kv_cache import CacheLayout, cache_layout, v_chunk, v_offset
from .gpu_reduce import block_sum, block_max
from .convert import narrow, widen
from .linear_cpu import has_dot_bf16, dot_bf16_pairs
from std.memory import bitcast

comptime MutableInputTensor = ManagedTensorSlice[IOSpec.MutableInput, ...]
comptime MAX_ROWS = 16  # query rows (tokens x heads) a CPU work item scores against each K block
comptime PART_KEYS = 256  # keys per softmax part (rounded up to whole steps); a fold costs about one block
comptime STEP_KEYS = 128  # keys (whole blocks) per online-softmax step: one row max, rescale and sum per step
comptime NO_SCORE: Float32 = -1.0e30  # finite "minus infinity": exp() of it is 0 and it never makes NaN
comptime GPU_THREADS = 128
comptime F32_WIDTH = simd_width_of[DType.float32]()


@fieldwise_init
struct Tile(TrivialRegisterPassable):
    """One CPU work item: rows of sequence `seq` against keys [key_lo, key_hi), for KV heads
    kv_head ..< kv_head + kv_count. Its rows are KV head-major: for each of its KV heads, tokens
    first_token ..< end_token x query heads first_head ..< end_head of that KV head's group. A tile whose key
    range was split into `parts` consecutive tiles writes partial result slot `partial`; an unsplit one
    (parts = 1, partial = -1) writes the final output directly."""

    var seq: Int
    var kv_head: Int
    var kv_count: Int
    var first_head: Int
    var end_head: Int
    var first_token: Int
    var end_token: Int
    var key_lo: Int
    var key_hi: Int
    var partial: Int
    var parts: Int

    @always_inline
    def rows_per_kv_head(self) -> Int:
        return (self.end_token - self.first_token) * (self.end_head - self.first_head)

    @always_inline
    def rows(self) -> Int:
        return self.kv_count * self.rows_per_kv_head()

    @always_inline
    def token(self, r: Int) -> Int:
        """The sequence-relative new token of row r."""
        return self.first_token + (r % self.rows_per_kv_head()) // (self.end_head - self.first_head)

    @always_inline
    def head(self, r: Int, group: Int) -> Int:
        """The query head of row r."""
        var heads = self.end_head - self.first_head
        return (self.kv_head + r // self.rows_per_kv_head()) * group + self.first_head + r % heads


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


@always_inline
def step_keys(block_size: Int) -> Int:
    """Keys per online-softmax step: whole blocks, about STEP_KEYS of them (at least one block)."""
    return max(1, STEP_KEYS // block_size) * block_size


@always_inline
def part_keys(block_size: Int) -> Int:
    """Keys per softmax part: PART_KEYS rounded up to whole online-softmax steps, so steps never straddle parts."""
    var step = step_keys(block_size)
    return ceildiv(PART_KEYS, step) * step


@fieldwise_init
struct FoldWeights(TrivialRegisterPassable):
    """How a part's softmax joins the parts folded before it: both are rescaled to the new running max."""

    var new_max: Float32
    var earlier: Float32  # multiplies the sum and output folded so far
    var part: Float32  # multiplies the part's own sum and output


@always_inline
def fold_weights(running_max: Float32, part_max: Float32) -> FoldWeights:
    """The weights that fold a part whose scores peak at part_max into a running result that peaks at running_max.
    A part that saw no key (NO_SCORE) gets weight 0 and leaves the result as it was; the first part meets the
    empty start (NO_SCORE, zeros) and is taken as it is (weights 0 and 1)."""
    var new_max = max(running_max, part_max)
    return FoldWeights(new_max, exp(running_max - new_max), exp(part_max - new_max))


@always_inline
def fold[w: SIMDLength, //](
    earlier: SIMD[DType.float32, w], part: SIMD[DType.float32, w], weights: FoldWeights
) -> SIMD[DType.float32, w]:
    """Earlier * weights.earlier + part * weights.part, rounded one way wherever parts are folded (a tile walking
    its parts and the merge of a split sequence's parts must give the same bits)."""
    return part.fma(SIMD[DType.float32, w](weights.part), earlier * weights.earlier)


@always_inline
def fold_rows[D: Int](
    rows: Int,
    part_acc: MutPointer[Float32, ...], part_max: MutPointer[Float32, ...], part_sum: MutPointer[Float32, ...],
    total_acc: MutPointer[Float32, ...], total_max: MutPointer[Float32, ...], total_sum: MutPointer[Float32, ...],
):
    """Folds each row's finished part into its running result and clears the part for the next one."""
    comptime W = F32_WIDTH
    for r in range(rows):
        var weights = fold_weights(total_max.unsafe_load(r), part_max.unsafe_load(r))
        total_max.unsafe_store(r, weights.new_max)
        total_sum.unsafe_store(r, fold(total_sum.unsafe_load(r), part_sum.unsafe_load(r), weights))
        for d in range(r * D, (r + 1) * D, W):
            total_acc.unsafe_store(d, fold(total_acc.unsafe_load[width=W](d), part_acc.unsafe_load[width=W](d),
                                           weights))
            part_acc.unsafe_store(d, SIMD[DType.float32, W](0))
        part_max.unsafe_store(r, NO_SCORE)
        part_sum.unsafe_store(r, 0)


def key_splits(q_len: Int, tokens_per_tile: Int, keys: Int, block_size: Int) -> Int:
    """Tiles a sequence's key range is split into: a sequence with one token tile (decode, short verification)
    computes each part in a tile of its own, so its long context is read by every core; one with many token
    tiles has parallel work already and folds its parts in turn. Depends on the sequence alone, so its
    arithmetic never depends on the rest of the batch (and a split changes no bit of it either)."""
    if q_len > tokens_per_tile:
        return 1
    return ceildiv(keys, part_keys(block_size))


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
    split tile; returns how many partial-result slots they use. A tile takes as many KV heads as fit
    MAX_ROWS rows, so that it walks K and V blocks that lie side by side in the cache (one KV head's block is
    only 4 KB; all of a block's heads are contiguous), unless that would leave cores idle."""
    var tokens_per_tile = max(1, MAX_ROWS // batch.group)
    var heads_per_tile = min(batch.group, MAX_ROWS)
    var kv_cap = layout.kv_heads
    while True:
        tiles.clear()
        split_groups.clear()
        var partials = 0
        for b in range(batch.batch):
            var q_len = seq_q_len(query_start, b)
            var keys = Int(context_lens.unsafe_load(b))
            var rows_per_kv = min(q_len, tokens_per_tile) * heads_per_tile
            var kv_per_tile = max(1, min(kv_cap, MAX_ROWS // rows_per_kv))
            var splits = key_splits(q_len, tokens_per_tile, keys, layout.block_size)
            var keys_per_split = part_keys(layout.block_size) if splits > 1 else keys
            for g in range(0, layout.kv_heads, kv_per_tile):
                for h0 in range(0, batch.group, heads_per_tile):
                    for i0 in range(0, q_len, tokens_per_tile):
                        if splits > 1:
                            split_groups.append(len(tiles))
                        for s in range(splits):
                            var slot = -1
                            if splits > 1:
                                slot = partials
                                partials += 1
                            tiles.append(Tile(b, g, min(kv_per_tile, layout.kv_heads - g), h0,
                                              min(batch.group, h0 + heads_per_tile), i0,
                                              min(q_len, i0 + tokens_per_tile), s * keys_per_split,
                                              min(keys, (s + 1) * keys_per_split), slot, splits))
        # Fewer tiles than cores: give each tile fewer KV heads (this never changes a row's arithmetic).
        if len(tiles) >= workers or kv_cap == 1:
            return partials
        kv_cap = max(1, kv_cap // 2)


@always_inline
def score_rows_per_call() -> Int:
    """Query rows scored together against one K block: 2 rows x 2 chunks x 2 accumulator sets = 8 registers on
    AVX2 (16), 8 rows x 1 chunk x 2 = 16 on AVX-512 (32). Each K vector is widened once for all of them."""
    return 8 if F32_WIDTH >= 16 else 2


@always_inline
def value_vectors_per_call[rows: Int, head_dim: Int]() -> Int:
    """Output vectors per row that one pass over a V block keeps in registers for `rows` rows (rows x this
    accumulators + this many V vectors + a broadcast fit the register file), cut down to a divisor of the
    vectors in a row: on AVX-512 a 64- or 128-wide head holds only 4 or 8 vectors of 16."""
    var vectors = max(1, (16 if F32_WIDTH >= 16 else 8) // rows)
    while (head_dim // F32_WIDTH) % vectors != 0:
        vectors -= 1
    return vectors


comptime CACHE_LINE = 64
comptime NO_BLOCK = -1  # no block to prefetch next


@always_inline
def prefetch_line[dtype: DType](cache_ptr: Pointer[Scalar[dtype], ...], offset: Int):
    """Asks for the cache line holding cache_ptr[offset] ahead of its use (a hint: it never faults).
    Why: one (block, KV head) K or V block is a 4 KB page of its own, and a step reads them 32 KB apart (all of a
    block's heads lie side by side), so the hardware prefetchers, which stop at page boundaries, start cold on
    every block; each block's loop fetches the next block's lines as it goes."""
    prefetch[PrefetchOptions().for_read().high_locality().to_data_cache()](cache_ptr.unsafe_offset(offset))


@always_inline
def score_rows[dtype: DType, D: Int, BS: Int, SK: Int, RB: Int](
    scores: MutPointer[Float32, ...], q_rows: Pointer[Float32, ...], r0: Int,
    cache_ptr: Pointer[Scalar[dtype], ...], k_block: Int, next_k_block: Int,
):
    """Scores[r, t] = q[r] . K[t] for RB rows from r0 and every key t of the block, into rows SK floats apart
    (keys past the context are garbage here and masked by the caller). Two accumulator sets (even and odd d)
    per (row, key chunk) give enough independent FMA chains for the FMA latency; each K vector is loaded and
    widened once. The K block read next (next_k_block, or NO_BLOCK) is prefetched as this one is read."""
    comptime KC = min(BS, F32_WIDTH)
    comptime CH = BS // KC
    comptime LINE = CACHE_LINE // size_of[dtype]()
    var acc = stack_allocation[2 * RB * CH * KC, Float32]()
    comptime for i in range(2 * RB * CH):
        acc.unsafe_store(i * KC, SIMD[DType.float32, KC](0))
    for d in range(0, D, 2):
        if next_k_block != NO_BLOCK:
            comptime for line in range(0, 2 * BS, LINE):
                prefetch_line(cache_ptr, next_k_block + d * BS + line)
        comptime for half in range(2):
            comptime for c in range(CH):
                var keys = cache_ptr.unsafe_load[width=KC](k_block + (d + half) * BS + c * KC).cast[DType.float32]()
                comptime for r in range(RB):
                    var i = ((half * RB + r) * CH + c) * KC
                    var qv = SIMD[DType.float32, KC](q_rows.unsafe_load((r0 + r) * D + d + half))
                    acc.unsafe_store(i, qv.fma(keys, acc.unsafe_load[width=KC](i)))
    comptime for r in range(RB):
        comptime for c in range(CH):
            var even = acc.unsafe_load[width=KC]((r * CH + c) * KC)
            var odd = acc.unsafe_load[width=KC](((RB + r) * CH + c) * KC)
            scores.unsafe_store((r0 + r) * SK + c * KC, even + odd)


@always_inline
def accumulate_values[dtype: DType, D: Int, BS: Int, SK: Int, RB: Int](
    acc: MutPointer[Float32, ...], probs: Pointer[Float32, ...], alpha: Pointer[Float32, ...], r0: Int, keys: Int,
    cache_ptr: Pointer[Scalar[dtype], ...], v_blocks: Pointer[Int, ...],
):
    """Acc[r] = acc[r] * alpha[r] + sum_t probs[r, t] * V[t] over a step's first `keys` keys (block b of the
    step at v_blocks[b]; probs rows SK apart), for RB rows from r0 (a row with fewer visible keys has
    probability 0 for the rest: those keys are real, stored ones). The output dims go in chunks that stay in
    registers across the step's keys; each V vector is widened once."""
    comptime DC = value_vectors_per_call[RB, D]()
    comptime W = F32_WIDTH
    comptime assert D % (DC * W) == 0, "head_dim must be a multiple of the value chunk"
    comptime C = v_chunk(D)
    comptime assert C % W == 0, "a V chunk must be whole SIMD vectors"
    var out = stack_allocation[RB * DC * W, Float32]()
    for d0 in range(0, D, DC * W):
        comptime for r in range(RB):
            comptime for j in range(DC):
                var at = (r0 + r) * D + d0 + j * W
                out.unsafe_store((r * DC + j) * W, acc.unsafe_load[width=W](at) * alpha.unsafe_load(r0 + r))
        var blocks = ceildiv(keys, BS)
        for b in range(blocks):
            var v_block = v_blocks.unsafe_load(b)
            # the V lines read next: the next block's for these dims, or the first block's for the next dims
            var next_block = v_blocks.unsafe_load(b + 1) if b + 1 < blocks else (
                v_blocks.unsafe_load(0) if d0 + DC * W < D else NO_BLOCK)
            var next_d0 = d0 if b + 1 < blocks else d0 + DC * W
            for t in range(min(BS, keys - b * BS)):
                if next_block != NO_BLOCK:
                    comptime for j in range(DC):
                        comptime if (j * W) % (CACHE_LINE // size_of[dtype]()) == 0:
                            prefetch_line(cache_ptr, next_block + v_offset(BS, D, t, next_d0 + j * W))
                comptime for j in range(DC):
                    var at = v_block + v_offset(BS, D, t, d0 + j * W)
                    var v = cache_ptr.unsafe_load[width=W](at).cast[DType.float32]()
                    comptime for r in range(RB):
                        var i = (r * DC + j) * W
                        var p = SIMD[DType.float32, W](probs.unsafe_load((r0 + r) * SK + b * BS + t))
                        out.unsafe_store(i, p.fma(v, out.unsafe_load[width=W](i)))
        comptime for r in range(RB):
            comptime for j in range(DC):
                acc.unsafe_store((r0 + r) * D + d0 + j * W, out.unsafe_load[width=W]((r * DC + j) * W))


@always_inline
def uses_dot_bf16_attention[dtype: DType, block_size: Int]() -> Bool:
    """Bfloat16 caches meet bfloat16 queries with vdpbf16ps where the CPU has it (twice the multiply-adds of a
    float32 FMA per instruction, and no widening of K and V) when a block is whole 16-key vectors; every other
    case widens to float32 FMAs. Decode, verification and prefill rows all take the same path, so a row's
    arithmetic never depends on the batch. The probabilities are rounded to bfloat16 (as in GPU flash attention);
    their sum is taken of the rounded values, so each output stays a weighted mean of V."""
    return dtype == DType.bfloat16 and block_size % 16 == 0 and has_dot_bf16()


@always_inline
def dot_score_rows_per_call[BS: Int]() -> Int:
    """Query rows scored together by vdpbf16ps: rows x key chunks x 2 accumulator sets = 16 of AVX-512's 32
    registers, leaving room for the interleaved key pairs."""
    return max(1, 8 // (BS // 16))


@always_inline
def pair_up(first: SIMD[DType.bfloat16, 16], second: SIMD[DType.bfloat16, 16]) -> SIMD[DType.bfloat16, 32]:
    """[first[0], second[0], first[1], second[1], ...]: the operand layout of vdpbf16ps (lane i sums two products)."""
    return first.interleave(second)


@always_inline
def score_rows_dot[D: Int, BS: Int, SK: Int, RB: Int](
    scores: MutPointer[Float32, ...], q_words: Pointer[UInt32, ...], r0: Int,
    cache_ptr: Pointer[BFloat16, ...], k_block: Int, next_k_block: Int, scale: Float32,
):
    """Scores[r, t] = scale * q[r] . K[t] with vdpbf16ps: the transposed K block's rows d and d + 1 are
    interleaved into key pairs once for all RB rows, and each row's (q[d], q[d + 1]) is one broadcast 32-bit
    word. Two accumulator sets (even and odd d pairs) give enough independent chains for a decode's two rows.
    The next K block is prefetched as in score_rows."""
    comptime KC = 16
    comptime CH = BS // KC
    comptime assert BS % KC == 0, "vdpbf16ps attention needs a block size that is a multiple of 16"
    comptime LINE = CACHE_LINE // size_of[DType.bfloat16]()
    var acc = stack_allocation[2 * RB * CH * KC, Float32]()
    comptime for i in range(2 * RB * CH):
        acc.unsafe_store(i * KC, SIMD[DType.float32, KC](0))
    for dp in range(0, D // 2, 2):
        if next_k_block != NO_BLOCK:  # this pass reads dims 2 dp .. 2 dp + 3: 4 * BS elements
            comptime for line in range(0, 4 * BS, LINE):
                prefetch_line(cache_ptr, next_k_block + 2 * dp * BS + line)
        comptime for half in range(2):
            var d = 2 * (dp + half)
            comptime for c in range(CH):
                var keys = pair_up(cache_ptr.unsafe_load[width=KC](k_block + d * BS + c * KC),
                                   cache_ptr.unsafe_load[width=KC](k_block + (d + 1) * BS + c * KC))
                comptime for r in range(RB):
                    var i = ((half * RB + r) * CH + c) * KC
                    var q_pair = SIMD[DType.uint32, KC](q_words.unsafe_load((r0 + r) * (D // 2) + dp + half))
                    acc.unsafe_store(i, dot_bf16_pairs(acc.unsafe_load[width=KC](i), keys,
                                                       bitcast[DType.bfloat16, 2 * KC](q_pair)))
    comptime for r in range(RB):
        comptime for c in range(CH):
            var even = acc.unsafe_load[width=KC]((r * CH + c) * KC)
            var odd = acc.unsafe_load[width=KC](((RB + r) * CH + c) * KC)
            scores.unsafe_store((r0 + r) * SK + c * KC, (even + odd) * scale)


@always_inline
def accumulate_values_dot[D: Int, BS: Int, SK: Int, RB: Int](
    acc: MutPointer[Float32, ...], prob_words: Pointer[UInt32, ...], alpha: Pointer[Float32, ...], r0: Int,
    keys: Int, cache_ptr: Pointer[BFloat16, ...], v_blocks: Pointer[Int, ...],
):
    """Acc[r] = acc[r] * alpha[r] + sum_t probs[r, t] * V[t] with vdpbf16ps over key pairs: V rows t and t + 1
    interleaved once for all RB rows, each row's bfloat16 (p[t], p[t + 1]) one broadcast word. With an odd
    `keys` the last pair's second V row is zero, not the next slot (which may be unwritten: NaN * 0 is NaN).
    Blocks and probability rows as in accumulate_values."""
    comptime DC = value_vectors_per_call[RB, D]()
    comptime W = 16
    comptime assert D % (DC * W) == 0, "head_dim must be a multiple of the value chunk"
    comptime C = v_chunk(D)  # V row t + 1 of a chunk follows row t, C elements on
    comptime assert C % W == 0, "a V chunk must be whole SIMD vectors"
    var out = stack_allocation[RB * DC * W, Float32]()
    for d0 in range(0, D, DC * W):
        comptime for r in range(RB):
            comptime for j in range(DC):
                var at = (r0 + r) * D + d0 + j * W
                out.unsafe_store((r * DC + j) * W, acc.unsafe_load[width=W](at) * alpha.unsafe_load(r0 + r))

        @always_inline
        def step(word: Int, values: SIMD[DType.bfloat16, 2 * W], j: Int) {imm out, imm prob_words, imm r0}:
            comptime for r in range(RB):
                var i = (r * DC + j) * W
                var p_pair = SIMD[DType.uint32, W](prob_words.unsafe_load((r0 + r) * (SK // 2) + word))
                out.unsafe_store(i, dot_bf16_pairs(out.unsafe_load[width=W](i), values,
                                                   bitcast[DType.bfloat16, 2 * W](p_pair)))

        var blocks = ceildiv(keys, BS)
        for b in range(blocks):
            var v_block = v_blocks.unsafe_load(b)
            var block_keys = min(BS, keys - b * BS)
            var full_pairs = block_keys // 2
            var next_block = v_blocks.unsafe_load(b + 1) if b + 1 < blocks else (
                v_blocks.unsafe_load(0) if d0 + DC * W < D else NO_BLOCK)
            var next_d0 = d0 if b + 1 < blocks else d0 + DC * W
            for tp in range(full_pairs):
                if next_block != NO_BLOCK:  # the V lines read next (as in accumulate_values), two tokens' worth
                    comptime for j in range(DC):
                        comptime if (j * W) % (CACHE_LINE // size_of[DType.bfloat16]()) == 0:
                            prefetch_line(cache_ptr, next_block + v_offset(BS, D, 2 * tp, next_d0 + j * W))
                            prefetch_line(cache_ptr, next_block + v_offset(BS, D, 2 * tp + 1, next_d0 + j * W))
                comptime for j in range(DC):
                    var at = v_block + v_offset(BS, D, 2 * tp, d0 + j * W)
                    step(b * (BS // 2) + tp,
                         pair_up(cache_ptr.unsafe_load[width=W](at), cache_ptr.unsafe_load[width=W](at + C)), j)
            if block_keys % 2 == 1:
                comptime for j in range(DC):
                    var at = v_block + v_offset(BS, D, 2 * full_pairs, d0 + j * W)
                    step(b * (BS // 2) + full_pairs,
                         pair_up(cache_ptr.unsafe_load[width=W](at), SIMD[DType.bfloat16, W](0)), j)
        comptime for r in range(RB):
            comptime for j in range(DC):
                acc.unsafe_store((r0 + r) * D + d0 + j * W, out.unsafe_load[width=W]((r * DC + j) * W))


@always_inline
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
    comptime assert BS % KC == 0, "block_size must be a multiple of the key chunk"
    comptime assert D % F32_WIDTH == 0, "head_dim must be a multiple of the SIMD width"
    comptime SK = step_keys(BS)
    comptime SB = SK // BS  # blocks per step
    var rows = tile.rows()
    var rows_per_kv = tile.rows_per_kv_head()
    var q_rows = stack_allocation[MAX_ROWS * D, Float32]()
    var acc = stack_allocation[MAX_ROWS * D, Float32]()
    var scores = stack_allocation[MAX_ROWS * SK, Float32]()
    var row_max = stack_allocation[MAX_ROWS, Float32]()
    var row_sum = stack_allocation[MAX_ROWS, Float32]()
    var row_alpha = stack_allocation[MAX_ROWS, Float32]()
    var row_limit = stack_allocation[MAX_ROWS, Int]()
    # the row results of the parts folded so far (row_max, row_sum and acc hold the current part)
    var total_acc = stack_allocation[MAX_ROWS * D, Float32]()
    var total_max = stack_allocation[MAX_ROWS, Float32]()
    var total_sum = stack_allocation[MAX_ROWS, Float32]()
    comptime DOT = uses_dot_bf16_attention[dtype, BS]()
    # vdpbf16ps operands: the raw bfloat16 queries (the scale is applied to the scores) and probabilities
    var q_halves = stack_allocation[MAX_ROWS * D, BFloat16, alignment=64]()
    var prob_halves = stack_allocation[MAX_ROWS * SK, BFloat16, alignment=64]()
    var physical_blocks = stack_allocation[SB, Int]()
    var v_blocks = stack_allocation[SB, Int]()
    var token_base = Int(query_start.unsafe_load(tile.seq))
    var first_limit = seq_first_key_limit(query_start, context_lens, tile.seq)

    var max_limit = 0
    for r in range(rows):
        var i = tile.token(r)
        var q_base = ((token_base + i) * batch.num_heads + tile.head(r, batch.group)) * D
        comptime if DOT:
            for d in range(D):
                q_halves.unsafe_store(r * D + d, rebind[BFloat16](q_ptr.unsafe_load(q_base + d)))
        else:
            for d in range(D):
                q_rows.unsafe_store(r * D + d, q_ptr.unsafe_load(q_base + d).cast[DType.float32]() * scale)
        for d in range(D):
            acc.unsafe_store(r * D + d, 0)
            total_acc.unsafe_store(r * D + d, 0)
        row_max.unsafe_store(r, NO_SCORE)
        row_sum.unsafe_store(r, 0)
        total_max.unsafe_store(r, NO_SCORE)
        total_sum.unsafe_store(r, 0)
        var limit = min(first_limit + i, tile.key_hi)
        row_limit.unsafe_store(r, limit)
        max_limit = max(max_limit, limit)

    # Keys go in steps of SB blocks from key_lo (0, or the start of a split's part), parts of whole steps: where a
    # key falls in a step and a part depends on its position alone, so a row's arithmetic is the same in any
    # batch and any chunking. Rows see keys up to their own limits; keys past a row's limit in a step are masked
    # to probability 0 (adding exact zeros; a part past it leaves the row's result as it was).
    var table_row = tile.seq * batch.max_blocks
    var keys_per_part = part_keys(BS)
    var block_start = tile.key_lo
    while block_start < max_limit:
        if block_start != tile.key_lo and block_start % keys_per_part == 0:  # never in a split's one-part tile
            fold_rows[D](rows, acc, row_max, row_sum, total_acc, total_max, total_sum)
        var step_blocks = min(SB, ceildiv(max_limit - block_start, BS))
        for b in range(step_blocks):
            physical_blocks.unsafe_store(b, Int(block_tables.unsafe_load(table_row + block_start // BS + b)))
        for kv in range(tile.kv_count):
            for b in range(step_blocks):
                v_blocks.unsafe_store(b, layout.v_block(physical_blocks.unsafe_load(b), tile.kv_head + kv))
            var first_row = kv * rows_per_kv
            var end_row = first_row + rows_per_kv

            for b in range(step_blocks):
                var k_block = layout.k_block(physical_blocks.unsafe_load(b), tile.kv_head + kv)
                # the K block scored next: this head's next block, else the next head's first one
                var next_k_block = layout.k_block(physical_blocks.unsafe_load(b + 1), tile.kv_head + kv) if (
                    b + 1 < step_blocks) else (layout.k_block(physical_blocks.unsafe_load(0), tile.kv_head + kv + 1)
                                               if kv + 1 < tile.kv_count else NO_BLOCK)
                var block_scores = scores.unsafe_offset(b * BS)
                comptime if DOT:
                    var q_words = q_halves.unsafe_bitcast[UInt32]()
                    var k_halves = cache_ptr.unsafe_bitcast[BFloat16]()

                    def score_dot[RB: Int](r0: Int) {imm block_scores, imm q_words, imm k_halves, imm k_block, imm next_k_block, imm scale}:
                        score_rows_dot[D, BS, SK, RB](block_scores, q_words, r0, k_halves, k_block, next_k_block,
                                                      scale)

                    for_row_groups[dot_score_rows_per_call[BS]()](first_row, end_row, score_dot)
                else:
                    def score[RB: Int](r0: Int) {imm block_scores, imm q_rows, imm cache_ptr, imm k_block, imm next_k_block}:
                        score_rows[dtype, D, BS, SK, RB](block_scores, q_rows, r0, cache_ptr, k_block, next_k_block)

                    for_row_groups[score_rows_per_call()](first_row, end_row, score)
            # Online softmax per row: mask the keys it cannot see, rescale what it has under the new running max.
            var step_keys = 0
            var step_width = step_blocks * BS
            for r in range(first_row, end_row):
                var n = max(0, min(step_width, row_limit.unsafe_load(r) - block_start))
                step_keys = max(step_keys, n)
                var best = SIMD[DType.float32, KC](NO_SCORE)
                for c in range(0, step_width, KC):
                    var valid = iota[DType.int32, KC]().lt(SIMD[DType.int32, KC](Int32(n - c)))
                    var s = valid.select(scores.unsafe_load[width=KC](r * SK + c), SIMD[DType.float32, KC](NO_SCORE))
                    scores.unsafe_store(r * SK + c, s)
                    best = max(best, s)
                var old_max = row_max.unsafe_load(r)
                var new_max = max(old_max, best.reduce_max())
                var step_sum = SIMD[DType.float32, KC](0)
                for c in range(0, step_width, KC):
                    var valid = iota[DType.int32, KC]().lt(SIMD[DType.int32, KC](Int32(n - c)))
                    # Masked keys get probability 0 even when the row has seen no key yet (new_max = NO_SCORE).
                    var p = valid.select(exp(scores.unsafe_load[width=KC](r * SK + c) - new_max),
                                         SIMD[DType.float32, KC](0))
                    comptime if DOT:
                        # the sum is of the bfloat16 weights that multiply V, so the output stays normalised
                        var p_half = narrow[DType.bfloat16](p)
                        prob_halves.unsafe_store(r * SK + c, p_half)
                        step_sum += widen(p_half)
                    else:
                        scores.unsafe_store(r * SK + c, p)
                        step_sum += p
                var alpha = exp(old_max - new_max)
                row_alpha.unsafe_store(r, alpha)
                row_sum.unsafe_store(r, row_sum.unsafe_load(r) * alpha + step_sum.reduce_add())
                row_max.unsafe_store(r, new_max)

            comptime if DOT:
                var prob_words = prob_halves.unsafe_bitcast[UInt32]()
                var v_halves = cache_ptr.unsafe_bitcast[BFloat16]()

                def values_dot[RB: Int](r0: Int) {imm acc, imm prob_words, imm row_alpha, imm step_keys, imm v_halves, imm v_blocks}:
                    accumulate_values_dot[D, BS, SK, RB](acc, prob_words, row_alpha, r0, step_keys, v_halves, v_blocks)

                for_row_groups[dot_score_rows_per_call[BS]()](first_row, end_row, values_dot)
            else:
                def values[RB: Int](r0: Int) {imm acc, imm scores, imm row_alpha, imm step_keys, imm cache_ptr, imm v_blocks}:
                    accumulate_values[dtype, D, BS, SK, RB](acc, scores, row_alpha, r0, step_keys, cache_ptr, v_blocks)

                for_row_groups[score_rows_per_call()](first_row, end_row, values)
        block_start += step_blocks * BS

    if tile.partial < 0:
        fold_rows[D](rows, acc, row_max, row_sum, total_acc, total_max, total_sum)  # the last part
    for r in range(rows):
        if tile.partial >= 0:
            var base = (tile.partial * MAX_ROWS + r) * (D + 2)
            partial_ptr.unsafe_store(base, row_max.unsafe_load(r))
            partial_ptr.unsafe_store(base + 1, row_sum.unsafe_load(r))
            for d in range(D):
                partial_ptr.unsafe_store(base + 2 + d, acc.unsafe_load(r * D + d))
        else:
            var out_base = ((token_base + tile.token(r)) * batch.num_heads + tile.head(r, batch.group)) * D
            var inv_sum = 1.0 / total_sum.unsafe_load(r)
            for d in range(D):
                out_ptr.unsafe_store(out_base + d, narrow[dtype](total_acc.unsafe_load(r * D + d) * inv_sum))


def merge_partials[dtype: DType, head_dim: Int](
    tiles: List[Tile],
    first: Int,
    batch: BatchShape,
    query_start: Pointer[Int32, ...],
    out_ptr: MutPointer[Scalar[dtype], ...],
    partial_ptr: Pointer[Float32, ...],
):
    """Folds the parts of one split tile (tiles[first ..< first + parts], in key order) into the output, with the
    arithmetic of an unsplit tile walking the same parts."""
    comptime D = head_dim
    var tile = tiles[first]
    var parts = tile.parts
    var token_base = Int(query_start.unsafe_load(tile.seq))
    var folds = List[FoldWeights](capacity=parts)  # a row's weights per part, the same for all its dims
    for r in range(tile.rows()):
        folds.clear()
        var running_max = NO_SCORE
        var total = Float32(0)
        for s in range(parts):
            var base = (tiles[first + s].partial * MAX_ROWS + r) * (D + 2)
            var weights = fold_weights(running_max, partial_ptr.unsafe_load(base))
            running_max = weights.new_max
            total = fold(total, partial_ptr.unsafe_load(base + 1), weights)
            folds.append(weights)
        var out_base = ((token_base + tile.token(r)) * batch.num_heads + tile.head(r, batch.group)) * D
        var inv_total = 1.0 / total

        def merge_dims[w: Int](d: Int) {imm tiles, imm first, imm parts, imm r, imm partial_ptr, imm folds, imm out_ptr, imm out_base, imm inv_total}:
            var value = SIMD[DType.float32, w](0)
            for s in range(parts):
                var base = (tiles[first + s].partial * MAX_ROWS + r) * (D + 2)
                value = fold(value, partial_ptr.unsafe_load[width=w](base + 2 + d), folds[s])
            out_ptr.unsafe_store(out_base + d, narrow[dtype](value * inv_total))

        vectorize[F32_WIDTH](D, merge_dims)


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
                    var v = cache_ptr.unsafe_load(layout.v_block(physical, kv_head) + v_offset(BS, D, key % BS, dim))
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
