"""Valid random GGUF tensor data for tests: `random_blocks(type, rows, cols, rng)` gives the bytes of a
[rows, cols] tensor as GGUFReader hands them over (uint8 [rows, bytes per row]).

The types gguf-py can quantize (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are quantized from random float32
weights whose magnitude varies by row, with some all-zero blocks (their d is +-0). Q8_0 also gets some -128 codes:
ggml's quantizer never writes them but the format holds them. The K-quants (Q4_K, Q5_K, Q6_K, which gguf-py can
only dequantize) are random bytes with their float16 d / dmin fields overwritten by finite values of realistic
magnitude (1e-4..1e-2), both signs (ggml writes d, dmin >= 0 for Q4_K/Q5_K, but the format holds either and
negative ones give the -0.0 weights worth covering), one in ten a float16 subnormal.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quantize

T = GGMLQuantizationType

QUANTIZABLE = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
FLOAT = (T.F32, T.F16, T.BF16)
# Byte offsets of the float16 d (and dmin) fields in one block.
K_QUANT_FLOAT16_FIELDS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_weights(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [rows, cols]: normal values scaled per row by 1e-3..1, with about 5% of the 32-blocks zero."""
    w = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(np.log(1e-3), 0, size=(rows, 1)))
    blocks = w.reshape(rows, -1, 32) if cols % 32 == 0 else w.reshape(rows, 1, cols)
    blocks[rng.random(blocks.shape[:2]) < 0.05] = 0
    return w.astype(np.float32)


def random_float16(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Finite float16 of either sign: magnitudes log-uniform in 1e-4..1e-2, or (one in ten) subnormal."""
    values = np.exp(rng.uniform(np.log(1e-4), np.log(1e-2), size=shape)).astype(np.float16)
    subnormal = (rng.integers(1, 1024, size=shape, dtype=np.uint16)).view(np.float16)
    values = np.where(rng.random(shape) < 0.1, subnormal, values)
    return np.where(rng.random(shape) < 0.5, -values, values).astype(np.float16)


def _k_quant(tensor_type: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for start in K_QUANT_FLOAT16_FIELDS[tensor_type]:
        blocks[:, :, start:start + 2] = random_float16((rows, cols // block_size, 1), rng).view(np.uint8)
    return blocks.reshape(rows, -1)


def random_blocks(tensor_type: GGMLQuantizationType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """The bytes of a valid random [rows, cols] tensor of `tensor_type`: uint8 [rows, bytes per row]."""
    if tensor_type in K_QUANT_FLOAT16_FIELDS:
        return _k_quant(tensor_type, rows, cols, rng)
    if tensor_type not in QUANTIZABLE + FLOAT:
        raise ValueError(f"no random blocks for {tensor_type.name}")
    raw = quantize(random_weights(rows, cols, rng), tensor_type).view(np.uint8).reshape(rows, -1)
    if tensor_type == T.Q8_0:
        codes = raw.reshape(rows, -1, 34)[:, :, 2:]
        codes[rng.random(codes.shape) < 0.01] = 0x80  # int8 -128
    return raw
