"""GGUF quantized tensors as grouped int8 codes: the form MILI's linear op runs, with nothing lost.

A [N, K] weight in grouped int8 codes is an int8 code per weight and a float32 scale (and optionally a float32
offset) per output row per group of `group` consecutive inputs:

    W[n, k] = float32(q[n, k]) * scale[n, k // group] + offset[n, k // group]

in float32, multiply first, then add (two roundings); without offsets there is no add.

Every GGUF type repacked here dequantizes (gguf-py's `gguf.quants.dequantize`, which follows ggml's C code) as
`d * q` or `d * q + m` or `d * q - dm` in float32 with the same two roundings, where q is a small integer read
from the block's bits and d, m, dm are the same for a run of 16 or 32 consecutive weights of a row:

    Q8_0  q = stored int8 (-128..127)   scale = d                                       group 32
    Q4_0  q = nibble - 8 (-8..7)        scale = d                                       group 32
    Q5_0  q = 5-bit value - 16          scale = d                                       group 32
    Q4_1  q = nibble (0..15)            scale = d,  offset = m                          group 32
    Q5_1  q = 5-bit value (0..31)       scale = d,  offset = m                          group 32
    Q4_K  q = nibble (0..15)            scale = d * sc,  offset = -(dmin * mn)          group 32
    Q5_K  q = 5-bit value (0..31)       scale = d * sc,  offset = -(dmin * mn)          group 32
    Q6_K  q = 6-bit value - 32          scale = d * sc (sc the int8 sub-block scale)    group 16

(d, dmin, m float16 widened to float32, which is exact; sc, mn the 6-bit sub-block scale and min of Q4_K/Q5_K;
the products d * sc and dmin * mn computed in float32 as gguf-py computes them, and exact anyway: 11 significant
bits times at most 8 fit float32's 24, though often not float16's 11.) The codes fit int8,
float32(q) is the very float32 gguf-py multiplies, and multiplication is commutative in IEEE 754; IEEE 754 also
defines a - b as a + (-b), and negation is exact, so `d * q - dm` is bit for bit `d * q + (-dm)`. Hence
`GroupedCodes.dequantize()` equals `gguf.quants.dequantize(raw, type)` in every bit, signed zeros included, for
any finite d, dmin and m (NaN stays NaN, but a NaN offset's sign bit is the negation of gguf-py's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# A block's unpacked content: codes int8 [B, block size], scales float32 [B, groups per block], offsets or None.
Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray | None]

# Rows are unpacked this many weights at a time, so that the uint8 temporaries stay a few tens of MB even for a
# 151,936 x 1024 embedding.
_CHUNK_ELEMENTS = 1 << 22

_LOW_HIGH_NIBBLE = np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)


@dataclass(frozen=True, eq=False)  # eq=False: comparing or hashing would compare arrays
class GroupedCodes:
    """A [N, K] weight as int8 codes with a scale (and offset) per row per group of `group` inputs:
    W[n, k] = float32(q[n, k]) * scales[n, k // group] + offsets[n, k // group], in float32, multiply then add
    (no add without offsets)."""

    q: np.ndarray  # int8 [N, K]
    scales: np.ndarray  # float32 [N, K // group]
    offsets: np.ndarray | None  # float32 [N, K // group], or None
    group: int

    def __post_init__(self) -> None:
        if self.q.dtype != np.int8 or self.q.ndim != 2:
            raise ValueError(f"q must be int8 [N, K], got {self.q.dtype} {list(self.q.shape)}")
        n, k = self.q.shape
        if self.group < 1 or k % self.group:
            raise ValueError(f"group {self.group} does not divide K = {k}")
        expected = (n, k // self.group)
        for name, array in (("scales", self.scales), ("offsets", self.offsets)):
            if array is not None and (array.dtype != np.float32 or array.shape != expected):
                raise ValueError(f"{name} must be float32 {list(expected)}, got {array.dtype} {list(array.shape)}")

    @property
    def scales_fit_float16(self) -> bool:
        """Every scale is exactly a float16 value (so it can be stored as float16)."""
        return _fits_float16(self.scales)

    def dequantize(self) -> np.ndarray:
        """The weights, float32 [N, K], computed exactly as the op computes them."""
        n, k = self.q.shape
        w = self.q.reshape(n, -1, self.group).astype(np.float32) * self.scales[:, :, None]
        if self.offsets is not None:
            w += self.offsets[:, :, None]
        return w.reshape(n, k)

    def regrouped(self, group: int) -> GroupedCodes:
        """The same weights with a smaller group that divides this one (each scale and offset repeated)."""
        if group < 1 or self.group % group:
            raise ValueError(f"cannot regroup codes in groups of {self.group} into groups of {group}: "
                             f"the new group must divide {self.group}")
        if group == self.group:
            return self
        repeats = self.group // group
        offsets = None if self.offsets is None else np.repeat(self.offsets, repeats, axis=1)
        return GroupedCodes(self.q, np.repeat(self.scales, repeats, axis=1), offsets, group)


def _fits_float16(values: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # too large for float16 becomes inf, which then fails the comparison
        back = values.astype(np.float16).astype(np.float32)
    return bool(np.array_equal(back.view(np.uint32), values.view(np.uint32)))


# Unpacking one type's blocks [B, type size] (uint8). Each mirrors gguf-py's dequantize_blocks for that type,
# stopping before the float arithmetic except for the scale and offset products, which it rounds the same way.

def _float16_at(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of each block as float32 [B, 1]; float16 -> float32 is exact."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(packed: np.ndarray, run: int) -> np.ndarray:
    """The 4-bit values of `packed` [B, bytes], uint8 [B, 2 * bytes]: each run of `run` bytes gives its `run` low
    nibbles, then its `run` high nibbles (the order ggml stores them in)."""
    runs = packed.reshape(packed.shape[0], -1, 1, run)
    return ((runs >> _LOW_HIGH_NIBBLE) & 0x0F).reshape(packed.shape[0], -1)


def _as_int8(values: np.ndarray, bias: int) -> np.ndarray:
    """uint8 values below 128 minus `bias`, as int8 (the view is exact below 128 and the result fits int8)."""
    return values.view(np.int8) - np.int8(bias)


def _q8_0(blocks: np.ndarray) -> Unpacked:
    # The stored int8 may be -128: ggml's quantizer never writes it, but a block may hold it and ggml reads it.
    return blocks[:, 2:].view(np.int8), _float16_at(blocks, 0), None


def _q4_0(blocks: np.ndarray) -> Unpacked:
    return _as_int8(_nibbles(blocks[:, 2:], 16), 8), _float16_at(blocks, 0), None


def _q4_1(blocks: np.ndarray) -> Unpacked:
    return _nibbles(blocks[:, 4:], 16).view(np.int8), _float16_at(blocks, 0), _float16_at(blocks, 2)


def _five_bits(high_bits: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 values 0..31: bit i of the little-endian uint32 `high_bits` [B, 4] is bit 4 of value i."""
    return _nibbles(packed, 16) | (np.unpackbits(high_bits, axis=-1, bitorder="little") << 4)


def _q5_0(blocks: np.ndarray) -> Unpacked:
    return _as_int8(_five_bits(blocks[:, 2:6], blocks[:, 6:]), 16), _float16_at(blocks, 0), None


def _q5_1(blocks: np.ndarray) -> Unpacked:
    q = _five_bits(blocks[:, 4:8], blocks[:, 8:]).view(np.int8)
    return q, _float16_at(blocks, 0), _float16_at(blocks, 2)


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit sub-block scales and mins of Q4_K/Q5_K from their 12 bytes, as float32 [B, 8] each:
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 have their low 4 bits
    in the nibbles of bytes 8-11 and their top 2 bits in the top 2 bits of bytes 0-3 / 4-7."""
    first, second, low_nibbles = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([first & 0x3F, (low_nibbles & 0x0F) | ((first >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([second & 0x3F, (low_nibbles >> 4) | ((second >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_scales_and_offsets(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: gguf-py computes `(d * sc) * q - (dmin * mn)`, each product rounded to float32 once; the offset
    is the negated product, as a - b is a + (-b) in IEEE 754."""
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    return _float16_at(blocks, 0) * scales, -(_float16_at(blocks, 2) * mins)


def _q4_k(blocks: np.ndarray) -> Unpacked:
    return (_nibbles(blocks[:, 16:144], 32).view(np.int8), *_k_scales_and_offsets(blocks))


def _q5_k(blocks: np.ndarray) -> Unpacked:
    # Bit j of high byte l is bit 4 of value l of sub-block j.
    high = (blocks[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    q = _nibbles(blocks[:, 48:176], 32) | (high.reshape(blocks.shape[0], -1) << 4)
    return (q.view(np.int8), *_k_scales_and_offsets(blocks))


def _q6_k_codes(blocks: np.ndarray) -> np.ndarray:
    """Q6_K's 256 unsigned 6-bit codes per block, uint8 [B, 256]: per half of 128 values, 64 bytes of low nibbles
    (values 0-63 low, 64-127 high), and 32 bytes whose bit pairs 0-1, 2-3, 4-5, 6-7 are the top 2 bits of values
    0-31, 32-63, 64-95, 96-127."""
    low = _nibbles(blocks[:, 0:128], 64)
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    return low | (high.reshape(blocks.shape[0], -1) << 4)


def _q6_k(blocks: np.ndarray) -> Unpacked:
    q = _as_int8(_q6_k_codes(blocks), 32)
    return q, _float16_at(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32), None


# Per type: the group (inputs per scale) and the unpacking of its blocks.
_LAYOUTS: dict[GGMLQuantizationType, tuple[int, Callable[[np.ndarray], Unpacked]]] = {
    GGMLQuantizationType.Q8_0: (32, _q8_0),
    GGMLQuantizationType.Q4_0: (32, _q4_0),
    GGMLQuantizationType.Q4_1: (32, _q4_1),
    GGMLQuantizationType.Q5_0: (32, _q5_0),
    GGMLQuantizationType.Q5_1: (32, _q5_1),
    GGMLQuantizationType.Q4_K: (32, _q4_k),
    GGMLQuantizationType.Q5_K: (32, _q5_k),
    GGMLQuantizationType.Q6_K: (16, _q6_k),
}

QUANTIZED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_LAYOUTS)


def _blocks(tensor_type: GGMLQuantizationType, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """raw checked and viewed as [rows, blocks per row, bytes per block]."""
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    name = tensor_type.name
    if rows < 0 or cols <= 0 or cols % block_size:
        raise ValueError(f"a {name} row is whole blocks of {block_size} values; "
                         f"a {rows} x {cols} tensor cannot be {name} (cols must be a positive multiple of "
                         f"{block_size})")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"raw must be the {name} tensor's bytes as uint8, got {raw.dtype}")
    per_row = cols // block_size * type_size
    if raw.size != rows * per_row:
        raise ValueError(f"a {rows} x {cols} {name} tensor is {rows * per_row} bytes ({per_row} per row), "
                         f"raw holds {raw.size} (shape {list(raw.shape)})")
    return raw.reshape(rows, cols // block_size, type_size)


def grouped_codes(tensor_type: GGMLQuantizationType, raw: np.ndarray, rows: int, cols: int) -> GroupedCodes:
    """The [rows, cols] GGUF tensor of `tensor_type` as grouped int8 codes that dequantize to exactly
    `gguf.quants.dequantize(raw, tensor_type)`.

    raw: the tensor's bytes as GGUFReader gives them (uint8, shape [rows, bytes per row] or flat)."""
    if tensor_type not in _LAYOUTS:
        supported = ", ".join(sorted(t.name for t in QUANTIZED_TYPES))
        raise ValueError(f"{getattr(tensor_type, 'name', tensor_type)} tensors cannot be repacked into grouped "
                         f"int8 codes; the types that can: {supported}")
    group, unpack = _LAYOUTS[tensor_type]
    blocks = _blocks(tensor_type, raw, rows, cols)
    block_size, type_size = GGML_QUANT_SIZES[tensor_type]
    q = np.empty((rows, cols), np.int8)
    scales = np.empty((rows, cols // group), np.float32)
    offsets = None
    step = max(1, _CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        q_part, scales_part, offsets_part = unpack(blocks[start:stop].reshape(-1, type_size))
        # Views of the contiguous output rows, one row per block: the parts land in place.
        q[start:stop].reshape(-1, block_size)[...] = q_part
        scales[start:stop].reshape(-1, block_size // group)[...] = scales_part
        if offsets_part is not None:
            if offsets is None:
                offsets = np.empty_like(scales)
            offsets[start:stop].reshape(-1, block_size // group)[...] = offsets_part
    return GroupedCodes(q, scales, offsets, group)


@dataclass(frozen=True, eq=False)
class Q6KParts:
    """A [N, K] Q6_K weight as stored: W[n, k] = (block_scales[n, k // 256] * scales[n, k // 16]) * (q[n, k] - 32),
    each product rounded to float32 (gguf-py's order)."""

    codes: np.ndarray  # uint8 [N, K], 0..63
    scales: np.ndarray  # int8 [N, K // 16]
    block_scales: np.ndarray  # float16 [N, K // 256]


def q6_k_parts(raw: np.ndarray, rows: int, cols: int) -> Q6KParts:
    """The [rows, cols] Q6_K tensor's codes and two levels of scales, unchanged (raw as for grouped_codes)."""
    blocks = _blocks(GGMLQuantizationType.Q6_K, raw, rows, cols)
    flat = blocks.reshape(-1, blocks.shape[-1])
    codes = np.empty((rows * (cols // 256), 256), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // 256)
    for start in range(0, len(flat), step):
        codes[start:start + step] = _q6_k_codes(flat[start:start + step])
    return Q6KParts(codes.reshape(rows, cols), flat[:, 192:208].view(np.int8).reshape(rows, cols // 16).copy(),
                    flat[:, 208:210].view(np.float16).reshape(rows, cols // 256).copy())


@dataclass(frozen=True, eq=False)
class Q4KParts:
    """A [N, K] Q4_K weight as stored: W[n, k] = (block_scales * scales) * q - (block_mins * mins), per 32 inputs
    (scales, mins: 6-bit) and per 256 (block scales and mins: float16), each product rounded to float32."""

    codes: np.ndarray  # uint8 [N, K], 0..15
    scales: np.ndarray  # uint8 [N, K // 32]
    mins: np.ndarray  # uint8 [N, K // 32]
    block_scales: np.ndarray  # float16 [N, K // 256]
    block_mins: np.ndarray  # float16 [N, K // 256]


def q4_k_parts(raw: np.ndarray, rows: int, cols: int) -> Q4KParts:
    """The [rows, cols] Q4_K tensor's codes and two levels of scales and mins, unchanged (raw as for
    grouped_codes)."""
    blocks = _blocks(GGMLQuantizationType.Q4_K, raw, rows, cols)
    flat = blocks.reshape(-1, blocks.shape[-1])
    codes = np.empty((len(flat), 256), np.uint8)
    scales = np.empty((len(flat), 8), np.uint8)
    mins = np.empty((len(flat), 8), np.uint8)
    step = max(1, _CHUNK_ELEMENTS // 256)
    for start in range(0, len(flat), step):
        part = flat[start:start + step]
        codes[start:start + step] = _nibbles(part[:, 16:144], 32)
        part_scales, part_mins = _k_scales_and_mins(part[:, 4:16])
        scales[start:start + step], mins[start:start + step] = part_scales, part_mins
    return Q4KParts(codes.reshape(rows, cols), scales.reshape(rows, -1), mins.reshape(rows, -1),
                    flat[:, 0:2].view(np.float16).reshape(rows, -1).copy(),
                    flat[:, 2:4].view(np.float16).reshape(rows, -1).copy())


def join_rows(parts: list[GroupedCodes]) -> GroupedCodes:
    """Concatenates weights along N (fusing q/k/v or gate/up that a file may store in different types): the
    common group is the smallest of the parts' groups (each part's group must be a multiple of it, else
    ValueError), offsets present if any part has them.

    Parts without offsets get offsets of -0.0, not +0.0: in IEEE 754 round-to-nearest x + (-0.0) is x for every x,
    -0.0 and +0.0 included, whereas -0.0 + (+0.0) is +0.0, which would turn the -0.0 weights those parts may have
    (a zero code times a negative scale) into +0.0. So the joined weights equal the parts' weights in every bit.
    """
    if not parts:
        raise ValueError("join_rows needs at least one part")
    widths = sorted({part.q.shape[1] for part in parts})
    if len(widths) > 1:
        raise ValueError(f"parts joined along N must have the same K; they have K = {widths}")
    group = min(part.group for part in parts)
    groups = [part.group for part in parts]
    if any(g % group for g in groups):
        raise ValueError(f"parts in groups of {groups} have no common group: each must be a multiple of {group}")
    parts = [part.regrouped(group) for part in parts]
    offsets = None
    if any(part.offsets is not None for part in parts):
        offsets = np.concatenate([np.full_like(part.scales, -0.0) if part.offsets is None else part.offsets
                                  for part in parts])
    return GroupedCodes(np.concatenate([part.q for part in parts]),
                        np.concatenate([part.scales for part in parts]), offsets, group)
