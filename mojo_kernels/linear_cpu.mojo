# The CPU path of MILI's linear op: register-tiled micro-kernels over the packed layouts, threads over panels.
# linear.mojo's header has the layouts and the accumulation-order guarantee these kernels keep.
from max.gpu.host import DeviceContext
from std.memory import bitcast, stack_allocation
from std.sys import CompilationTarget, simd_width_of, size_of, num_physical_cores
from std.sys.intrinsics import llvm_intrinsic
from std.math import ceildiv
from .cpu_parallel import parallel_ranges, for_row_groups
from .convert import narrow, widen
from .linear_layout import PANEL, LinearShape, bf16_panel_stride, exact_int8_weights, int8_padded_k

comptime F32_WIDTH = simd_width_of[DType.float32]()
comptime VECTORS_PER_PANEL = PANEL // F32_WIDTH
# A thread should get at least this many multiply-adds: waking a pool thread costs ~10-20 us, about the
# time one core streams 256K bf16 weights.
comptime MIN_MACS_PER_TASK = 1 << 19
# Rows per block: a block of activations stays in L2 (~512 KB here) while a thread's panels pass over it.
comptime ROW_BLOCK_BYTES = 192 * 1024


# --- Which micro-kernel this CPU runs -------------------------------------------------------------------

@always_inline
def has_dot_bf16() -> Bool:
    """Whether the CPU this is compiled for has vdpbf16ps (AVX512_BF16)."""
    return CompilationTarget._has_feature["avx512bf16"]()


@always_inline
def uses_dot_bf16[x_dtype: DType]() -> Bool:
    """Bf16 weights meet bfloat16 activations with vdpbf16ps where the CPU has it; anything else decodes
    the weights to float32 and uses FMAs."""
    return x_dtype == DType.bfloat16 and has_dot_bf16()


@always_inline
def max_tile_rows() -> Int:
    """Most rows per micro-kernel call: 6 x 2 accumulators on AVX2 (16 registers), 12 x 2 on AVX-512 (32)."""
    return 12 if F32_WIDTH >= 16 else 6


@always_inline
def tile_panels[MR: Int]() -> Int:
    """Panels per micro-kernel call for MR rows: 4, 2 or 1, the most whose MR x NP x VECTORS_PER_PANEL
    accumulators stay within 8 of AVX2's 16 registers (24 of AVX-512's 32). A single row thus streams four
    panels at once (more independent FMA chains, four memory streams per thread for the prefetchers). Why 8 on
    AVX2: the in-register bf16 decode needs the loaded lanes, both decoded halves, a mask and a broadcast beside
    the accumulators, and tiles of 10 or 12 accumulators ran 1.5-3x slower per row than tiles of 8 (spills)."""
    comptime fit = (24 if F32_WIDTH >= 16 else 8) // (MR * VECTORS_PER_PANEL)
    return 4 if fit >= 4 else (2 if fit >= 2 else 1)


# Rows per vdpbf16ps tile: 6 rows x 4 panels keep 24 accumulators, 4 weight vectors and the broadcast pairs in
# AVX-512's 32 registers, and load 10 vectors per 24 instructions. 12 rows x 2 panels, the FMA paths' shape,
# needs 12 broadcasts live at once: LLVM spilled ~20 stack accesses per 24 vdpbf16ps (op at 200-500 GFLOP/s).
comptime DOT_TILE_ROWS = 6


@always_inline
def decode_tile_rows() -> Int:
    """Most rows per call where the weights are decoded in registers: 6 on AVX2 (12 accumulators, see
    fma_decoded_k), 8 on AVX-512."""
    return 8 if F32_WIDTH >= 16 else 6


# Panels every row group of a block passes over before the next ones: four panels of K <= 3072 bf16 weights
# (<= 384 KB) stay in L2 while the groups reread them.
comptime PANEL_CHUNK = 4


def kernel_family_code[x_dtype: DType]() -> Int:
    """What the CPU linear op compiles to here, for tests and logs: F32_WIDTH * 10 + (1 if vdpbf16ps)."""
    return F32_WIDTH * 10 + (1 if uses_dot_bf16[x_dtype]() else 0)


# --- CPU micro-kernels -------------------------------------------------------------------------------------
# A tile is MR rows x NP panels over the whole K. Its accumulators live in a stack array indexed only by
# compile-time constants, which LLVM keeps in registers.

