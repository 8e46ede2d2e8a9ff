"""The graph of kernel ops under test, built for any device.

CPU tests execute it; the virtual-GPU check compiles the very same graph for sm_90. Dims are symbolic
so one compile serves every size a test throws at it.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType

from mili.kernels import kernel_package
from mili.model import ops as mili_ops

SMALL_EPS = 1e-6
LARGE_EPS = 0.5  # big enough to change every output, so a dropped eps cannot pass unnoticed
DTYPES = (DType.float32, DType.bfloat16)


def build_kernel_graph(device: DeviceRef) -> Graph:
    """Inputs per dtype: x [rows, hidden], weight [hidden]. Outputs per dtype: rmsnorm with two eps."""
    input_types = []
    for dtype in DTYPES:
        input_types += [TensorType(dtype, ["rows", "hidden"], device), TensorType(dtype, ["hidden"], device)]
    with Graph("mili_kernel_tests", input_types=input_types, custom_extensions=[kernel_package()]) as graph:
        outputs = []
        for i in range(len(DTYPES)):
            x, weight = graph.inputs[2 * i].tensor, graph.inputs[2 * i + 1].tensor
            outputs += [mili_ops.rms_norm(x, weight, SMALL_EPS), mili_ops.rms_norm(x, weight, LARGE_EPS)]
        graph.output(*outputs)
    return graph
