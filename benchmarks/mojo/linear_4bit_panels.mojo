# How many panels (16 output channels each) MILI's 4-bit M = 1 tile should stream at once. A decode step reads
# every weight once from DRAM; a tile of NP panels reads NP code streams (8-24 KB apart) plus its scales' streams
# at once, and 2 cores x NP streams is what DRAM and the prefetchers see. This runs a Qwen3-0.6B-shaped token's
# projections (28 layers of q/k/v, o, gate/up, down in Q4_K, then the tied LM head in Q6_K, ~370 MB) with tiles of
# 1, 2 and 4 panels, the three interleaved pass by pass in one process so that they share the machine's noise, and
# prints each one's median milliseconds a token and GB/s. Inputs are fixed patterns; speed does not depend on them.
# Run: mojo run -I . benchmarks/mojo/linear_4bit_panels.mojo [passes]
from max.gpu.host import DeviceContext
from mojo_kernels.cpu_parallel import parallel_ranges
from mojo_kernels.linear_cpu import linear_tasks
from mojo_kernels.linear_int4 import QuantizedRows, int4_k_tile, with_quantized_rows
from mojo_kernels.linear_int6 import int6_tile
from mojo_kernels.linear_layout import (
    LinearShape, INT4_GROUP, INT6_SUBGROUP, PANEL, int4_panel_bytes, int4_k_blocks, int6_blocks, int6_high_panel_bytes,
)
from std.sys import argv
from std.time import perf_counter_ns

comptime LAYERS = 28
comptime HIDDEN = 1024
comptime VOCAB = 151936


