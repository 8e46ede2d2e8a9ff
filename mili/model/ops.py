"""Graph-building wrappers for MILI's Mojo custom ops.

Each function adds one op to the graph being built and returns its output value(s), so model code
reads like ordinary tensor code. The graph must list `mili.kernels.kernel_package()` in its
`custom_extensions`.
"""

from __future__ import annotations

from max.graph import TensorType, TensorValue, ops


def rms_norm(x: TensorValue, weight: TensorValue, eps: float) -> TensorValue:
    """RMSNorm over the last axis of `x` [rows, hidden], scaled by `weight` [hidden] (Qwen3RMSNorm)."""
    return ops.custom(
        "mili_rms_norm",
        x.device,
        [x, weight],
        out_types=[TensorType(x.dtype, x.shape, x.device)],
        parameters={"eps": eps},
    )[0].tensor
