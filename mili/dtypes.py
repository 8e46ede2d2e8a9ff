"""Run dtypes and the host-side conversions between checkpoint and run dtypes.

numpy has no bfloat16, so bfloat16 data lives in numpy as its raw uint16 bit patterns and becomes a
typed MAX Buffer through `Buffer.view`. The conversions are exact bit manipulations (bf16 -> f32 is a
shift; f32 -> bf16 rounds to nearest even, as torch does) and run at numpy speed, with no graph compile.
"""

from __future__ import annotations

import numpy as np
from max.driver import Buffer
from max.dtype import DType

RUN_DTYPES: dict[str, DType] = {"float32": DType.float32, "bfloat16": DType.bfloat16}
AUTO = "auto"
DTYPE_CHOICES = (AUTO, *RUN_DTYPES)  # what --dtype and the `dtype=` engine argument accept
# `auto` on CPU runs a checkpoint in the dtype it was saved in: bfloat16 weights are packed for MILI's own
# linear op and read half float32's bytes. float16 is no run dtype; bfloat16 is as small and covers its range.
# A config.json that names no dtype (old tiny checkpoints) runs in float32: exact, whatever the file holds.
_AUTO_CPU: dict[str | None, DType] = {"bfloat16": DType.bfloat16, "float16": DType.bfloat16,
                                      "float32": DType.float32, None: DType.float32}


def parse_run_dtype(name: str) -> DType:
    """`"float32"`/`"bfloat16"` (also `fp32`, `bf16`) -> DType; anything else is a ValueError naming the choices."""
    aliases = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}
    key = aliases.get(name.lower(), name.lower())
    if key not in RUN_DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: choose float32 or bfloat16")
    return RUN_DTYPES[key]


def resolve_run_dtype(requested: DType | str | None, *, checkpoint_dtype: str | None, device: str) -> DType:
    """The run dtype (activations and KV cache) for `requested`: a DType, a name for parse_run_dtype, or
    `auto`/None: bfloat16 on GPU; on CPU the checkpoint's own dtype (`ModelConfig.checkpoint_dtype`, see
    _AUTO_CPU). The one place this choice is made, for the runner, the KV sizing and the server alike."""
    if isinstance(requested, DType):
        return requested
    if requested is not None and requested.lower() != AUTO:
        return parse_run_dtype(requested)
    if device != "cpu":
        return DType.bfloat16
    return _AUTO_CPU[checkpoint_dtype]


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def to_numpy_f32(buffer: Buffer) -> np.ndarray:
    """A float32 numpy copy of a host Buffer of any float run/checkpoint dtype (for tests and tools)."""
    if buffer.dtype == DType.bfloat16:
        return bf16_bits_to_f32(buffer.view(DType.uint16).to_numpy())
    return buffer.to_numpy().astype(np.float32)


def numpy_to_buffer(values: np.ndarray, dtype: DType) -> Buffer:
    """A host Buffer of `dtype` (float32 or bfloat16) holding `values`."""
    if dtype == DType.bfloat16:
        return Buffer.from_numpy(f32_to_bf16_bits(values)).view(DType.bfloat16)
    if dtype == DType.float32:
        return Buffer.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    raise ValueError(f"unsupported run dtype {dtype}")


def convert_buffer(buffer: Buffer, dtype: DType) -> Buffer:
    """`buffer` as `dtype`; the same Buffer (no copy) when it already is, one new Buffer otherwise."""
    if buffer.dtype == dtype:
        return buffer
    if buffer.dtype == DType.bfloat16:
        as_f32 = bf16_bits_to_f32(buffer.view(DType.uint16).to_numpy())
    elif buffer.dtype in (DType.float16, DType.float32, DType.float64):
        as_f32 = buffer.to_numpy().astype(np.float32, copy=False)
    else:
        raise ValueError(f"cannot convert {buffer.dtype} weights to {dtype}")
    return numpy_to_buffer(as_f32, dtype)
