# Mojo unit tests of the CPU RMSNorm body (run by tests/kernels/test_mojo_unit.py via `mojo run`).
from std.testing import assert_almost_equal, TestSuite
from std.math import sqrt
from max.gpu.host import DeviceContext
from mojo_kernels.norm import rms_norm_cpu


def _check_rows(rows: Int, hidden: Int) raises:
    var x = List[Float32](length=rows * hidden, fill=0)
    var w = List[Float32](length=hidden, fill=0)
    var out = List[Float32](length=rows * hidden, fill=Float32.MAX)  # poisoned
    for i in range(rows * hidden):
        x[i] = Float32((i * 7919) % 23) / 5.0 - 2.0
    for j in range(hidden):
        w[j] = 0.25 + Float32(j % 11) / 7.0
    var eps: Float32 = 1e-6
    rms_norm_cpu[DType.float32](out.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), rows, hidden, eps,
                                DeviceContext(api="cpu"))
    for r in range(rows):
        var sum_sq: Float64 = 0
        for j in range(hidden):
            sum_sq += Float64(x[r * hidden + j]) * Float64(x[r * hidden + j])
        var inv = 1.0 / sqrt(sum_sq / Float64(hidden) + Float64(eps))
        for j in range(hidden):
            var expected = Float64(x[r * hidden + j]) * inv * Float64(w[j])
            assert_almost_equal(Float64(out[r * hidden + j]), expected, atol=1e-5, rtol=1e-5)


def test_tail_not_multiple_of_simd_width() raises:
    _check_rows(3, 37)


def test_more_rows_than_cores() raises:
    _check_rows(13, 100)


def test_rows_split_across_cores() raises:
    _check_rows(101, 1000)  # enough elements for several tasks on the context's CPU threads


def test_single_element_rows() raises:
    _check_rows(5, 1)


def main() raises:
    TestSuite.discover_tests[__functions_in_module()]().run()
