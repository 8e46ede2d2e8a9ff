# MILI's 4-bit linear ops at M = 1 called as plain functions, outside any MAX graph: the 112 projections of a
# Qwen3-0.6B-shaped model (28 layers of q/k/v 1,024 -> 4,096, o 2,048 -> 1,024, gate/up 1,024 -> 6,144,
# down 3,072 -> 1,024) run one after another, so that every call reads its weights from DRAM as a decode step
# does (~250 MB of codes against a 32 MB L3), and then one projection repeated (its weights warm in L2/L3).
# Prints the median microseconds a projection and GB/s of the bytes read, for Q4_0 (float16 scales) and Q4_K
# (two-level scales), each shape's tiles alone on one core, and first the tied LM head in Q6_K. Compare with the
# read bandwidth (read_bandwidth.mojo) and with the op inside a graph (`python -m benchmarks.step`). Inputs are
# fixed patterns; speed does not depend on the values.
# Run: mojo run -I . benchmarks/mojo/linear_4bit_decode.mojo [passes] [chain]   ("chain": the chains only)
from max.gpu.host import DeviceContext
from mojo_kernels.linear_int4 import (
    QuantizedRows, int4_k_tile, int4_tile, linear_int4_cpu, linear_int4_k_cpu, with_quantized_rows,
)
from mojo_kernels.linear_int6 import int6_tile, linear_int6_cpu
from mojo_kernels.linear_layout import (
    LinearShape, INT4_GROUP, INT6_SUBGROUP, PANEL, int4_panel_bytes, int4_k_blocks, int6_blocks, int6_high_panel_bytes,
)
from std.sys import argv
from std.time import perf_counter_ns

comptime LAYERS = 28
comptime HIDDEN = 1024


