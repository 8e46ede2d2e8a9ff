# Instantiates every CPU path of MILI's linear op, for `mojo build --target-cpu X --emit asm` checks of the
# instruction sets this machine lacks (tests/kernels/test_linear_isa.py). Run natively it also checks one
# product per path against a hand-computed value.
from std.sys import argv
from max.gpu.host import DeviceContext
from mojo_kernels.linear_cpu import linear_bf16_cpu, linear_float_cpu, linear_int8_cpu
from mojo_kernels.linear_int4 import linear_int4_cpu, linear_int4_k_cpu
from mojo_kernels.linear_int6 import linear_int6_cpu
from mojo_kernels.linear_layout import (LinearShape, bf16_panel_stride, int8_padded_k, int4_panel_bytes,
                                        int6_high_panel_bytes, int6_blocks)


def run_all(rows: Int) raises -> Float32:
    """Runs every path with x = 1 and W[n, k] = 1 for every k: each output is K (exact), whatever the path; returns the sum of the
    first output of every path (8 * K when all agree)."""
    comptime K = 40
    comptime N = 20
    var ctx = DeviceContext(api="cpu")
    var shape = LinearShape(rows, K, N)
    var x32 = List[Float32](length=rows * K, fill=1)
    var x16 = List[BFloat16](length=rows * K, fill=1)
    var w = List[BFloat16](length=2 * bf16_panel_stride(K), fill=1)
    var q = List[Int8](length=2 * int8_padded_k(K, 32) * 16, fill=1)
    var scales = List[Float16](length=2 * (int8_padded_k(K, 32) // 32) * 16, fill=1)
    var scales32 = List[Float32](length=2 * (int8_padded_k(K, 32) // 32) * 16, fill=1)
    var offsets = List[Float32](length=2 * (int8_padded_k(K, 32) // 32) * 16, fill=0)
    var w16 = List[Float16](length=2 * K * 16, fill=1)
    var out32 = List[Float32](length=rows * N, fill=0)
    var out16 = List[BFloat16](length=rows * N, fill=0)
    var total: Float32 = 0
    linear_bf16_cpu[DType.float32, DType.float32](out32.unsafe_ptr(), x32.unsafe_ptr(), w.unsafe_ptr(), shape, ctx)
    total += out32[0]
    linear_bf16_cpu[DType.bfloat16, DType.bfloat16](out16.unsafe_ptr(), x16.unsafe_ptr(), w.unsafe_ptr(), shape, ctx)
    total += Float32(out16[0])
    linear_bf16_cpu[DType.bfloat16, DType.float32](out32.unsafe_ptr(), x16.unsafe_ptr(), w.unsafe_ptr(), shape, ctx)
    total += out32[0]
    linear_int8_cpu[DType.float32, DType.float32, 32, False](out32.unsafe_ptr(), x32.unsafe_ptr(), q.unsafe_ptr(),
                                                             scales.unsafe_ptr(), offsets.unsafe_ptr(), shape, ctx)
    total += out32[0]
    linear_int8_cpu[DType.bfloat16, DType.bfloat16, 32, False](out16.unsafe_ptr(), x16.unsafe_ptr(), q.unsafe_ptr(),
                                                               scales.unsafe_ptr(), offsets.unsafe_ptr(), shape, ctx)
    total += Float32(out16[0])
    # GGUF's layouts: exact decoding with float32 scales and offsets, and float16 k-major panels
    linear_int8_cpu[DType.bfloat16, DType.float32, 32, True](out32.unsafe_ptr(), x16.unsafe_ptr(), q.unsafe_ptr(),
                                                             scales32.unsafe_ptr(), offsets.unsafe_ptr(), shape, ctx)
    total += out32[0]
    linear_int8_cpu[DType.float32, DType.float32, 32, False](out32.unsafe_ptr(), x32.unsafe_ptr(), q.unsafe_ptr(),
                                                             scales32.unsafe_ptr(), offsets.unsafe_ptr(), shape, ctx)
    total += out32[0]
    linear_float_cpu[DType.bfloat16, DType.float32](out32.unsafe_ptr(), x16.unsafe_ptr(), w16.unsafe_ptr(), shape, ctx)
    total += out32[0]
    return total


def run_int4(rows: Int) raises -> Float32:
    """The 4-bit and 6-bit paths with x = 127 (activation scale 1, codes 127) and W = 1 (code 9 with zero point 8
    and scale 1; code 1 with scale 1 and offset 0, or Q4_K's scales 1 and mins 0; code 33 with zero point 32): each
    output is 127 * K (exact);
    returns the sum of their first and last outputs."""
    comptime K = 40
    comptime N = 20
    var ctx = DeviceContext(api="cpu")
    var shape = LinearShape(rows, K, N)
    var x = List[BFloat16](length=rows * K, fill=127)
    var groups = 2 * (int8_padded_k(K, 32) // 32) * 16
    var nine = List[UInt8](length=2 * int4_panel_bytes(K), fill=0x99)
    var one = List[UInt8](length=2 * int4_panel_bytes(K), fill=0x11)
    var scales = List[Float16](length=groups, fill=1)
    var offsets = List[Float16](length=groups, fill=0)
    var out = List[Float32](length=rows * N, fill=0)
    var total: Float32 = 0
    linear_int4_cpu[DType.bfloat16, DType.float32, False](out.unsafe_ptr(), x.unsafe_ptr(), nine.unsafe_ptr(),
                                                           scales.unsafe_ptr(), offsets.unsafe_ptr(), shape, ctx)
    total += out[0] + out[rows * N - 1]
    linear_int4_cpu[DType.bfloat16, DType.float32, True](out.unsafe_ptr(), x.unsafe_ptr(), one.unsafe_ptr(),
                                                          scales.unsafe_ptr(), offsets.unsafe_ptr(), shape, ctx)
    total += out[0] + out[rows * N - 1]
    # 6 bits: code 33 (nibble 1, high bits 2 in every field) with zero point 32, sub-scale 1 and block scale 1
    var high = List[UInt8](length=2 * int6_high_panel_bytes(K), fill=0xAA)
    var sub_scales = List[Int8](length=2 * (int8_padded_k(K, 32) // 16) * 16, fill=1)
    var block_scales = List[Float16](length=2 * int6_blocks(K) * 16, fill=1)
    linear_int6_cpu[DType.bfloat16, DType.float32](out.unsafe_ptr(), x.unsafe_ptr(), one.unsafe_ptr(),
                                                   high.unsafe_ptr(), sub_scales.unsafe_ptr(),
                                                   block_scales.unsafe_ptr(), shape, ctx)
    total += out[0] + out[rows * N - 1]
    # Q4_K's two levels: code 1, sub-scale 1, block scale 1, mins 0
    var k_scales = List[UInt8](length=groups, fill=1)
    var k_mins = List[UInt8](length=groups, fill=0)
    var k_blocks = List[Float16](length=2 * int6_blocks(K) * 16, fill=1)
    var k_block_mins = List[Float16](length=2 * int6_blocks(K) * 16, fill=0)
    linear_int4_k_cpu[DType.bfloat16, DType.float32](out.unsafe_ptr(), x.unsafe_ptr(), one.unsafe_ptr(),
                                                     k_scales.unsafe_ptr(), k_mins.unsafe_ptr(), k_blocks.unsafe_ptr(),
                                                     k_block_mins.unsafe_ptr(), shape, ctx)
    total += out[0] + out[rows * N - 1]
    return total


def main() raises:
    for rows in [1, 3, 40]:  # decode tiles, their row tail, the prefill path
        var total = run_all(rows)
        if total != 8 * 40:
            raise Error("rows=", rows, ": paths summed to ", total, ", expected 320")
        var int4_total = run_int4(rows)
        if int4_total != 8 * 127 * 40:
            raise Error("rows=", rows, ": 4- and 6-bit paths summed to ", int4_total, ", expected ", 8 * 127 * 40)
    print("linear paths agree")