def median(mut samples: List[Float64]) -> Float64:
    sort(samples)
    return samples[len(samples) // 2]


struct Weights(Movable):
    """One projection's packed weights in both two-level layouts' arrays: Q4_K (codes, 6-bit sub-scales and mins,
    float16 block scales and mins) or Q6_K (codes, high bits, int8 sub-scales, float16 block scales)."""

    var shape: LinearShape
    var six_bits: Bool
    var codes: List[UInt8]
    var high: List[UInt8]
    var subs: List[UInt8]
    var mins: List[UInt8]
    var subs6: List[Int8]
    var blocks: List[Float16]
    var block_mins: List[Float16]

    def __init__(out self, k: Int, n: Int, six_bits: Bool, seed: Int):
        self.shape = LinearShape(1, k, n)
        self.six_bits = six_bits
        var panels = self.shape.panels()
        var groups = k // INT4_GROUP
        self.codes = List[UInt8](length=panels * int4_panel_bytes(k), fill=0)
        for i in range(len(self.codes)):
            self.codes[i] = UInt8((i * 37 + seed) % 251)
        var four = 0 if six_bits else 1
        var six = 1 - four
        self.high = List[UInt8](length=six * panels * int6_high_panel_bytes(k), fill=0)
        for i in range(len(self.high)):
            self.high[i] = UInt8((i * 11 + seed) % 253)
        self.subs = List[UInt8](length=four * panels * groups * PANEL, fill=0)
        self.mins = List[UInt8](length=four * panels * groups * PANEL, fill=0)
        for i in range(len(self.subs)):
            self.subs[i] = UInt8((i * 5 + seed) % 63)
            self.mins[i] = UInt8((i * 3 + seed) % 63)
        self.subs6 = List[Int8](length=six * panels * (k // INT6_SUBGROUP) * PANEL, fill=0)
        for i in range(len(self.subs6)):
            self.subs6[i] = Int8((i * 7 + seed) % 61 - 30)
        var block_count = panels * (int6_blocks(k) if six_bits else int4_k_blocks(k)) * PANEL
        self.blocks = List[Float16](length=block_count, fill=0)
        self.block_mins = List[Float16](length=four * block_count, fill=0)
        for i in range(len(self.blocks)):
            self.blocks[i] = Float16(Float32((i + seed) % 5 + 1) * 0.0001)
        for i in range(len(self.block_mins)):
            self.block_mins[i] = Float16(Float32((i + seed) % 3 + 1) * 0.0002)

    def bytes(self) -> Int:
        return (len(self.codes) + len(self.high) + len(self.subs) + len(self.mins) + len(self.subs6)
                + 2 * (len(self.blocks) + len(self.block_mins)))

    def run[NP: Int](self, out_ptr: MutPointer[Float32, ...], x_ptr: Pointer[BFloat16, ...], ctx: DeviceContext) raises:
        """The op as linear_int4_k_cpu / linear_int6_cpu run it, with tiles of NP panels."""
        var shape = self.shape
        var six_bits = self.six_bits
        var codes = self.codes.unsafe_ptr()
        var high = self.high.unsafe_ptr()
        var subs = self.subs.unsafe_ptr()
        var mins = self.mins.unsafe_ptr()
        var subs6 = self.subs6.unsafe_ptr()
        var blocks = self.blocks.unsafe_ptr()
        var block_mins = self.block_mins.unsafe_ptr()

        def body(rows: QuantizedRows) raises {imm out_ptr, imm shape, imm six_bits, imm codes, imm high, imm subs, imm mins, imm subs6, imm blocks, imm block_mins, ref ctx}:
            def panel_range(first: Int, end: Int) raises {imm out_ptr, imm rows, imm shape, imm six_bits, imm codes, imm high, imm subs, imm mins, imm subs6, imm blocks, imm block_mins}:
                var panel = first
                while panel < end:
                    if panel + NP <= end:
                        if six_bits:
                            int6_tile[DType.float32, 1, NP](out_ptr, rows, codes, high, subs6, blocks, shape, 0, panel)
                        else:
                            int4_k_tile[DType.float32, 1, NP](out_ptr, rows, codes, subs, mins, blocks, block_mins,
                                                              shape, 0, panel)
                        panel += NP
                    else:
                        if six_bits:
                            int6_tile[DType.float32, 1, 1](out_ptr, rows, codes, high, subs6, blocks, shape, 0, panel)
                        else:
                            int4_k_tile[DType.float32, 1, 1](out_ptr, rows, codes, subs, mins, blocks, block_mins,
                                                             shape, 0, panel)
                        panel += 1

            parallel_ranges(shape.panels(), linear_tasks(shape), panel_range, ctx)

        with_quantized_rows(x_ptr, shape, body, ctx)


def main() raises:
    var args = argv()
    var passes = Int(args[1]) if len(args) > 1 else 15
    var ctx = DeviceContext(api="cpu")
    var model = List[Weights]()
    for layer in range(LAYERS):
        model.append(Weights(HIDDEN, 4096, False, layer))
        model.append(Weights(2048, HIDDEN, False, layer + 1))
        model.append(Weights(HIDDEN, 6144, False, layer + 2))
        model.append(Weights(3072, HIDDEN, False, layer + 3))
    model.append(Weights(HIDDEN, VOCAB, True, 0))
    var total_bytes = 0
    for i in range(len(model)):
        total_bytes += model[i].bytes()
    var x = List[BFloat16](length=4 * HIDDEN, fill=0)
    for i in range(len(x)):
        x[i] = BFloat16(Float32(i % 13) * 0.1 - 0.6)
    var out = List[Float32](length=VOCAB, fill=0)
    var samples = List[List[Float64]]()
    for _ in range(3):
        samples.append(List[Float64]())
    print("a token's projections:", Float64(total_bytes) / 1e6, "MB;", passes, "passes of each tile width")
    for _ in range(passes):
        comptime for which in range(3):
            comptime NP = 1 << which
            var start = perf_counter_ns()
            for i in range(len(model)):
                model[i].run[NP](out.unsafe_ptr(), x.unsafe_ptr(), ctx)
            samples[which].append(Float64(perf_counter_ns() - start) / 1e6)
    for which in range(3):
        var ms = median(samples[which])
        print("tiles of", 1 << which, "panels:", ms, "ms a token,", Float64(total_bytes) / ms / 1e6, "GB/s")