@always_inline
def panel_vector_at(panel: Int, per_panel: Int, v: Int, index: Int) -> Int:
    """Where vector v of a tile that starts at `panel` finds entry `index` of an array laid out per panel as
    [per_panel][PANEL] (the scale layouts of linear.mojo's header): its F32_WIDTH channels' values start there."""
    return ((panel + v // VECTORS_PER_PANEL) * per_panel + index) * PANEL + (v % VECTORS_PER_PANEL) * F32_WIDTH


@always_inline
def zero_tile[MR: Int, NP: Int](acc: MutPointer[Float32, ...]):
    comptime for i in range(MR * NP * VECTORS_PER_PANEL):
        acc.unsafe_store(i * F32_WIDTH, SIMD[DType.float32, F32_WIDTH](0))


@always_inline
def store_tile[out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], acc: Pointer[Float32, ...], shape: LinearShape, row: Int, panel: Int
):
    """Writes the tile's rows; channels past N (the last panel's padding) are dropped."""
    comptime for m in range(MR):
        comptime for v in range(NP * VECTORS_PER_PANEL):
            var n = panel * PANEL + v * F32_WIDTH
            var values = narrow[out_dtype](acc.unsafe_load[width=F32_WIDTH]((m * NP * VECTORS_PER_PANEL + v) * F32_WIDTH))
            var at = (row + m) * shape.n + n
            if n + F32_WIDTH <= shape.n:
                out_ptr.unsafe_store(at, values)
            else:
                for i in range(max(0, shape.n - n)):
                    out_ptr.unsafe_store(at + i, values[i])


@always_inline
def fma_decoded_k[MR: Int, NP: Int](
    acc: MutPointer[Float32, ...], weights: Pointer[Float32, ...], x32: Pointer[Float32, ...], x_at: Int, k_len: Int,
):
    """Acc[m, v] = fma(x[m, k], weights[v], acc[m, v]) for the tile's MR rows and NP panels' V vectors of one k
    (x_at = offset of row 0's k). The weights are all decoded first, then each row broadcasts its x once and uses
    it at once: MR x V accumulators + V weights + 1 broadcast live (6 x 2 + 2 + 1 = 15 of AVX2's 16). Broadcasting
    inside a loop over the vectors instead lets the compiler keep every row's broadcast live, and spills."""
    comptime V = NP * VECTORS_PER_PANEL
    comptime for m in range(MR):
        var xv = SIMD[DType.float32, F32_WIDTH](x32.unsafe_load(x_at + m * k_len))
        comptime for v in range(V):
            var i = (m * V + v) * F32_WIDTH
            acc.unsafe_store(i, xv.fma(weights.unsafe_load[width=F32_WIDTH](v * F32_WIDTH),
                                       acc.unsafe_load[width=F32_WIDTH](i)))


@always_inline
def bf16_pair_step[MR: Int, NP: Int, with_odd: Bool](
    acc: MutPointer[Float32, ...], weights: MutPointer[Float32, ...], x32: Pointer[Float32, ...],
    w_ptr: Pointer[UInt32, ...], x_at: Int, k_len: Int, lane_at: Int, lane_stride: Int,
):
    """One pair of k for the tile: the even weights (lane << 16) for every row, then the odd ones
    (lane & 0xFFFF0000; the lanes are loaded again from L1 rather than kept in registers)."""
    comptime for p in range(NP):
        comptime for c in range(VECTORS_PER_PANEL):
            var lanes = w_ptr.unsafe_load[width=F32_WIDTH](p * lane_stride + lane_at + c * F32_WIDTH)
            weights.unsafe_store((p * VECTORS_PER_PANEL + c) * F32_WIDTH, bitcast[DType.float32, F32_WIDTH](lanes << 16))
    fma_decoded_k[MR, NP](acc, weights, x32, x_at, k_len)
    comptime if with_odd:
        comptime for p in range(NP):
            comptime for c in range(VECTORS_PER_PANEL):
                var lanes = w_ptr.unsafe_load[width=F32_WIDTH](p * lane_stride + lane_at + c * F32_WIDTH)
                weights.unsafe_store((p * VECTORS_PER_PANEL + c) * F32_WIDTH,
                                     bitcast[DType.float32, F32_WIDTH](lanes & 0xFFFF0000))
        fma_decoded_k[MR, NP](acc, weights, x32, x_at + 1, k_len)


@always_inline
def bf16_tile_decoded[out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x32: Pointer[Float32, ...],
    w_ptr: Pointer[UInt32, ...], shape: LinearShape, row: Int, panel: Int,
):
    """Bf16 weights decoded to float32 in registers, against float32 activations."""
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var weights = stack_allocation[NP * PANEL, Float32]()
    zero_tile[MR, NP](acc)
    var k_len = shape.k
    var lane_stride = bf16_panel_stride(k_len) // 2  # 32-bit lanes per panel
    var lanes = w_ptr.unsafe_offset(panel * lane_stride)
    var x_row = row * k_len
    var full_pairs = k_len // 2
    for kp in range(full_pairs):
        bf16_pair_step[MR, NP, True](acc, weights, x32, lanes, x_row + 2 * kp, k_len, kp * PANEL, lane_stride)
    if k_len % 2 == 1:  # the last k is the even half of a pair whose odd half is padding
        bf16_pair_step[MR, NP, False](acc, weights, x32, lanes, x_row + 2 * full_pairs, k_len, full_pairs * PANEL,
                                      lane_stride)
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


@always_inline
def dot_bf16_pairs(acc: SIMD[DType.float32, 16], weights: SIMD[DType.bfloat16, 32],
                   x_pair: SIMD[DType.bfloat16, 32]) -> SIMD[DType.float32, 16]:
    """Vdpbf16ps: acc[i] += weights[2i] * x_pair[2i] + weights[2i + 1] * x_pair[2i + 1]."""
    return llvm_intrinsic["llvm.x86.avx512bf16.dpbf16ps.512", SIMD[DType.float32, 16]](acc, weights, x_pair)


@always_inline
def bf16_tile_dot[out_dtype: DType, MR: Int, NP: Int, EVEN_K: Bool](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[BFloat16, ...],
    w_ptr: Pointer[UInt32, ...], shape: LinearShape, row: Int, panel: Int,
):
    """Bf16 weights x bfloat16 activations with vdpbf16ps, one 64-byte panel row (two k) per instruction.
    EVEN_K (K even, so every pair (x[k], x[k + 1]) is one aligned 32-bit word): the pair is broadcast straight
    from memory, which vdpbf16ps folds into its operand. Assembling the pair from two bf16 loads instead cost
    ~6 instructions a row per k pair (widen, narrow, permute, broadcast) and left the tile at a quarter of the
    vdpbf16ps rate."""
    comptime assert F32_WIDTH == 16, "vdpbf16ps needs 512-bit vectors"
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    zero_tile[MR, NP](acc)
    var k_len = shape.k
    var lane_stride = bf16_panel_stride(k_len) // 2
    var x_row = row * k_len
    var x_words = x_ptr.unsafe_bitcast[UInt32]()
    for kp in range(ceildiv(k_len, 2)):
        var k = 2 * kp
        var second = k + 1 < k_len
        comptime for m in range(MR):
            var at = x_row + m * k_len + k
            var x_lanes: SIMD[DType.uint32, 16]
            comptime if EVEN_K:
                x_lanes = SIMD[DType.uint32, 16](x_words.unsafe_load(at // 2))
            else:
                # The pair in one 32-bit lane, broadcast; past an odd K the pair's second half is 0 (never the
                # next row's first element, which could be inf or NaN against a zero weight).
                var x_pair = SIMD[DType.bfloat16, 2](x_ptr.unsafe_load(at), x_ptr.unsafe_load(at + 1) if second else 0)
                x_lanes = SIMD[DType.uint32, 16](bitcast[DType.uint32, 1](x_pair))
            comptime for p in range(NP):
                var weights = w_ptr.unsafe_load[width=16]((panel + p) * lane_stride + kp * PANEL)
                var i = (m * NP + p) * PANEL
                acc.unsafe_store(i, dot_bf16_pairs(acc.unsafe_load[width=16](i), bitcast[DType.bfloat16, 32](weights),
                                                   bitcast[DType.bfloat16, 32](x_lanes)))
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


@always_inline
def fold_group[S: DType, //, MR: Int, NP: Int](
    acc: MutPointer[Float32, ...], part: Pointer[Float32, ...], scale_ptr: Pointer[Scalar[S], ...], groups: Int,
    panel: Int, g: Int,
):
    """Adds a group's unscaled sums into the tile: acc[m, n] = fma(part[m, n], scale[n, g], acc[m, n])."""
    comptime V = NP * VECTORS_PER_PANEL
    comptime for v in range(V):
        var scale = scale_ptr.unsafe_load[width=F32_WIDTH](panel_vector_at(panel, groups, v, g)).cast[DType.float32]()
        comptime for m in range(MR):
            var i = (m * V + v) * F32_WIDTH
            acc.unsafe_store(i, part.unsafe_load[width=F32_WIDTH](i).fma(scale, acc.unsafe_load[width=F32_WIDTH](i)))


@always_inline
def exact_int8_arithmetic[S: DType, OFFSETS: Bool]() -> Bool:
    """Which arithmetic an int8 layout gets (linear.mojo's header): its weights decoded exactly and one FMA chain
    (offsets, or float32 scales: GGUF's Q4_1, Q5_1, K-quants), or group sums folded in with their scale."""
    return OFFSETS or S == DType.float32


@always_inline
def load_exact_int8_weights[S: DType, //, NP: Int, OFFSETS: Bool](
    weights: MutPointer[Float32, ...], q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Scalar[S], ...],
    offset_ptr: Pointer[Float32, ...], panel: Int, padded_k: Int, groups: Int, k: Int, group: Int,
):
    """Weights[v] = the NP panels' exact float32 weights of input k (exact_int8_weights)."""
    comptime for v in range(NP * VECTORS_PER_PANEL):
        var p = v // VECTORS_PER_PANEL
        var lane = (v % VECTORS_PER_PANEL) * F32_WIDTH
        var at = ((panel + p) * groups + k // group) * PANEL + lane
        var q = q_ptr.unsafe_load[width=F32_WIDTH](((panel + p) * padded_k + k) * PANEL + lane)
        var offset = SIMD[DType.float32, F32_WIDTH](0)
        comptime if OFFSETS:
            offset = offset_ptr.unsafe_load[width=F32_WIDTH](at)
        weights.unsafe_store(v * F32_WIDTH, exact_int8_weights[OFFSETS](
            q, scale_ptr.unsafe_load[width=F32_WIDTH](at).cast[DType.float32](), offset))


@always_inline
def int8_tile[S: DType, //, out_dtype: DType, MR: Int, NP: Int, group: Int, OFFSETS: Bool](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x32: Pointer[Float32, ...],
    q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Scalar[S], ...], offset_ptr: Pointer[Float32, ...],
    shape: LinearShape, row: Int, panel: Int,
):
    """Int8 weights in registers: exactly decoded into one FMA chain (exact_int8_arithmetic), or as float32(q)
    (exact) with each group's products summed unscaled from zero and folded in with its scale (fold_group): one
    FMA per weight and one per group."""
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var part = stack_allocation[MR * NP * PANEL, Float32]()
    var weights = stack_allocation[NP * PANEL, Float32]()
    zero_tile[MR, NP](acc)
    var k_len = shape.k
    var padded_k = int8_padded_k(k_len, group)
    var groups = padded_k // group
    var x_row = row * k_len
    comptime if exact_int8_arithmetic[S, OFFSETS]():
        for k in range(k_len):
            load_exact_int8_weights[NP, OFFSETS](weights, q_ptr, scale_ptr, offset_ptr, panel, padded_k, groups, k,
                                                 group)
            fma_decoded_k[MR, NP](acc, weights, x32, x_row + k, k_len)
    else:
        for g in range(groups):
            zero_tile[MR, NP](part)
            for k in range(g * group, min(k_len, (g + 1) * group)):
                comptime for v in range(NP * VECTORS_PER_PANEL):
                    var p = v // VECTORS_PER_PANEL
                    var q = q_ptr.unsafe_load[width=F32_WIDTH](((panel + p) * padded_k + k) * PANEL
                                                                + (v % VECTORS_PER_PANEL) * F32_WIDTH)
                    weights.unsafe_store(v * F32_WIDTH, q.cast[DType.float32]())
                fma_decoded_k[MR, NP](part, weights, x32, x_row + k, k_len)
            fold_group[MR, NP](acc, part, scale_ptr, groups, panel, g)
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


@always_inline
def float_tile[E: DType, //, out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x32: Pointer[Float32, ...], w_ptr: Pointer[Scalar[E], ...],
    shape: LinearShape, row: Int, panel: Int,
):
    """K-major float16 / float32 weights widened to float32 (exact) in registers: one FMA chain per output."""
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var weights = stack_allocation[NP * PANEL, Float32]()
    zero_tile[MR, NP](acc)
    var k_len = shape.k
    for k in range(k_len):
        comptime for v in range(NP * VECTORS_PER_PANEL):
            var p = v // VECTORS_PER_PANEL
            var w = w_ptr.unsafe_load[width=F32_WIDTH](((panel + p) * k_len + k) * PANEL
                                                       + (v % VECTORS_PER_PANEL) * F32_WIDTH)
            weights.unsafe_store(v * F32_WIDTH, w.cast[DType.float32]())
        fma_decoded_k[MR, NP](acc, weights, x32, row * k_len + k, k_len)
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


# --- Prefill: weights decoded once per panel, then a float32 register-blocked kernel ------------------------
# With many rows, decoding in registers (above) costs as much as the FMAs it feeds. Instead each panel is
# decoded once into a float32 scratch panel [NP][K][16] (exactly the values the in-register decode makes) and
# max_tile_rows() rows at a time run FMAs against it; bfloat16 activations are widened to float32 once. A row's
# chain of FMAs is the same as on the decode path, so which path ran never changes a bit.

# Below this many rows the in-register decode wins (it reads each weight once and decodes it once per MR rows).
comptime GEMM_MIN_ROWS = 16


def decode_bf16_panel(dst: MutPointer[Float32, ...], w_lanes: Pointer[UInt32, ...], panel: Int, k_len: Int):
    """Writes dst[k * 16 + j] = W[panel * 16 + j, k] as float32."""
    var lane_stride = bf16_panel_stride(k_len) // 2
    for kp in range(ceildiv(k_len, 2)):
        comptime for c in range(VECTORS_PER_PANEL):
            var lanes = w_lanes.unsafe_load[width=F32_WIDTH](panel * lane_stride + kp * PANEL + c * F32_WIDTH)
            dst.unsafe_store(2 * kp * PANEL + c * F32_WIDTH, bitcast[DType.float32, F32_WIDTH](lanes << 16))
            if 2 * kp + 1 < k_len:
                dst.unsafe_store((2 * kp + 1) * PANEL + c * F32_WIDTH,
                                 bitcast[DType.float32, F32_WIDTH](lanes & 0xFFFF0000))


def decode_int8_panel(dst: MutPointer[Float32, ...], q_ptr: Pointer[Int8, ...], panel: Int, k_len: Int, padded_k: Int):
    """Writes dst[k * 16 + j] = q[panel * 16 + j, k] as float32 (unscaled: the tile applies the group scales)."""
    for k in range(k_len):
        comptime for c in range(VECTORS_PER_PANEL):
            var q = q_ptr.unsafe_load[width=F32_WIDTH]((panel * padded_k + k) * PANEL + c * F32_WIDTH)
            dst.unsafe_store(k * PANEL + c * F32_WIDTH, q.cast[DType.float32]())


def decode_exact_int8_panel[S: DType, //, OFFSETS: Bool](
    dst: MutPointer[Float32, ...], q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Scalar[S], ...],
    offset_ptr: Pointer[Float32, ...], panel: Int, k_len: Int, padded_k: Int, group: Int,
):
    """Writes dst[k * 16 + j] = W[panel * 16 + j, k], the exact float32 weights (exact_int8_weights)."""
    var groups = padded_k // group
    for k in range(k_len):
        load_exact_int8_weights[1, OFFSETS](dst.unsafe_offset(k * PANEL), q_ptr, scale_ptr, offset_ptr, panel,
                                            padded_k, groups, k, group)


def decode_float_panel[E: DType, //](dst: MutPointer[Float32, ...], w_ptr: Pointer[Scalar[E], ...], panel: Int,
                                      k_len: Int):
    """Writes dst[k * 16 + j] = W[panel * 16 + j, k] as float32 from the k-major float layout."""
    for k in range(k_len):
        comptime for c in range(VECTORS_PER_PANEL):
            var w = w_ptr.unsafe_load[width=F32_WIDTH]((panel * k_len + k) * PANEL + c * F32_WIDTH)
            dst.unsafe_store(k * PANEL + c * F32_WIDTH, w.cast[DType.float32]())


@always_inline
def decoded_fmas[MR: Int, NP: Int](
    acc: MutPointer[Float32, ...], x32: Pointer[Float32, ...], decoded: Pointer[Float32, ...], k_len: Int,
    x_row: Int, k_begin: Int, k_end: Int,
):
    """Acc[m, n] = fma(x[m, k], decoded[n, k], acc[m, n]) for k in [k_begin, k_end), MR rows x NP decoded panels."""
    comptime V = NP * VECTORS_PER_PANEL
    var weights = stack_allocation[V * F32_WIDTH, Float32]()
    for k in range(k_begin, k_end):
        comptime for v in range(V):
            var at = ((v // VECTORS_PER_PANEL) * k_len + k) * PANEL + (v % VECTORS_PER_PANEL) * F32_WIDTH
            weights.unsafe_store(v * F32_WIDTH, decoded.unsafe_load[width=F32_WIDTH](at))
        fma_decoded_k[MR, NP](acc, weights, x32, x_row + k, k_len)


@always_inline
def decoded_tile[out_dtype: DType, MR: Int, NP: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x32: Pointer[Float32, ...], decoded: Pointer[Float32, ...],
    shape: LinearShape, row: Int, panel: Int,
):
    """MR rows x NP decoded bf16 panels (decoded = [NP][K][16] float32, starting at `panel`)."""
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    zero_tile[MR, NP](acc)
    decoded_fmas[MR, NP](acc, x32, decoded, shape.k, row * shape.k, 0, shape.k)
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


@always_inline
def decoded_int8_tile[S: DType, //, out_dtype: DType, MR: Int, NP: Int, group: Int](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x32: Pointer[Float32, ...], decoded: Pointer[Float32, ...],
    scale_ptr: Pointer[Scalar[S], ...], shape: LinearShape, row: Int, panel: Int,
):
    """MR rows x NP decoded int8 panels (unscaled q as float32), group by group like int8_tile."""
    var acc = stack_allocation[MR * NP * PANEL, Float32]()
    var part = stack_allocation[MR * NP * PANEL, Float32]()
    zero_tile[MR, NP](acc)
    var k_len = shape.k
    var groups = int8_padded_k(k_len, group) // group
    for g in range(groups):
        zero_tile[MR, NP](part)
        decoded_fmas[MR, NP](part, x32, decoded, k_len, row * k_len, g * group, min(k_len, (g + 1) * group))
        fold_group[MR, NP](acc, part, scale_ptr, groups, panel, g)
    store_tile[out_dtype, MR, NP](out_ptr, acc, shape, row, panel)


# --- Drivers: rows x panels -> tiles, threads over panels ---------------------------------------------------

def linear_tasks(shape: LinearShape) -> Int:
    """Threads for one op: split the panels only when each thread gets real work."""
    var macs = shape.rows * shape.n * shape.k
    return max(1, min(num_physical_cores(), shape.panels(), macs // MIN_MACS_PER_TASK))


@always_inline
def row_block(shape: LinearShape, x_bytes: Int, rows_per_call: Int) -> Int:
    var rows = max(1, ROW_BLOCK_BYTES // max(1, shape.k * x_bytes))
    return max(rows_per_call, rows - rows % rows_per_call)


def for_each_tile[
    TileFn: def[MR: Int, NP: Int](row: Int, panel: Int) -> None, //, MAX_ROWS: Int, SINGLE_PANEL_ROWS: Int = 0
](shape: LinearShape, x_bytes: Int, tile: TileFn, ctx: DeviceContext) raises:
    """Calls tile[MR, NP](row, panel) over the whole output: threads split the panels into contiguous ranges;
    rows go in blocks that stay in L2, each block in balanced groups of at most MAX_ROWS rows, a group of MR
    rows taking tile_panels[MR]() panels per call, or one panel for groups of at most SINGLE_PANEL_ROWS rows
    (panels lie one after another in memory: a thread's tiles of one panel read its weights as one stream).
    Every row's arithmetic is the same whatever group it lands in."""
    var block = row_block(shape, x_bytes, MAX_ROWS)
    var rows = shape.rows

    def panel_range(first: Int, end: Int) raises {imm tile, imm rows, imm block}:
        for row0 in range(0, rows, block):
            for chunk in range(first, end, PANEL_CHUNK):
                var chunk_end = min(end, chunk + PANEL_CHUNK)

                def group[MR: Int](row: Int) {imm tile, imm chunk, imm chunk_end}:
                    comptime NP = 1 if MR <= SINGLE_PANEL_ROWS else tile_panels[MR]()
                    var panel = chunk
                    while panel + NP <= chunk_end:
                        tile[MR, NP](row, panel)
                        panel += NP
                    while panel < chunk_end:
                        tile[MR, 1](row, panel)
                        panel += 1

                for_row_groups[MAX_ROWS](row0, min(rows, row0 + block), group)

    parallel_ranges(shape.panels(), linear_tasks(shape), panel_range, ctx)


comptime ScratchPointer = MutPointer[Float32, MutAnyOrigin]


def gemm_decoded[
    DecodeFn: def(panel: Int, dst: ScratchPointer) -> None,
    TileFn: def[MR: Int, NP: Int](decoded: ScratchPointer, row: Int, panel: Int) -> None, //, MR: Int, NP: Int,
](shape: LinearShape, decode: DecodeFn, tile: TileFn, ctx: DeviceContext) raises:
    """The prefill path: each thread takes a contiguous range of panels, decodes NP of them at a time into a
    scratch buffer of its own (decode(panel, dst) writes the panel's [K][16] floats at dst) and runs every row
    against them, tile[rows, NP or 1](decoded, row, panel) in balanced groups of at most MR rows."""
    var panel_floats = shape.k * PANEL
    var rows = shape.rows

    def panel_range(first: Int, end: Int) raises {imm decode, imm tile, imm panel_floats, imm rows}:
        var scratch = List[Float32](length=NP * panel_floats, fill=0)
        var decoded = rebind[ScratchPointer](scratch.unsafe_ptr())
        var panel = first
        while panel < end:
            var here = min(NP, end - panel)
            for p in range(here):
                decode(panel + p, decoded.unsafe_offset(p * panel_floats))
            if here == NP:
                def full[R: Int](row: Int) {imm tile, imm decoded, imm panel}:
                    tile[R, NP](decoded, row, panel)

                for_row_groups[MR](0, rows, full)
            else:
                for p in range(here):
                    var one = decoded.unsafe_offset(p * panel_floats)
                    var at = panel + p

                    def single[R: Int](row: Int) {imm tile, imm one, imm at}:
                        tile[R, 1](one, row, at)

                    for_row_groups[MR](0, rows, single)
            panel += here
        _ = scratch^

    parallel_ranges(shape.panels(), linear_tasks(shape), panel_range, ctx)


def with_float32_rows[x_dtype: DType, BodyFn: def(Pointer[Float32, ImmutAnyOrigin]) raises -> None, //](
    x_ptr: Pointer[Scalar[x_dtype], ...], count: Int, body: BodyFn
) raises:
    """Calls body with x as float32: x itself, or a widened copy (exact), so that every broadcast in the
    kernels is one load (a bfloat16 broadcast costs four instructions)."""
    comptime if x_dtype == DType.float32:
        body(rebind[Pointer[Float32, ImmutAnyOrigin]](x_ptr))
    else:
        var widened = List[Float32](length=count, fill=0)
        var dst = widened.unsafe_ptr()
        var i = 0
        while i + F32_WIDTH <= count:
            dst.unsafe_store(i, widen(x_ptr.unsafe_load[width=F32_WIDTH](i)))
            i += F32_WIDTH
        while i < count:
            dst.unsafe_store(i, widen(x_ptr.unsafe_load(i)))
            i += 1
        body(rebind[Pointer[Float32, ImmutAnyOrigin]](dst))
        _ = widened^


def linear_bf16_cpu[x_dtype: DType, out_dtype: DType](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[Scalar[x_dtype], ...],
    w_ptr: Pointer[BFloat16, ...], shape: LinearShape, ctx: DeviceContext,
) raises:
    var lanes = w_ptr.unsafe_bitcast[UInt32]()
    comptime if uses_dot_bf16[x_dtype]():
        var x_bf16 = rebind[Pointer[BFloat16, x_ptr.origin]](x_ptr.unsafe_bitcast[BFloat16]())

        def dot_tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm x_bf16, imm lanes, imm shape}:
            if shape.k % 2 == 0:
                bf16_tile_dot[out_dtype, MR, NP, True](out_ptr, x_bf16, lanes, shape, row, panel)
            else:
                bf16_tile_dot[out_dtype, MR, NP, False](out_ptr, x_bf16, lanes, shape, row, panel)

        # vdpbf16ps reads the packed pairs directly: decode and prefill run the same tile.
        for_each_tile[DOT_TILE_ROWS](shape, 2, dot_tile, ctx)
    else:
        var k_len = shape.k

        def decode(panel: Int, dst: ScratchPointer) {imm lanes, imm k_len}:
            decode_bf16_panel(dst, lanes, panel, k_len)

        def run(x32: Pointer[Float32, ImmutAnyOrigin]) raises {imm out_ptr, imm lanes, imm shape, imm decode, ref ctx}:
            if shape.rows < GEMM_MIN_ROWS:
                def tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm x32, imm lanes, imm shape}:
                    bf16_tile_decoded[out_dtype, MR, NP](out_ptr, x32, lanes, shape, row, panel)

                for_each_tile[decode_tile_rows()](shape, 4, tile, ctx)
            else:
                def gemm_tile[MR: Int, NP: Int](decoded: ScratchPointer, row: Int, panel: Int) {imm out_ptr, imm x32, imm shape}:
                    decoded_tile[out_dtype, MR, NP](out_ptr, x32, decoded, shape, row, panel)

                gemm_decoded[max_tile_rows(), tile_panels[max_tile_rows()]()](shape, decode, gemm_tile, ctx)

        with_float32_rows(x_ptr, shape.rows * shape.k, run)


def linear_int8_cpu[S: DType, //, x_dtype: DType, out_dtype: DType, group: Int, OFFSETS: Bool](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[Scalar[x_dtype], ...],
    q_ptr: Pointer[Int8, ...], scale_ptr: Pointer[Scalar[S], ...], offset_ptr: Pointer[Float32, ...],
    shape: LinearShape, ctx: DeviceContext,
) raises:
    """W = q * scale (+ offset with OFFSETS; offset_ptr is not read without)."""
    var k_len = shape.k
    var padded_k = int8_padded_k(k_len, group)
    # read-only views, so that the decode and the tile closures may both hold them
    var scales = rebind[Pointer[Scalar[S], ImmutAnyOrigin]](scale_ptr)
    var offsets = rebind[Pointer[Float32, ImmutAnyOrigin]](offset_ptr)

    def decode(panel: Int, dst: ScratchPointer) {imm q_ptr, imm scales, imm offsets, imm k_len, imm padded_k}:
        comptime if exact_int8_arithmetic[S, OFFSETS]():
            decode_exact_int8_panel[OFFSETS](dst, q_ptr, scales, offsets, panel, k_len, padded_k, group)
        else:
            decode_int8_panel(dst, q_ptr, panel, k_len, padded_k)

    def run(x32: Pointer[Float32, ImmutAnyOrigin]) raises {imm out_ptr, imm q_ptr, imm scales, imm offsets, imm shape, imm decode, ref ctx}:
        if shape.rows < GEMM_MIN_ROWS:
            def tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm x32, imm q_ptr, imm scales, imm offsets, imm shape}:
                int8_tile[out_dtype, MR, NP, group, OFFSETS](out_ptr, x32, q_ptr, scales, offsets, shape, row, panel)

            for_each_tile[decode_tile_rows()](shape, 4, tile, ctx)
        else:
            def gemm_tile[MR: Int, NP: Int](decoded: ScratchPointer, row: Int, panel: Int) {imm out_ptr, imm x32, imm scales, imm shape}:
                comptime if exact_int8_arithmetic[S, OFFSETS]():  # decoded holds the weights themselves
                    decoded_tile[out_dtype, MR, NP](out_ptr, x32, decoded, shape, row, panel)
                else:
                    decoded_int8_tile[out_dtype, MR, NP, group](out_ptr, x32, decoded, scales, shape, row, panel)

            gemm_decoded[max_tile_rows(), tile_panels[max_tile_rows()]()](shape, decode, gemm_tile, ctx)

    with_float32_rows(x_ptr, shape.rows * shape.k, run)


def linear_float_cpu[E: DType, //, x_dtype: DType, out_dtype: DType](
    out_ptr: MutPointer[Scalar[out_dtype], ...], x_ptr: Pointer[Scalar[x_dtype], ...],
    w_ptr: Pointer[Scalar[E], ...], shape: LinearShape, ctx: DeviceContext,
) raises:
    """K-major float16 / float32 weights."""
    var k_len = shape.k

    def decode(panel: Int, dst: ScratchPointer) {imm w_ptr, imm k_len}:
        decode_float_panel(dst, w_ptr, panel, k_len)

    def run(x32: Pointer[Float32, ImmutAnyOrigin]) raises {imm out_ptr, imm w_ptr, imm shape, imm decode, ref ctx}:
        if shape.rows < GEMM_MIN_ROWS:
            def tile[MR: Int, NP: Int](row: Int, panel: Int) {imm out_ptr, imm x32, imm w_ptr, imm shape}:
                float_tile[out_dtype, MR, NP](out_ptr, x32, w_ptr, shape, row, panel)

            for_each_tile[decode_tile_rows()](shape, 4, tile, ctx)
        else:
            def gemm_tile[MR: Int, NP: Int](decoded: ScratchPointer, row: Int, panel: Int) {imm out_ptr, imm x32, imm shape}:
                decoded_tile[out_dtype, MR, NP](out_ptr, x32, decoded, shape, row, panel)

            gemm_decoded[max_tile_rows(), tile_panels[max_tile_rows()]()](shape, decode, gemm_tile, ctx)

    with_float32_rows(x_ptr, shape.rows * shape.k, run)