def median(mut samples: List[Float64]) -> Float64:
    sort(samples)
    return samples[len(samples) // 2]


def fastest(samples: List[Float64]) -> Float64:
    """The fastest pass: on a shared, noisy machine the best estimate of a one-core kernel's own rate."""
    var best = samples[0]
    for s in samples:
        best = min(best, s)
    return best


def activations(count: Int) -> List[BFloat16]:
    var x = List[BFloat16](length=count, fill=0)
    for i in range(count):
        x[i] = BFloat16(Float32(i % 13) * 0.1 - 0.6)
    return x^


struct Projection(Movable):
    """One projection's packed 4-bit weights (codes, and scales of both layouts: Q4_0's float16 per group;
    Q4_K's 6-bit sub-scales and mins with float16 block scales and mins), each array its own memory so that every
    byte counted is a byte read."""

    var shape: LinearShape
    var codes: List[UInt8]
    var scales: List[Float16]
    var sub_scales: List[UInt8]
    var mins: List[UInt8]
    var block_scales: List[Float16]
    var block_mins: List[Float16]

    def __init__(out self, k: Int, n: Int, seed: Int):
        self.shape = LinearShape(1, k, n)
        var panels = self.shape.panels()
        var groups = k // INT4_GROUP
        self.codes = List[UInt8](length=panels * int4_panel_bytes(k), fill=0)
        for i in range(len(self.codes)):
            self.codes[i] = UInt8((i * 37 + seed) % 251)
        self.scales = List[Float16](length=panels * groups * PANEL, fill=0)
        for i in range(len(self.scales)):
            self.scales[i] = Float16(Float32((i + seed) % 7 + 1) * 0.001)
        self.sub_scales = List[UInt8](length=panels * groups * PANEL, fill=0)
        self.mins = List[UInt8](length=panels * groups * PANEL, fill=0)
        for i in range(len(self.sub_scales)):
            self.sub_scales[i] = UInt8((i * 5 + seed) % 63)
            self.mins[i] = UInt8((i * 3 + seed) % 63)
        self.block_scales = List[Float16](length=panels * int4_k_blocks(k) * PANEL, fill=0)
        self.block_mins = List[Float16](length=panels * int4_k_blocks(k) * PANEL, fill=0)
        for i in range(len(self.block_scales)):
            self.block_scales[i] = Float16(Float32((i + seed) % 5 + 1) * 0.0001)
            self.block_mins[i] = Float16(Float32((i + seed) % 3 + 1) * 0.0002)

    def bytes[two_level: Bool](self) -> Int:
        comptime if two_level:
            return len(self.codes) + len(self.sub_scales) + len(self.mins) + 2 * (len(self.block_scales)
                                                                                   + len(self.block_mins))
        else:
            return len(self.codes) + 2 * len(self.scales)

    def run[two_level: Bool](self, out_ptr: MutPointer[BFloat16, ...], x_ptr: Pointer[BFloat16, ...],
                             ctx: DeviceContext) raises:
        comptime if two_level:
            linear_int4_k_cpu[DType.bfloat16, DType.bfloat16](
                out_ptr, x_ptr, self.codes.unsafe_ptr(), self.sub_scales.unsafe_ptr(), self.mins.unsafe_ptr(),
                self.block_scales.unsafe_ptr(), self.block_mins.unsafe_ptr(), self.shape, ctx)
        else:
            linear_int4_cpu[DType.bfloat16, DType.bfloat16, False](
                out_ptr, x_ptr, self.codes.unsafe_ptr(), self.scales.unsafe_ptr(), self.scales.unsafe_ptr(),
                self.shape, ctx)


def time_tiles[two_level: Bool](name: String, p: Projection, passes: Int, ctx: DeviceContext) raises:
    """The tiles alone on one core (rows quantized once, no threads): the kernel's own rate."""
    var x = activations(4 * HIDDEN)
    var out = List[BFloat16](length=8 * HIDDEN, fill=0)
    var out_ptr = out.unsafe_ptr()
    var codes = p.codes.unsafe_ptr()
    var scales = p.scales.unsafe_ptr()
    var subs = p.sub_scales.unsafe_ptr()
    var mins = p.mins.unsafe_ptr()
    var blocks = p.block_scales.unsafe_ptr()
    var block_mins = p.block_mins.unsafe_ptr()
    var shape = p.shape
    var samples = List[Float64]()

    def body(rows: QuantizedRows) raises {mut samples, imm out_ptr, imm codes, imm scales, imm subs, imm mins, imm blocks, imm block_mins, imm shape, imm passes}:
        for _ in range(passes * 20):
            var start = perf_counter_ns()
            var panel = 0
            while panel + 4 <= shape.panels():
                comptime if two_level:
                    int4_k_tile[DType.bfloat16, 1, 4](out_ptr, rows, codes, subs, mins, blocks, block_mins, shape, 0,
                                                      panel)
                else:
                    int4_tile[DType.bfloat16, 1, 4, False](out_ptr, rows, codes, scales, scales, shape, 0, panel)
                panel += 4
            samples.append(Float64(perf_counter_ns() - start) / 1e3)

    with_quantized_rows(x.unsafe_ptr(), shape, body, ctx)
    var best = fastest(samples)
    var us = median(samples)
    print("   ", name, "tiles alone, one core, K", shape.k, "N", shape.n, ":", us, "us,",
          Float64(p.bytes[two_level]()) / us / 1e3, "GB/s; fastest", Float64(p.bytes[two_level]()) / best / 1e3, "GB/s")


def time_format[two_level: Bool](name: String, model: List[Projection], passes: Int, chain_only: Bool,
                                 ctx: DeviceContext) raises:
    var x = activations(4 * HIDDEN)
    var out = List[BFloat16](length=8 * HIDDEN, fill=0)
    var total_bytes = 0
    for i in range(len(model)):
        total_bytes += model[i].bytes[two_level]()
    var chain = List[Float64]()
    for _ in range(passes):
        var start = perf_counter_ns()
        for i in range(len(model)):
            model[i].run[two_level](out.unsafe_ptr(), x.unsafe_ptr(), ctx)
        chain.append(Float64(perf_counter_ns() - start) / 1e3)
    var us = median(chain)
    print(name, "chain of", len(model), "projections:", us / Float64(len(model)), "us a projection,",
          Float64(total_bytes) / us / 1e3, "GB/s,", us / 1e3, "ms a pass")
    if chain_only:
        return
    for which in range(4):
        ref p = model[which]
        var warm = List[Float64]()
        for _ in range(passes * 20):
            var start = perf_counter_ns()
            p.run[two_level](out.unsafe_ptr(), x.unsafe_ptr(), ctx)
            warm.append(Float64(perf_counter_ns() - start) / 1e3)
        var w = median(warm)
        time_tiles[two_level](name, p, passes, ctx)
        print("   ", name, "warm K", p.shape.k, "N", p.shape.n, ":", w, "us,", Float64(p.bytes[two_level]()) / w / 1e3,
              "GB/s")


def time_head(passes: Int, ctx: DeviceContext) raises:
    """Qwen3-0.6B's tied LM head (151,936 x 1,024) in Q6_K, as a Q4_K_M file stores it (a third of a token's bytes)."""
    comptime VOCAB = 151936
    var shape = LinearShape(1, HIDDEN, VOCAB)
    var panels = shape.panels()
    var codes = List[UInt8](length=panels * int4_panel_bytes(HIDDEN), fill=0)
    for i in range(len(codes)):
        codes[i] = UInt8((i * 37) % 251)
    var high = List[UInt8](length=panels * int6_high_panel_bytes(HIDDEN), fill=0)
    for i in range(len(high)):
        high[i] = UInt8((i * 11) % 253)
    var scales = List[Int8](length=panels * (HIDDEN // INT6_SUBGROUP) * PANEL, fill=0)
    for i in range(len(scales)):
        scales[i] = Int8((i * 7) % 61 - 30)
    var blocks = List[Float16](length=panels * int6_blocks(HIDDEN) * PANEL, fill=0)
    for i in range(len(blocks)):
        blocks[i] = Float16(Float32(i % 5 + 1) * 0.0001)
    var bytes = len(codes) + len(high) + len(scales) + 2 * len(blocks)
    var x = activations(HIDDEN)
    var out = List[Float32](length=VOCAB, fill=0)
    var samples = List[Float64]()
    for _ in range(passes):
        var start = perf_counter_ns()
        linear_int6_cpu[DType.bfloat16, DType.float32](out.unsafe_ptr(), x.unsafe_ptr(), codes.unsafe_ptr(),
                                                       high.unsafe_ptr(), scales.unsafe_ptr(), blocks.unsafe_ptr(),
                                                       shape, ctx)
        samples.append(Float64(perf_counter_ns() - start) / 1e3)
    var us = median(samples)
    print("Q6_K LM head K", HIDDEN, "N", VOCAB, ":", us, "us,", Float64(bytes) / us / 1e3, "GB/s,",
          Float64(bytes) / 1e6, "MB")

    # the tiles alone on one core over the head's first 4,096 channels (warm in L3 after the first pass)
    comptime SLICE_PANELS = 4096 // PANEL
    var out_ptr = out.unsafe_ptr()
    var codes_ptr = codes.unsafe_ptr()
    var high_ptr = high.unsafe_ptr()
    var scale_ptr = scales.unsafe_ptr()
    var block_ptr = blocks.unsafe_ptr()
    var tile_samples = List[Float64]()

    def body(rows: QuantizedRows) raises {mut tile_samples, imm out_ptr, imm codes_ptr, imm high_ptr, imm scale_ptr, imm block_ptr, imm shape, imm passes}:
        for _ in range(passes * 20):
            var start = perf_counter_ns()
            for panel in range(0, SLICE_PANELS, 4):
                int6_tile[DType.float32, 1, 4](out_ptr, rows, codes_ptr, high_ptr, scale_ptr, block_ptr, shape, 0,
                                               panel)
            tile_samples.append(Float64(perf_counter_ns() - start) / 1e3)

    with_quantized_rows(x.unsafe_ptr(), shape, body, ctx)
    var best = fastest(tile_samples)
    var tile_us = median(tile_samples)
    var slice_bytes = Float64(bytes) * Float64(SLICE_PANELS) / Float64(panels)
    print("    Q6_K tiles alone, one core, K", HIDDEN, "N 4096 :", tile_us, "us,", slice_bytes / tile_us / 1e3,
          "GB/s; fastest", slice_bytes / best / 1e3, "GB/s")


def main() raises:
    var args = argv()
    var passes = Int(args[1]) if len(args) > 1 else 9
    var chain_only = len(args) > 2 and args[2] == "chain"
    var ctx = DeviceContext(api="cpu")
    var model = List[Projection]()
    for layer in range(LAYERS):
        model.append(Projection(HIDDEN, 4096, layer))
        model.append(Projection(2048, HIDDEN, layer + 1))
        model.append(Projection(HIDDEN, 6144, layer + 2))
        model.append(Projection(3072, HIDDEN, layer + 3))
    time_head(passes, ctx)
    time_format[False]("Q4_0", model, passes, chain_only, ctx)
    time_format[True]("Q4_K", model, passes, chain_only, ctx)
