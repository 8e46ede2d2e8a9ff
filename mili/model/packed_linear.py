"""Linear-layer weights packed once at load time for MILI's own linear op, and the graph calls that use them.

    packed = pack_weight(w, WeightFormat.INT8)      # w: float32 [out, in], Hugging Face orientation
    registry |= packed.buffers("layers.0.qkv_proj")
    y = linear(x, packed_values(...), ...)          # inside a graph

The layouts are the contract with mojo_kernels/linear.mojo (its header has the index formulas):
- bf16: panels of 16 output channels, each one 64-byte row per pair of inputs (two bf16 of one channel per
  32-bit lane), [panels, ceil(K/2) * 32] bfloat16;
- int8: one scale per output channel per group of `group_size` inputs, q [panels, Kg * 16] int8 (k-major inside
  a panel), scales [panels, Kg / group_size * 16] float16 or float32; `--quantization int8` makes symmetric ones
  (q in [-127, 127], float16 scales). GGUF's quantized types repack into it exactly (mili/gguf/repack.py), those
  with a minimum (Q4_1, Q5_1, Q4_K, Q5_K) with float32 offsets beside the scales: W = q * scale + offset;
- int4: 4-bit codes two to a byte, [panels, Kg * 8] uint8 (Kg: K rounded up to 32), in 64-byte blocks of 8 inputs
  x 16 channels (channel j's bytes 4j..4j+3 hold inputs i and i + 4 of the block in their low and high nibbles),
  with a float16 or float32 scale per channel per 32 inputs and either offsets beside them (W = q * scale +
  offset, q 0..15: GGUF's Q4_1 and Q4_K, `--quantization int4`) or zero point 8 (W = (q - 8) * scale: Q4_0);
  the op quantizes activations to int8 per row per 32 inputs (mojo_kernels/linear_int4.mojo);
- int4_k (GGUF's Q4_K as stored): int4's codes with two levels of scales, 6-bit scales and mins [panels, Kg / 32 *
  16] uint8 and float16 block scales and mins per 256 inputs: W = q * (block scale * scale) - block min * min
  (4.5 bits a weight against int4's 6 with float32 scales and offsets), activations quantized as int4's;
- int6 (GGUF's Q6_K): 6-bit codes as a nibble plane laid out as int4's codes and a plane of their top 2 bits,
  [panels, Kg * 4] uint8 (per pair of blocks of 8 inputs a 64-byte vector, byte 4j + i holding the top bits of
  the even block's codes i and 4 + i in bits 0-1 and 2-3, the odd block's in 4-5 and 6-7), an int8 scale per
  channel per 16 inputs and a float16 block scale per 256: W = (q - 32) * (block scale * scale), activations
  quantized as int4's;
- float16 / float32: k-major panels of the values themselves, [panels, K * 16] (GGUF's F16 and F32 tensors);
- parts: a fused weight whose row ranges keep layouts of their own (a GGUF Q4_K_M file's q and k in Q4_K beside v
  in Q6_K), each range's arrays under ".<i>" + its own suffixes; one op per part, outputs joined along N.
Padding (channels past N, inputs past K) is zero. numpy has no bfloat16, so bf16 data travels as uint16 bits.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from max.driver import Buffer
from max.dtype import DType
from max.graph import DimLike, TensorType, TensorValue, ops

from mili.dtypes import bf16_bits_to_f32, f32_to_bf16_bits

PANEL = 16
DEFAULT_GROUP_SIZE = 32  # a GGUF Q8_0 block: 32 weights, one float16 scale
INT4_GROUP = 32  # the 4-bit layout's inputs per scale (and the op's activation group)
INT4_ZERO_POINT = 8  # 4-bit codes without offsets: W = (q - 8) * scale
INT4_MAX = 15
INT6_SUBGROUP = 16  # the 6-bit layout's inputs per int8 scale
INT6_BLOCK = 256  # ... and per float16 block scale
INT6_ZERO_POINT = 32
INT8_MAX = 127
_PACK_CHUNK_CHANNELS = 8192  # pack this many output channels at a time, so temporaries stay small


class WeightFormat(enum.Enum):
    """How a model's projection weights are stored and multiplied."""

    DENSE = "dense"  # the run dtype, [out, in] or [in, out], through MAX's ops.matmul
    BF16 = "bf16"  # bf16 panels, MILI's linear op
    INT8 = "int8"  # int8 weight-only with group scales (and offsets), MILI's linear op
    INT4 = "int4"  # 4-bit codes with group scales and offsets (or zero point 8), MILI's linear op
    INT4_K = "int4_k"  # 4-bit codes with GGUF Q4_K's two-level scales and mins, MILI's linear op
    INT6 = "int6"  # 6-bit codes with int8 sub-scales and float16 block scales (GGUF's Q6_K), MILI's linear op
    FLOAT16 = "float16"  # float16 k-major panels, MILI's linear op (GGUF F16 tensors)
    FLOAT32 = "float32"  # float32 k-major panels, MILI's linear op (GGUF F32 tensors)
    PARTS = "parts"  # row ranges of one fused weight, each packed in a layout of its own (GGUF's mixed files)
    GGUF = "gguf"  # a model's format only: each tensor as its GGUF file stores it (one of the above)

    @property
    def packed(self) -> bool:
        return self is not WeightFormat.DENSE

    @property
    def float_dtype(self) -> DType:
        """The element dtype of a k-major float format."""
        return {WeightFormat.FLOAT16: DType.float16, WeightFormat.FLOAT32: DType.float32}[self]


