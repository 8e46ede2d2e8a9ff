"""MILI's linear op (bf16 and int8 packed weights) and the packed embedding gather vs float64 numpy, and the
batch-invariance guarantee: a row's output is bit-identical whatever M is and whichever path ran it.

The reference multiplies the activations as their dtype holds them by the weights the packed format holds
(PackedWeight.dense(): exact bf16 values, or q * scale), in float64; what is left is the kernel's float32
accumulation and the output's rounding, bounded element by element.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize
from max.driver import Buffer
from max.dtype import DType

from mili.dtypes import numpy_to_buffer, to_numpy_f32
from mili.gguf.repack import q4_k_parts
from mili.gguf.weights import pack_parts, tensor_layout
from mili.model.packed_linear import (PackedShape, PackedWeight, WeightFormat, int6_weight_scales, pack_grouped,
                                     pack_int4, pack_int4_k, pack_int6, pack_weight, unpack_int4_codes,
                                     unpack_int6_codes, unpack_k_major)
from tests.kernels import reference as ref
from tests.gguf_blocks import random_blocks
from tests.kernels.graphs import (DTYPES, EMBEDDING_CASES, INT4_K, INT4_OFFSETS, INT4_Q4_0, INT6,
                                  LINEAR_CASES, Q4_1_LIKE, Q4_K_LIKE, Q6_K_LIKE, layout, layout_name, linear_layouts)

# (M, K, N): M over both the decode tiles (< 16 rows, with their MR tails) and the prefill path; K and N not
# multiples of the SIMD width, of the 16-channel panel, of the bf16 pair or of the int8 group.
SHAPES = [(1, 37, 21), (2, 64, 16), (3, 100, 33), (17, 1024, 1000), (33, 129, 50), (200, 65, 7), (513, 300, 40),
          (5, 1, 1), (16, 31, 17), (0, 16, 16)]
FLOAT32_UNIT = 2.0 ** -24
BFLOAT16_UNIT = 2.0 ** -8


def grouped_weight(w: np.ndarray, shape: PackedShape) -> PackedWeight:
    """W in one of the layouts GGUF files repack into, quantised here (not by MILI's code): with offsets, 4-bit
    codes 0..15 from each group's minimum (as Q4_1 / Q4_K), else 6-bit codes -32..31 (as Q6_K); scales in the
    layout's dtype."""
    n, k = w.shape
    g = shape.group_size
    groups = np.pad(w, ((0, 0), (0, -k % g))).reshape(n, -1, g)
    if shape.offsets:
        low, high = groups.min(axis=2), groups.max(axis=2)
        scales, offsets, top, bottom = (high - low) / 15, low, 15, 0
    else:
        scales, offsets, top, bottom = np.abs(groups).max(axis=2) / 31, None, 31, -32
    scales = scales.astype(shape.scale_dtype.to_numpy()).astype(np.float32)
    centred = groups - (0 if offsets is None else offsets[:, :, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scales[:, :, None] > 0, np.rint(centred / scales[:, :, None]), 0)
    q = np.clip(q, bottom, top).astype(np.int8).reshape(n, -1)[:, :k]
    return pack_grouped(q, scales, None if offsets is None else offsets.astype(np.float32), g, shape.scale_dtype)


def int4_weight(w: np.ndarray, shape: PackedShape) -> PackedWeight:
    """W in a GGUF-like 4-bit layout, quantised here (not by MILI's code): with offsets, codes 0..15 from each
    group's minimum (as Q4_1 / Q4_K) with float32 scales and offsets; else codes q - 8 in -8..7 (as Q4_0)."""
    n, k = w.shape
    groups = np.pad(w, ((0, 0), (0, -k % 32))).reshape(n, -1, 32)
    if shape.offsets:
        offsets = groups.min(axis=2).astype(np.float32)
        scales = ((groups.max(axis=2) - offsets) / 15).astype(np.float32)
        centred, bias = groups - offsets[:, :, None], 0
    else:
        offsets = None
        scales = (np.abs(groups).max(axis=2) / 8).astype(np.float16).astype(np.float32)
        centred, bias = groups, 8
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scales[:, :, None] > 0, np.rint(centred / scales[:, :, None]), 0) + bias
    codes = np.clip(q, 0, 15).astype(np.uint8).reshape(n, -1)[:, :k]
    return pack_int4(codes, scales, offsets, shape.scale_dtype)


def int6_weight(w: np.ndarray) -> PackedWeight:
    """W in the 6-bit layout as GGUF's Q6_K stores it, quantised here: a float16 block scale per 256 inputs, an int8
    scale per 16 (of either sign), codes q in 0..63 with W ~ (q - 32) * block scale * scale."""
    n, k = w.shape
    padded = np.pad(w, ((0, 0), (0, -k % 256)))
    blocks = (np.abs(padded).reshape(n, -1, 256).max(axis=2) / (127 * 31)).astype(np.float16)
    block_per_16 = np.repeat(blocks.astype(np.float32), 16, axis=1)
    sub_max = np.abs(padded).reshape(n, -1, 16).max(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(block_per_16 > 0, np.rint(sub_max / (31 * block_per_16)), 0)
    scales = np.clip(scales, -128, 127).astype(np.int8) * np.where(np.arange(scales.shape[1]) % 3 == 1, -1, 1).astype(
        np.int8)  # some negative sub-scales, as Q6_K allows
    step = np.repeat(block_per_16 * scales.astype(np.float32), 16, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step != 0, np.rint(padded / step), 0) + 32
    codes = np.clip(q, 0, 63).astype(np.uint8)[:, :k]
    return pack_int6(codes, scales[:, :-(-k // 16)], blocks[:, :-(-k // 256)])


def check_low_bit_result(case, got: np.ndarray, x32: np.ndarray, expected: np.ndarray, magnitude: np.ndarray,
                         folds: int, weight_magnitude: np.ndarray, dense: np.ndarray) -> None:
    """A 4- or 6-bit op's output against its definition's float64 `expected`, within float32 rounding of its
    `folds` group folds (`magnitude`: the sum the rounding errors scale with); and against the unquantized
    product x @ dense^T within the activations' rounding: half a step of each group's scale per input, times
    `weight_magnitude` [N, K] (what each input's rounding is multiplied by)."""
    bound = 1.01 * (2 * folds + 8) * FLOAT32_UNIT * magnitude
    bound = bound + (BFLOAT16_UNIT if case.out_dtype == DType.bfloat16 else FLOAT32_UNIT) * (np.abs(expected) + bound)
    error = np.abs(got - expected)
    worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else None
    assert np.all(error <= bound), f"{case.name}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    _, xs, _ = ref.quantize_activations(x32)
    step = np.repeat(xs / 2, 32, axis=1)[:, :x32.shape[1]]  # [M, K]: each input's rounding bound
    unquantized_bound = step @ weight_magnitude.T + bound + 1e-6 * (np.abs(x32) @ np.abs(dense).T)
    assert np.all(np.abs(got - x32.astype(np.float64) @ dense.T) <= unquantized_bound), case.name


def check_int6_case(case, got: np.ndarray, x: np.ndarray, packed: PackedWeight) -> None:
    """The 6-bit op against its definition (int8 activations per 32 inputs) in float64, within float32 rounding
    of the half-group folds; and against the unquantized product within the activations' rounding."""
    s = packed.shape
    x32 = ref.as_dtype(x, case.x_dtype)
    codes = unpack_int6_codes(packed.arrays[0], packed.arrays[1], s.out_features, s.in_features)
    scale = int6_weight_scales(packed.arrays[2], packed.arrays[3], s.out_features, s.in_features).astype(np.float64)
    per_16 = scale.shape[1]
    expected, magnitude = ref.int6_linear(x32, codes, scale)
    dense = packed.dense().astype(np.float64)
    check_low_bit_result(case, got, x32, expected, magnitude, per_16, np.abs(dense), dense)


def int4_k_weight(rng: np.random.Generator, n: int, k: int) -> PackedWeight:
    """Random valid GGUF Q4_K blocks (tests/gguf_blocks.py) for K rounded up to 256, cut to [n, k]."""
    raw = random_blocks(GGML.Q4_K, n, -(-k // 256) * 256, rng)
    parts = q4_k_parts(raw, n, -(-k // 256) * 256)
    return pack_int4_k(parts.codes[:, :k], parts.scales[:, :-(-k // 32)], parts.mins[:, :-(-k // 32)],
                       parts.block_scales, parts.block_mins)


def int4_parts(packed: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes [N, K], scales [N, G], offsets [N, G]) of a 4-bit weight, float64; zero point 8 as offset -8 * scale,
    Q4_K's two levels as their float32 products."""
    s = packed.shape
    groups = -(-s.in_features // 32)
    codes = unpack_int4_codes(packed.arrays[0], s.out_features, s.in_features).astype(np.float64)
    if s.format is WeightFormat.INT4_K:
        blocks = -(-groups * 32 // 256)

        def product(values: np.ndarray, block_values: np.ndarray) -> np.ndarray:
            per_block = unpack_k_major(block_values, s.out_features, blocks).astype(np.float32)
            return (np.repeat(per_block, 8, axis=1)[:, :groups]
                    * unpack_k_major(values, s.out_features, groups).astype(np.float32)).astype(np.float64)

        return codes, product(packed.arrays[1], packed.arrays[3]), -product(packed.arrays[2], packed.arrays[4])
    scales = unpack_k_major(packed.arrays[1], s.out_features, groups).astype(np.float64)
    if s.offsets:
        return codes, scales, unpack_k_major(packed.arrays[2], s.out_features, groups).astype(np.float64)
    return codes, scales, -8 * scales


def check_int4_case(case, got: np.ndarray, x: np.ndarray, packed: PackedWeight) -> None:
    """The 4-bit op against its definition (int8 activations per 32 inputs, tests/kernels/reference.py) in float64,
    within float32 rounding of the group folds; and against the unquantized product within the activations'
    rounding (half a step of each group's scale per input, times |W|: the offsets meet the quantized activations)."""
    x32 = ref.as_dtype(x, case.x_dtype)
    codes, scales, offsets = int4_parts(packed)
    expected, magnitude = ref.int4_linear(x32, codes, scales, offsets)
    dense = packed.dense().astype(np.float64)
    check_low_bit_result(case, got, x32, expected, magnitude, scales.shape[1], np.abs(dense), dense)


def packed_weights(rng: np.random.Generator, n: int, k: int) -> dict[PackedShape, PackedWeight]:
    """One random [n, k] weight (channels of different magnitudes, a few exact zeros) in every packed layout."""
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 1, size=(n, 1)))
    w[rng.random((n, k)) < 0.01] = 0
    w = w.astype(np.float32)
    out = {}
    for shape in linear_layouts():
        symmetric_int8 = shape == PackedShape(WeightFormat.INT8, 1, 1, shape.group_size)
        if shape.format is WeightFormat.INT8 and not symmetric_int8:
            out[shape] = grouped_weight(w, shape)
        elif shape.format is WeightFormat.INT6:
            out[shape] = int6_weight(w)
        elif shape.format is WeightFormat.INT4_K:
            out[shape] = int4_k_weight(rng, n, k)
        elif shape.format is WeightFormat.INT4 and (shape.scale_dtype == DType.float32 or not shape.offsets):
            out[shape] = int4_weight(w, shape)  # GGUF's Q4_K and Q4_0; float16 offsets: --quantization int4
        else:
            out[shape] = pack_weight(w, shape.format, shape.group_size)
    return out


def run_linear(model, x: np.ndarray, n: int, weights: dict, ids: np.ndarray) -> list[np.ndarray]:
    buffers = [numpy_to_buffer(x, dtype) for dtype in DTYPES]
    buffers += [Buffer.from_numpy(np.zeros(n, np.int32)), Buffer.from_numpy(ids.astype(np.int32))]
    for shape in linear_layouts():
        buffers += list(weights[shape].buffers("w").values())
    return [o.to_numpy() if o.dtype in (DType.float32, DType.int32) else to_numpy_f32(o) for o in model.execute(*buffers)]


def exact_arithmetic(shape: PackedShape) -> bool:
    """Layouts whose weights the op decodes exactly and multiplies in one chain (linear.mojo's header): the float
    ones, bf16, and int8 with offsets or float32 scales (GGUF's Q4_1, Q5_1, K-quants)."""
    return shape.format is not WeightFormat.INT8 or shape.offsets or shape.scale_dtype == DType.float32


def chain_length(k: int, shape: PackedShape) -> int:
    """Roundings on any product's way into a float32 output: K for one chain of K FMAs; for int8 folded by group, a
    chain of at most G within the group plus one of ceil(K / G) across the groups (linear.mojo's header)."""
    return k if exact_arithmetic(shape) else min(k, shape.group_size) + -(-k // shape.group_size)


def error_bound(x64: np.ndarray, w64: np.ndarray, out_dtype: DType, chain: int) -> np.ndarray:
    """|kernel - exact| per element: float32 sums in which each product passes through at most `chain`
    roundings are off by at most chain * u * sum_k |x_k w_k| (u = 2^-24; 1.01 covers the higher-order terms);
    a bfloat16 output adds half an ulp of the result (u = 2^-8 relative)."""
    accumulation = 1.01 * chain * FLOAT32_UNIT * (np.abs(x64) @ np.abs(w64).T)
    if out_dtype == DType.bfloat16:
        return accumulation + BFLOAT16_UNIT * (np.abs(x64 @ w64.T) + accumulation)
    return accumulation + FLOAT32_UNIT * np.abs(x64 @ w64.T)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_linear_and_embedding_match_float64(linear_model, m, k, n, rng):
    x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, size=(m, 1)))  # rows of very different sizes
    weights = packed_weights(rng, n, k)
    ids = rng.integers(0, n, size=int(rng.integers(1, 9)))
    outputs = run_linear(linear_model, x, n, weights, ids)
    for case, got in zip(LINEAR_CASES, outputs, strict=False):
        x64 = ref.as_dtype(x, case.x_dtype).astype(np.float64)
        packed = weights[case.layout]
        assert got.shape == (m, n), case.name
        if case.layout.format in (WeightFormat.INT4, WeightFormat.INT4_K):
            check_int4_case(case, got, x, packed)
            continue
        if case.layout.format is WeightFormat.INT6:
            check_int6_case(case, got, x, packed)
            continue
        w64 = packed.dense().astype(np.float64)
        error = np.abs(got - x64 @ w64.T)
        bound = error_bound(x64, w64, case.out_dtype, chain_length(k, case.layout))
        worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else None
        assert np.all(error <= bound), f"{case.name}: error {error[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    for (shape, out_dtype), got in zip(EMBEDDING_CASES, outputs[len(LINEAR_CASES):], strict=False):
        expected = ref.as_dtype(weights[shape].dense()[ids], out_dtype)
        np.testing.assert_array_equal(got, expected, err_msg=f"embedding {layout_name(shape)} -> {out_dtype.name}")


def test_rows_are_bit_identical_whatever_the_batch(linear_model, rng):
    """Rows computed alone, in small batches (decode tiles and their tails) and in large ones (the prefill
    path) are the same bits, for every format and dtype."""
    k, n, total = 300, 70, 513
    x = rng.standard_normal((total, k))
    weights = packed_weights(rng, n, k)
    ids = np.zeros(1, np.int32)
    full = run_linear(linear_model, x, n, weights, ids)[:len(LINEAR_CASES)]
    compared = 0
    for size in (1, 2, 3, 5, 15, 16, 17, 33, 200):
        rows = rng.choice(total, size=size, replace=False)
        part = run_linear(linear_model, x[rows], n, weights, ids)[:len(LINEAR_CASES)]
        for case, whole, some in zip(LINEAR_CASES, full, part, strict=True):
            np.testing.assert_array_equal(some.view(np.uint32) if some.dtype == np.float32 else some,
                                          whole[rows].view(np.uint32) if whole.dtype == np.float32 else whole[rows],
                                          err_msg=f"{case.name}: rows {rows[:8]}... differ in a batch of {size}")
            compared += some.size
    print(f"compared {compared} outputs bit for bit")
    assert compared == sum((1, 2, 3, 5, 15, 16, 17, 33, 200)) * n * len(LINEAR_CASES)


@pytest.mark.parametrize("bad_id", [-1, 48])
def test_packed_embedding_rejects_ids_outside_the_packed_rows(linear_model, bad_id, rng):
    """40 rows pack into 3 panels = 48 rows (ids 40..47 read zero padding; ModelRunner refuses ids >= vocab)."""
    k, n = 32, 40
    weights = packed_weights(rng, n, k)
    with pytest.raises(Exception, match="outside the vocabulary"):
        run_linear(linear_model, rng.standard_normal((1, k)), n, weights, np.array([3, bad_id], np.int32))


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    return set(re.search(r"^flags\s*:(.*)$", text, re.MULTILINE).group(1).split())


def test_the_kernel_this_cpu_has_is_the_one_that_runs(linear_model, rng):
    """The CPU micro-kernel family compiled here matches /proc/cpuinfo: 512-bit vectors where AVX-512 is,
    vdpbf16ps for bfloat16 activations where AVX512_BF16 is (otherwise bf16 weights are decoded to float32)."""
    flags = cpu_flags()
    width = 16 if "avx512f" in flags else 8
    families = run_linear(linear_model, rng.standard_normal((1, 8)), 4, packed_weights(rng, 4, 8),
                          np.zeros(1, np.int32))[-len(DTYPES):]
    expected = {DType.float32: width * 10, DType.bfloat16: width * 10 + ("avx512_bf16" in flags)}
    got = {dtype: int(f[0]) for dtype, f in zip(DTYPES, families, strict=True)}
    print(f"kernel families: {got} (simd width {width}, avx512_bf16: {'avx512_bf16' in flags})")
    assert got == expected
    # the 4-bit ops' integer dot product: vpdpbusd with AVX512_VNNI, else pmaddubsw (AVX2 / AVX-512BW)
    dot = 2 if width == 16 and "avx512_vnni" in flags else (1 if {"avx2", "avx512bw"} & flags else 0)
    assert {int(f[1]) for f in families} == {width * 10 + dot}, f"4-bit kernel {families[0][1]}, expected dot {dot}"


# Each GGUF type, and the layout of the test graph it repacks into (mili/gguf/weights.py's tensor_layout), with
# float activations: 4-bit types then take the int8 layout.
GGUF_TYPE_LAYOUTS = {
    GGML.Q8_0: layout(WeightFormat.INT8), GGML.Q4_0: layout(WeightFormat.INT8), GGML.Q5_0: layout(WeightFormat.INT8),
    GGML.Q4_1: Q4_1_LIKE, GGML.Q5_1: Q4_1_LIKE, GGML.Q4_K: Q4_K_LIKE, GGML.Q5_K: Q4_K_LIKE, GGML.Q6_K: Q6_K_LIKE,
    GGML.F16: layout(WeightFormat.FLOAT16), GGML.F32: layout(WeightFormat.FLOAT32), GGML.BF16: layout(WeightFormat.BF16),
}
# ... and by default, where 4-bit types and Q6_K run as 4- and 6-bit codes with int8 activations
GGUF_4BIT_LAYOUTS = {GGML.Q4_0: INT4_Q4_0, GGML.Q4_1: INT4_OFFSETS, GGML.Q4_K: INT4_K, GGML.Q6_K: INT6}


@pytest.mark.parametrize("float_activations", [False, True])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_gguf_blocks_through_the_op_match_gguf_py(linear_model, m, float_activations, rng):
    """GGUF tensors of every type (valid random blocks, tests/gguf_blocks.py), repacked as a model load repacks
    them and multiplied by the op, against float64 numpy over gguf.quants.dequantize of the same bytes (4-bit
    layouts: the packed weights are gguf-py's bit for bit, and the op follows its int8-activation definition);
    the packed embedding returns gguf-py's values exactly."""
    k, n = 512, 37  # K: two super-blocks of 256; N: not a whole number of panels
    x = rng.standard_normal((m, k)) * np.exp(rng.uniform(-3, 3, size=(m, 1)))
    ids = rng.integers(0, n, size=5)
    compared = set()
    layouts = GGUF_TYPE_LAYOUTS if float_activations else GGUF_TYPE_LAYOUTS | GGUF_4BIT_LAYOUTS
    for gguf_type, shape in layouts.items():
        raw = random_blocks(gguf_type, n, k, rng)
        tensor = SimpleNamespace(name=gguf_type.name, tensor_type=gguf_type, data=raw, shape=[k, n])
        chosen = tensor_layout([gguf_type], n, k, float_activations=float_activations)
        packed = pack_parts([tensor], dataclasses.replace(chosen, out_features=n))
        assert dataclasses.replace(packed.shape, out_features=1, in_features=1) == shape, gguf_type.name
        reference = dequantize(raw, gguf_type).reshape(n, k).astype(np.float64)
        weights = packed_weights(rng, n, k) | {shape: packed}
        outputs = run_linear(linear_model, x, n, weights, ids)
        for case, got in zip(LINEAR_CASES, outputs, strict=False):
            if case.layout != shape:
                continue
            if shape.format in (WeightFormat.INT4, WeightFormat.INT4_K, WeightFormat.INT6):
                np.testing.assert_array_equal(packed.dense(), reference.astype(np.float32), err_msg=gguf_type.name)
                (check_int6_case if shape.format is WeightFormat.INT6 else check_int4_case)(case, got, x, packed)
                compared.add(gguf_type)
                continue
            x64 = ref.as_dtype(x, case.x_dtype).astype(np.float64)
            error = np.abs(got - x64 @ reference.T)
            bound = error_bound(x64, reference, case.out_dtype, chain_length(k, shape))
            assert np.all(error <= bound), f"{gguf_type.name} {case.name}: worst {np.max(error - bound):.3g} over"
            compared.add(gguf_type)
        for (embedding_shape, out_dtype), got in zip(EMBEDDING_CASES, outputs[len(LINEAR_CASES):], strict=False):
            if embedding_shape == shape:
                np.testing.assert_array_equal(got, ref.as_dtype(reference[ids].astype(np.float32), out_dtype),
                                              err_msg=f"{gguf_type.name} embedding -> {out_dtype.name}")
    assert compared == set(layouts)
