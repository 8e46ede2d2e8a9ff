# The machine's read bandwidth from DRAM as a memory-bound kernel sees it: every core streams its share of a
# buffer far larger than the caches with 512-bit-or-native SIMD loads into a few independent accumulators.
# Prints the median GB/s of several passes. Threads come from the same pool MILI's kernels use.
# Run: mojo run -I . benchmarks/mojo/read_bandwidth.mojo [MiB] [passes]
from max.gpu.host import DeviceContext
from mojo_kernels.cpu_parallel import parallel_for
from std.sys import argv, num_physical_cores, simd_width_of
from std.time import perf_counter_ns

comptime WIDTH = simd_width_of[DType.uint64]()


def main() raises:
    var args = argv()
    var mib = Int(args[1]) if len(args) > 1 else 1024
    var passes = Int(args[2]) if len(args) > 2 else 7
    var count = mib * 1024 * 1024 // 8
    var data = List[UInt64](length=count, fill=1)
    var ptr = data.unsafe_ptr()
    var cores = num_physical_cores()
    var per_core = count // cores // (4 * WIDTH) * (4 * WIDTH)
    var sinks = List[UInt64](length=cores, fill=0)
    var sink_ptr = sinks.unsafe_ptr()
    var seconds = List[Float64]()
    var ctx = DeviceContext(api="cpu")
    for _ in range(passes):
        def read_share(core: Int) raises {imm ptr, imm per_core, imm sink_ptr}:
            var a0 = SIMD[DType.uint64, WIDTH](0)
            var a1 = SIMD[DType.uint64, WIDTH](0)
            var a2 = SIMD[DType.uint64, WIDTH](0)
            var a3 = SIMD[DType.uint64, WIDTH](0)
            var base = core * per_core
            var i = 0
            while i < per_core:
                a0 ^= ptr.unsafe_load[width=WIDTH](base + i)
                a1 ^= ptr.unsafe_load[width=WIDTH](base + i + WIDTH)
                a2 ^= ptr.unsafe_load[width=WIDTH](base + i + 2 * WIDTH)
                a3 ^= ptr.unsafe_load[width=WIDTH](base + i + 3 * WIDTH)
                i += 4 * WIDTH
            sink_ptr.unsafe_store(core, ((a0 ^ a1) ^ (a2 ^ a3)).reduce_add())

        var start = perf_counter_ns()
        parallel_for(cores, read_share, ctx)
        seconds.append(Float64(perf_counter_ns() - start) / 1e9)
    sort(seconds)
    var gb = Float64(per_core * cores * 8) / 1e9
    print("read_bandwidth_gb_s", gb / seconds[len(seconds) // 2], "cores", cores, "sink", sinks[0])