def panels(out_features: int) -> int:
    return -(-out_features // PANEL)


def padded_k(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


@dataclass(frozen=True)
class PackedShape:
    """The graph-side arrays of one packed weight: (suffix, dtype, shape) per array."""

    format: WeightFormat
    out_features: int
    in_features: int
    group_size: int = DEFAULT_GROUP_SIZE
    scale_dtype: DType = DType.float16  # int8 / int4: the scales' (and int4 offsets') dtype: float16 or float32
    offsets: bool = False  # int8 / int4: W = q * scale + offset (int4 without: W = (q - 8) * scale)
    parts: tuple[PackedShape, ...] = ()  # PARTS: the row ranges' layouts, in output order

    def __post_init__(self) -> None:
        if (self.format is WeightFormat.PARTS) != bool(self.parts):
            raise ValueError("parts go with WeightFormat.PARTS, and only with it")
        if self.parts and (sum(p.out_features for p in self.parts) != self.out_features
                           or any(p.in_features != self.in_features or p.parts for p in self.parts)):
            raise ValueError(f"parts {self.parts} do not make a [{self.out_features}, {self.in_features}] weight")
        if self.format in (WeightFormat.INT4, WeightFormat.INT4_K) and self.group_size != INT4_GROUP:
            raise ValueError(f"4-bit weights are in groups of {INT4_GROUP}, not {self.group_size}")
        if self.format is WeightFormat.INT6 and self.group_size != INT6_SUBGROUP:
            raise ValueError(f"6-bit weights are in groups of {INT6_SUBGROUP}, not {self.group_size}")

    def leaves(self) -> tuple[PackedShape, ...]:
        """The layouts ops run: the parts', or this one."""
        return self.parts or (self,)

    def part_arrays(self) -> list[tuple[PackedShape, slice]]:
        """Each part's layout with the slice of arrays() (and of a weight's arrays) that is its own."""
        out, at = [], 0
        for part in self.parts:
            count = len(part.arrays())
            out.append((part, slice(at, at + count)))
            at += count
        return out

    def arrays(self) -> list[tuple[str, DType, tuple[int, int]]]:
        if self.format is WeightFormat.PARTS:
            return [(f".{i}{suffix}", dtype, shape) for i, part in enumerate(self.parts)
                    for suffix, dtype, shape in part.arrays()]
        p, k = panels(self.out_features), self.in_features
        if self.format is WeightFormat.BF16:
            return [("", DType.bfloat16, (p, -(-k // 2) * 2 * PANEL))]
        if self.format is WeightFormat.INT8:
            kg = padded_k(k, self.group_size)
            groups = (p, kg // self.group_size * PANEL)
            offsets = [(".offsets", DType.float32, groups)] if self.offsets else []
            return [(".q", DType.int8, (p, kg * PANEL)), (".scales", self.scale_dtype, groups), *offsets]
        if self.format is WeightFormat.INT4:
            kg = padded_k(k, INT4_GROUP)
            groups = (p, kg // INT4_GROUP * PANEL)
            offsets = [(".offsets", self.scale_dtype, groups)] if self.offsets else []
            return [(".codes", DType.uint8, (p, kg // 2 * PANEL)), (".scales", self.scale_dtype, groups), *offsets]
        if self.format is WeightFormat.INT4_K:
            kg = padded_k(k, INT4_GROUP)
            groups, blocks = (p, kg // INT4_GROUP * PANEL), (p, -(-kg // INT6_BLOCK) * PANEL)
            return [(".codes", DType.uint8, (p, kg // 2 * PANEL)), (".scales", DType.uint8, groups),
                    (".mins", DType.uint8, groups), (".block_scales", DType.float16, blocks),
                    (".block_mins", DType.float16, blocks)]
        if self.format is WeightFormat.INT6:
            kg = padded_k(k, INT4_GROUP)
            return [(".codes", DType.uint8, (p, kg // 2 * PANEL)), (".high", DType.uint8, (p, kg // 4 * PANEL)),
                    (".scales", DType.int8, (p, kg // INT6_SUBGROUP * PANEL)),
                    (".block_scales", DType.float16, (p, -(-kg // INT6_BLOCK) * PANEL))]
        if self.format in (WeightFormat.FLOAT16, WeightFormat.FLOAT32):
            return [("", self.format.float_dtype, (p, k * PANEL))]
        raise ValueError(f"{self.format.value} weights are not packed tensors")

    @property
    def stored_bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.out_features * self.in_features)

    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * dtype.size_in_bytes for _, dtype, shape in self.arrays())


def _padded(weight: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if weight.shape == (rows, cols):
        return weight
    out = np.zeros((rows, cols), weight.dtype)
    out[:weight.shape[0], :weight.shape[1]] = weight
    return out


def pack_bf16(weight: np.ndarray) -> np.ndarray:
    """[N, K] float32 (rounded to bf16, nearest even) or uint16 bf16 bits -> [panels, ceil(K/2) * 32] uint16."""
    n, k = weight.shape
    pairs = -(-k // 2)
    out = np.empty((panels(n), pairs * 2 * PANEL), np.uint16)
    for start in range(0, n, _PACK_CHUNK_CHANNELS):
        chunk = weight[start:start + _PACK_CHUNK_CHANNELS]
        bits = chunk if chunk.dtype == np.uint16 else f32_to_bf16_bits(chunk)
        p = panels(len(bits))
        tiles = _padded(bits, p * PANEL, pairs * 2).reshape(p, PANEL, pairs, 2)
        out[start // PANEL:start // PANEL + p] = tiles.transpose(0, 2, 1, 3).reshape(p, pairs * 2 * PANEL)
    return out


def unpack_bf16(packed: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """The float32 [N, K] matrix a bf16-packed weight holds (exact)."""
    p, cols = packed.shape
    pairs = cols // (2 * PANEL)
    tiles = bf16_bits_to_f32(packed).reshape(p, pairs, PANEL, 2).transpose(0, 2, 1, 3).reshape(p * PANEL, pairs * 2)
    return np.ascontiguousarray(tiles[:out_features, :in_features])


def _float16_at_least(values: np.ndarray) -> np.ndarray:
    """float16 scales rounded up, never down: then max|w| / scale <= 127 and no weight is clipped, so every
    weight is within half a step (a scale rounded to nearest could lose up to 1% where it is a float16
    subnormal, below 6.1e-5, and clip the group's largest weights by more than a step)."""
    rounded = values.astype(np.float16)
    low = rounded.astype(np.float32) < values
    rounded[low] = np.nextafter(rounded[low], np.float16(np.inf))
    return rounded


def pack_k_major(values: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """[N, C] -> [panels, C * 16]: C values of each of a panel's 16 channels, interleaved channel-fastest
    (the int8 codes' and float panels' layout; with C = groups, the scales' and offsets')."""
    values = np.asarray(values, dtype) if dtype is not None else np.asarray(values)
    n, cols = values.shape
    out = np.empty((panels(n), cols * PANEL), values.dtype)
    for start in range(0, n, _PACK_CHUNK_CHANNELS):
        chunk = values[start:start + _PACK_CHUNK_CHANNELS]
        p = panels(len(chunk))
        tiles = _padded(chunk, p * PANEL, cols).reshape(p, PANEL, cols)
        out[start // PANEL:start // PANEL + p] = tiles.transpose(0, 2, 1).reshape(p, cols * PANEL)
    return out


def unpack_k_major(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The [rows, cols] values pack_k_major packed."""
    p = packed.shape[0]
    full = packed.reshape(p, packed.shape[1] // PANEL, PANEL).transpose(0, 2, 1).reshape(p * PANEL, -1)
    return np.ascontiguousarray(full[:rows, :cols])


def quantize_int8(weight: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float32 -> (q [panels, Kg * 16] int8, scales [panels, Kg / G * 16] float16), symmetric per
    (channel, group): scale = max|w| / 127 rounded up to a float16, q = rint(w / scale) in [-127, 127]; an all-zero
    group has scale 0 and q 0."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    n, k = weight.shape
    kg = padded_k(k, group_size)
    groups = kg // group_size
    q_out = np.empty((panels(n), kg * PANEL), np.int8)
    s_out = np.empty((panels(n), groups * PANEL), np.float16)
    for start in range(0, n, _PACK_CHUNK_CHANNELS):
        chunk = np.asarray(weight[start:start + _PACK_CHUNK_CHANNELS], np.float32)
        p = panels(len(chunk))
        w = _padded(chunk, p * PANEL, kg).reshape(p * PANEL, groups, group_size)
        scales = _float16_at_least(np.abs(w).max(axis=2) / INT8_MAX)
        exact = scales.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(exact > 0, np.rint(w / exact), 0)
        q = np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8).reshape(p, PANEL, kg)
        q_out[start // PANEL:start // PANEL + p] = q.transpose(0, 2, 1).reshape(p, kg * PANEL)
        s_out[start // PANEL:start // PANEL + p] = scales.reshape(p, PANEL, groups).transpose(0, 2, 1).reshape(
            p, groups * PANEL)
    return q_out, s_out


def dequantize_int8(q: np.ndarray, scales: np.ndarray, out_features: int, in_features: int,
                    group_size: int = DEFAULT_GROUP_SIZE, offsets: np.ndarray | None = None) -> np.ndarray:
    """The float32 [N, K] matrix an int8-packed weight holds: q * scale (+ offset), each step rounded to float32
    as the op's weights are."""
    p = q.shape[0]
    kg = q.shape[1] // PANEL
    groups = kg // group_size
    qs = q.reshape(p, kg, PANEL).transpose(0, 2, 1).reshape(p * PANEL, groups, group_size).astype(np.float32)
    s = scales.reshape(p, groups, PANEL).transpose(0, 2, 1).reshape(p * PANEL, groups, 1).astype(np.float32)
    w = qs * s
    if offsets is not None:
        w = w + offsets.reshape(p, groups, PANEL).transpose(0, 2, 1).reshape(p * PANEL, groups, 1)
    return np.ascontiguousarray(w.reshape(p * PANEL, kg)[:out_features, :in_features])


@dataclass(frozen=True)
class PackedWeight:
    """One packed weight: its shape description and its arrays (numpy), in PackedShape.arrays() order."""

    shape: PackedShape
    arrays: tuple[np.ndarray, ...]

    def buffers(self, name: str) -> dict[str, Buffer]:
        """The weights-registry entries for graph weight `name`."""
        out = {}
        for (suffix, dtype, _), array in zip(self.shape.arrays(), self.arrays, strict=True):
            buffer = Buffer.from_numpy(array)
            out[name + suffix] = buffer.view(DType.bfloat16) if dtype == DType.bfloat16 else buffer
        return out

    def split(self) -> list[PackedWeight]:
        """A PARTS weight's parts, each with its arrays."""
        return [PackedWeight(part, self.arrays[own]) for part, own in self.shape.part_arrays()]

    def dense(self) -> np.ndarray:
        """The float32 [N, K] matrix this weight holds (tests, references)."""
        s = self.shape
        if s.format is WeightFormat.PARTS:
            return np.concatenate([part.dense() for part in self.split()])
        if s.format is WeightFormat.BF16:
            return unpack_bf16(self.arrays[0], s.out_features, s.in_features)
        if s.format is WeightFormat.INT8:
            q, scales, *offsets = self.arrays
            return dequantize_int8(q, scales, s.out_features, s.in_features, s.group_size,
                                   offsets[0] if offsets else None)
        if s.format is WeightFormat.INT4:
            codes, scales, *offsets = self.arrays
            return dequantize_int4(codes, scales, offsets[0] if offsets else None, s.out_features, s.in_features)
        if s.format is WeightFormat.INT6:
            return dequantize_int6(*self.arrays, s.out_features, s.in_features)
        if s.format is WeightFormat.INT4_K:
            return dequantize_int4_k(*self.arrays, s.out_features, s.in_features)
        return unpack_k_major(self.arrays[0], s.out_features, s.in_features).astype(np.float32)


def pack_weight(weight: np.ndarray, fmt: WeightFormat, group_size: int = DEFAULT_GROUP_SIZE) -> PackedWeight:
    """Packs a [out, in] weight (float32, or bf16 bits as uint16 for bf16) into `fmt`."""
    shape = PackedShape(fmt, weight.shape[0], weight.shape[1], group_size)
    if fmt is WeightFormat.BF16:
        return PackedWeight(shape, (pack_bf16(weight),))
    as_f32 = bf16_bits_to_f32(weight) if weight.dtype == np.uint16 else weight
    if fmt is WeightFormat.INT8:
        return PackedWeight(shape, quantize_int8(as_f32, group_size))
    if fmt is WeightFormat.INT4:
        return quantize_int4(as_f32)
    if fmt in (WeightFormat.FLOAT16, WeightFormat.FLOAT32):
        return pack_float(as_f32.astype(fmt.float_dtype.to_numpy()), fmt)
    raise ValueError(f"{fmt.value} weights are not packed by pack_weight")


def pack_grouped(q: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, group_size: int,
                 scale_dtype: DType = DType.float32) -> PackedWeight:
    """Int8 codes q [N, K] with per-group scales [N, ceil(K / G)] (and offsets) -> the int8 panel layout, values
    unchanged: scales must be exact in `scale_dtype` (GGUF's repacked tensors: mili/gguf/repack.py)."""
    n, k = q.shape
    groups = -(-k // group_size)
    if scales.shape != (n, groups) or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError(f"codes [{n}, {k}] need scales (and offsets) of shape [{n}, {groups}] for groups of "
                         f"{group_size}, got {list(scales.shape)}")
    stored = scales.astype(scale_dtype.to_numpy())
    if not np.array_equal(stored.astype(np.float32), scales.astype(np.float32)):
        raise ValueError(f"scales are not exact in {scale_dtype}")
    shape = PackedShape(WeightFormat.INT8, n, k, group_size, scale_dtype, offsets is not None)
    codes = _padded(np.asarray(q, np.int8), n, groups * group_size)  # inputs past K: code 0, never read
    arrays = [pack_k_major(codes), pack_k_major(stored)]
    if offsets is not None:
        arrays.append(pack_k_major(offsets, np.float32))
    return PackedWeight(shape, tuple(arrays))


def _float16_at_most(values: np.ndarray) -> np.ndarray:
    """float16 values rounded down, never up (the int4 offsets: then no weight lies below its group's offset)."""
    rounded = values.astype(np.float16)
    high = rounded.astype(np.float32) > values
    rounded[high] = np.nextafter(rounded[high], np.float16(-np.inf))
    return rounded


def pack_int4_codes(codes: np.ndarray) -> np.ndarray:
    """[N, K] uint8 codes 0..15 -> [panels, Kg * 8] uint8 (Kg = K rounded up to 32; padding codes are 0): per panel,
    per block of 8 inputs, channel j's bytes 4j + i = code(k = 8b + i) | code(k = 8b + 4 + i) << 4."""
    n, k = codes.shape
    kg = padded_k(k, INT4_GROUP)
    out = np.empty((panels(n), kg // 2 * PANEL), np.uint8)
    for start in range(0, n, _PACK_CHUNK_CHANNELS):
        chunk = np.asarray(codes[start:start + _PACK_CHUNK_CHANNELS], np.uint8)
        p = panels(len(chunk))
        halves = _padded(chunk, p * PANEL, kg).reshape(p, PANEL, kg // 8, 2, 4)
        packed = halves[:, :, :, 0, :] | (halves[:, :, :, 1, :] << 4)
        out[start // PANEL:start // PANEL + p] = packed.transpose(0, 2, 1, 3).reshape(p, kg // 2 * PANEL)
    return out


def unpack_int4_codes(packed: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """The [N, K] uint8 codes pack_int4_codes packed."""
    p = packed.shape[0]
    kg = packed.shape[1] * 2 // PANEL
    blocks = packed.reshape(p, kg // 8, PANEL, 4).transpose(0, 2, 1, 3)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=3).reshape(p * PANEL, kg)
    return np.ascontiguousarray(codes[:out_features, :in_features])


def dequantize_int4(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, out_features: int,
                    in_features: int) -> np.ndarray:
    """The float32 [N, K] matrix a 4-bit weight holds: (q - 8) * scale, or q * scale + offset (each step rounded
    to float32, as gguf-py dequantizes Q4_0 / Q4_1 / Q4_K)."""
    q = unpack_int4_codes(codes, out_features, in_features).astype(np.float32)
    groups = -(-in_features // INT4_GROUP)

    def per_weight(values: np.ndarray) -> np.ndarray:
        grouped = unpack_k_major(values, out_features, groups).astype(np.float32)
        return np.repeat(grouped, INT4_GROUP, axis=1)[:, :in_features]

    if offsets is None:
        return (q - INT4_ZERO_POINT) * per_weight(scales)
    return q * per_weight(scales) + per_weight(offsets)


def pack_int4(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
              scale_dtype: DType = DType.float16) -> PackedWeight:
    """4-bit codes [N, K] (0..15) with per-32-input scales [N, ceil(K / 32)] and offsets (None: zero point 8)
    -> the 4-bit layout, values unchanged: scales and offsets must be exact in `scale_dtype`."""
    n, k = codes.shape
    groups = -(-k // INT4_GROUP)
    if scales.shape != (n, groups) or (offsets is not None and offsets.shape != scales.shape):
        raise ValueError(f"codes [{n}, {k}] need scales (and offsets) of shape [{n}, {groups}], "
                         f"got {list(scales.shape)}")
    if codes.size and int(codes.max()) > INT4_MAX:
        raise ValueError(f"4-bit codes must be 0..{INT4_MAX}, got {int(codes.max())}")
    numpy_dtype = scale_dtype.to_numpy()
    stored = []
    for name, values in (("scales", scales), ("offsets", offsets)):
        if values is None:
            continue
        cast = values.astype(numpy_dtype)
        if not np.array_equal(cast.astype(np.float32), values.astype(np.float32)):
            raise ValueError(f"{name} are not exact in {scale_dtype}")
        stored.append(pack_k_major(cast))
    shape = PackedShape(WeightFormat.INT4, n, k, INT4_GROUP, scale_dtype, offsets is not None)
    return PackedWeight(shape, (pack_int4_codes(codes), *stored))


def quantize_int4(weight: np.ndarray) -> PackedWeight:
    """[N, K] float32 -> `--quantization int4`: per (channel, 32 inputs), offset = the group's minimum rounded
    down to a float16, scale = (maximum - offset) / 15 rounded up to a float16, q = rint((w - offset) / scale)
    in 0..15; W = q * scale + offset (5.0 bits a weight: 4-bit codes, two float16 per 32)."""
    n, k = weight.shape
    groups = -(-k // INT4_GROUP)
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, groups), np.float16)
    offsets = np.empty((n, groups), np.float16)
    for start in range(0, n, _PACK_CHUNK_CHANNELS):
        chunk = np.asarray(weight[start:start + _PACK_CHUNK_CHANNELS], np.float32)
        rows = len(chunk)
        # padding repeats each row's last value, so it neither widens a group's range nor is ever read
        w = np.pad(chunk, ((0, 0), (0, groups * INT4_GROUP - k)), mode="edge").reshape(rows, groups, INT4_GROUP)
        low = _float16_at_most(w.min(axis=2))
        scale = _float16_at_least((w.max(axis=2) - low.astype(np.float32)) / INT4_MAX)
        exact = scale.astype(np.float32)[:, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(exact > 0, np.rint((w - low.astype(np.float32)[:, :, None]) / exact), 0)
        codes[start:start + rows] = np.clip(q, 0, INT4_MAX).astype(np.uint8).reshape(rows, -1)[:, :k]
        scales[start:start + rows] = scale
        offsets[start:start + rows] = low
    return pack_int4(codes, scales, offsets, DType.float16)


def pack_int6(codes: np.ndarray, scales: np.ndarray, block_scales: np.ndarray) -> PackedWeight:
    """6-bit codes [N, K] (0..63) with int8 scales [N, ceil(K / 16)] and float16 block scales [N, ceil(K / 256)]
    -> the 6-bit layout (GGUF's Q6_K as stored): W = (q - 32) * (block scale * scale)."""
    n, k = codes.shape
    kg = padded_k(k, INT4_GROUP)
    if scales.shape != (n, -(-k // INT6_SUBGROUP)) or block_scales.shape != (n, -(-k // INT6_BLOCK)):
        raise ValueError(f"codes [{n}, {k}] need scales [{n}, {-(-k // INT6_SUBGROUP)}] and block scales "
                         f"[{n}, {-(-k // INT6_BLOCK)}], got {list(scales.shape)} and {list(block_scales.shape)}")
    if codes.size and int(codes.max()) > 63:
        raise ValueError(f"6-bit codes must be 0..63, got {int(codes.max())}")
    codes = np.asarray(codes, np.uint8)
    p = panels(n)
    top = _padded(codes >> 4, p * PANEL, kg).reshape(p, PANEL, kg // 16, 2, 2, 4)
    high = top[:, :, :, 0, 0] | top[:, :, :, 0, 1] << 2 | top[:, :, :, 1, 0] << 4 | top[:, :, :, 1, 1] << 6
    high = high.transpose(0, 2, 1, 3).reshape(p, kg // 4 * PANEL)
    stored_scales = _padded(np.asarray(scales, np.int8), n, kg // INT6_SUBGROUP)
    stored_blocks = _padded(np.asarray(block_scales, np.float16), n, -(-kg // INT6_BLOCK))
    shape = PackedShape(WeightFormat.INT6, n, k, INT6_SUBGROUP, DType.float16)
    return PackedWeight(shape, (pack_int4_codes(codes & 0x0F), np.ascontiguousarray(high),
                                pack_k_major(stored_scales), pack_k_major(stored_blocks)))


def pack_int4_k(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, block_scales: np.ndarray,
                block_mins: np.ndarray) -> PackedWeight:
    """GGUF Q4_K as stored: codes [N, K] (0..15), 6-bit scales and mins [N, ceil(K / 32)] and float16 block scales
    and mins [N, ceil(K / 256)] -> the int4_k layout."""
    n, k = codes.shape
    kg = padded_k(k, INT4_GROUP)
    for name, values, per in (("scales", scales, INT4_GROUP), ("mins", mins, INT4_GROUP),
                              ("block scales", block_scales, INT6_BLOCK), ("block mins", block_mins, INT6_BLOCK)):
        if values.shape != (n, -(-k // per)):
            raise ValueError(f"codes [{n}, {k}] need {name} of shape [{n}, {-(-k // per)}], got {list(values.shape)}")
    groups, blocks = kg // INT4_GROUP, -(-kg // INT6_BLOCK)
    arrays = (pack_int4_codes(codes), pack_k_major(_padded(np.asarray(scales, np.uint8), n, groups)),
              pack_k_major(_padded(np.asarray(mins, np.uint8), n, groups)),
              pack_k_major(_padded(np.asarray(block_scales, np.float16), n, blocks)),
              pack_k_major(_padded(np.asarray(block_mins, np.float16), n, blocks)))
    return PackedWeight(PackedShape(WeightFormat.INT4_K, n, k, INT4_GROUP, DType.float16, offsets=True), arrays)


def dequantize_int4_k(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, block_scales: np.ndarray,
                      block_mins: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """The float32 [N, K] an int4_k weight holds: (block scale * scale) * q - (block min * min), each step rounded
    to float32 as gguf-py dequantizes Q4_K."""
    q = unpack_int4_codes(codes, out_features, in_features).astype(np.float32)
    groups = scales.shape[1] // PANEL

    def per_weight(values: np.ndarray, block_values: np.ndarray) -> np.ndarray:
        blocks = unpack_k_major(block_values, out_features, block_values.shape[1] // PANEL).astype(np.float32)
        product = np.repeat(blocks, INT6_BLOCK // INT4_GROUP, axis=1)[:, :groups] * unpack_k_major(
            values, out_features, groups).astype(np.float32)
        return np.repeat(product, INT4_GROUP, axis=1)[:, :in_features]

    return q * per_weight(scales, block_scales) - per_weight(mins, block_mins)


def unpack_int6_codes(codes: np.ndarray, high: np.ndarray, out_features: int, in_features: int) -> np.ndarray:
    """The [N, K] uint8 codes (0..63) of a 6-bit weight's nibble and high-bit planes."""
    p = codes.shape[0]
    kg = codes.shape[1] * 2 // PANEL
    fields = high.reshape(p, kg // 16, PANEL, 4).transpose(0, 2, 1, 3)[:, :, :, None, None, :]
    shifts = np.array([[0, 2], [4, 6]], np.uint8).reshape(1, 1, 1, 2, 2, 1)
    top = ((fields >> shifts) & 3).reshape(p * PANEL, kg)
    q = unpack_int4_codes(codes, p * PANEL, kg) | (top << 4)
    return np.ascontiguousarray(q[:out_features, :in_features])


def int6_weight_scales(scales: np.ndarray, block_scales: np.ndarray, out_features: int,
                       in_features: int) -> np.ndarray:
    """Block scale * scale per channel per 16 inputs, float32 [N, ceil(K / 16)] (exact: 11 bits times 8)."""
    per_16 = -(-in_features // INT6_SUBGROUP)
    sub = unpack_k_major(scales, out_features, scales.shape[1] // PANEL)[:, :per_16].astype(np.float32)
    blocks = unpack_k_major(block_scales, out_features, block_scales.shape[1] // PANEL).astype(np.float32)
    return np.repeat(blocks, INT6_BLOCK // INT6_SUBGROUP, axis=1)[:, :per_16] * sub


def dequantize_int6(codes: np.ndarray, high: np.ndarray, scales: np.ndarray, block_scales: np.ndarray,
                    out_features: int, in_features: int) -> np.ndarray:
    """The float32 [N, K] matrix a 6-bit weight holds: (block scale * scale) * (q - 32), each product rounded to
    float32 as gguf-py dequantizes Q6_K."""
    q = unpack_int6_codes(codes, high, out_features, in_features).astype(np.float32)
    weight_scales = int6_weight_scales(scales, block_scales, out_features, in_features)
    return np.repeat(weight_scales, INT6_SUBGROUP, axis=1)[:, :in_features] * (q - INT6_ZERO_POINT)


def int4_as_int8(weight: PackedWeight) -> PackedWeight:
    """A 4-bit weight with offsets in the int8 layout with the same values (codes 0..15, float16 scales, float32
    offsets): what `--float-activations` runs `--quantization int4` as."""
    s = weight.shape
    if s.format is not WeightFormat.INT4 or not s.offsets:
        raise ValueError("int4_as_int8 takes a 4-bit weight with offsets")
    codes, scales, offsets = weight.arrays
    groups = -(-s.in_features // INT4_GROUP)
    q = unpack_int4_codes(codes, s.out_features, s.in_features).astype(np.int8)
    return pack_grouped(q, unpack_k_major(scales, s.out_features, groups).astype(np.float32),
                        unpack_k_major(offsets, s.out_features, groups).astype(np.float32), INT4_GROUP, s.scale_dtype)


def pack_float(weight: np.ndarray, fmt: WeightFormat) -> PackedWeight:
    """A [N, K] float16 / float32 weight -> k-major panels of the same values (float16 input stays float16)."""
    dtype = fmt.float_dtype.to_numpy()
    if weight.dtype != dtype and not np.array_equal(weight.astype(dtype).astype(weight.dtype), weight):
        raise ValueError(f"weight values are not exact in {fmt.value}")
    return PackedWeight(PackedShape(fmt, *weight.shape), (pack_k_major(weight, dtype),))


# --- graph side --------------------------------------------------------------------------------------------

def _op_name(kind: str, shape: PackedShape) -> tuple[str, dict[str, int]]:
    """The custom op that multiplies (kind "linear") or looks up rows of (kind "packed_embedding") a weight
    packed as `shape` says, and its parameters."""
    fmt = shape.format
    if fmt is WeightFormat.BF16:
        return f"mili_{kind}_bf16", {}
    if fmt is WeightFormat.INT8:
        return f"mili_{kind}_int8" + ("_offsets" if shape.offsets else ""), {"group_size": shape.group_size}
    if fmt is WeightFormat.INT4:
        return f"mili_{kind}_int4" + ("_offsets" if shape.offsets else ""), {}
    if fmt is WeightFormat.INT6:
        return f"mili_{kind}_int6", {}
    if fmt is WeightFormat.INT4_K:
        return f"mili_{kind}_int4_k", {}
    if fmt in (WeightFormat.FLOAT16, WeightFormat.FLOAT32):
        return f"mili_{kind}_float", {}
    raise ValueError(f"{fmt.value} weights are not packed tensors")


def linear(x: TensorValue, weight: list[TensorValue], shape: PackedShape, out_features: DimLike, *,
           out_dtype: DType | None = None) -> TensorValue:
    """x [M, K] @ W^T -> [M, out_features] in `out_dtype` (default x's), W packed as `shape` says (its format,
    group size, scale dtype, offsets); `weight` holds the graph values of shape.arrays() in order."""
    if shape.format is WeightFormat.PARTS:
        return ops.concat([linear(x, weight[own], part, part.out_features, out_dtype=out_dtype)
                           for part, own in shape.part_arrays()], axis=1)
    out = TensorType(out_dtype or x.dtype, [x.shape[0], out_features], x.device)
    name, parameters = _op_name("linear", shape)
    return ops.custom(name, x.device, [x, *weight], out_types=[out], parameters=parameters)[0].tensor


def embedding(ids: TensorValue, weight: list[TensorValue], shape: PackedShape, hidden: DimLike,
              out_dtype: DType) -> TensorValue:
    """Rows `ids` [T] of a packed [vocab, hidden] weight -> [T, hidden] in `out_dtype` (an untied GGUF embedding,
    or a tied one read from the LM head's packed storage)."""
    out = TensorType(out_dtype, [ids.shape[0], hidden], ids.device)
    name, parameters = _op_name("packed_embedding", shape)
    return ops.custom(name, ids.device, [ids, *weight], out_types=[out], parameters=parameters)[0].tensor


def kernel_family(x: TensorValue) -> TensorValue:
    """[2] int32: which CPU micro-kernel mili_linear_bf16 uses for x's dtype (simd width * 10 + 1 if vdpbf16ps),
    and which the 4-bit ops use (simd width * 10 + 0 generic, 1 pmaddubsw, 2 vpdpbusd)."""
    return ops.custom("mili_linear_kernel_family", x.device, [x],
                      out_types=[TensorType(DType.int32, [2], x.device)])[0].tensor
