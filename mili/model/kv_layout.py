"""The paged KV cache layout shared by the kernels (mojo_kernels/kv_cache.mojo) and the host.

One buffer for every layer: [num_layers, 2, num_blocks, kv_heads, block_size * head_dim], K at index 0
of the second axis, V at 1. Within a block K is dim-major [head_dim, block_size] (transposed), which lets
attention score a block of keys with SIMD FMAs, and V is chunk-major [head_dim / C, block_size, C] with C =
V_CHUNK dims (the whole head_dim when it is not a multiple of V_CHUNK), so that each pass of the weighted V
sum over a chunk of dims reads one contiguous run (kv_cache.mojo says why).
These numpy helpers read and write that layout for tests and debugging tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

V_CHUNK = 32  # mojo_kernels/kv_cache.mojo's V_CHUNK


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_blocks: int
    kv_heads: int
    block_size: int
    head_dim: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_blocks, self.kv_heads, self.block_size * self.head_dim)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def bytes(self, itemsize: int) -> int:
        return int(np.prod(self.shape)) * itemsize

    @property
    def v_chunk(self) -> int:
        """Dims per V chunk (kv_cache.mojo's v_chunk)."""
        return V_CHUNK if self.head_dim % V_CHUNK == 0 else self.head_dim

    def _v_blocks(self, cache: np.ndarray, layer: int, block: int) -> np.ndarray:
        """The V blocks of one block's heads as a [kv_heads, chunks, block_size, chunk] view."""
        chunk = self.v_chunk
        return cache[layer, 1, block].reshape(self.kv_heads, self.head_dim // chunk, self.block_size, chunk)

    def write(self, cache: np.ndarray, layer: int, slot: int, k: np.ndarray, v: np.ndarray) -> None:
        """Stores one token's k and v ([kv_heads, head_dim] each) at `slot` of `layer`."""
        block, offset = divmod(slot, self.block_size)
        k_blocks = cache[layer, 0, block].reshape(self.kv_heads, self.head_dim, self.block_size)
        k_blocks[:, :, offset] = k
        self._v_blocks(cache, layer, block)[:, :, offset, :] = v.reshape(self.kv_heads, -1, self.v_chunk)

    def read(self, cache: np.ndarray, layer: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(k, v) of the token at `slot` of `layer`, each [kv_heads, head_dim]."""
        block, offset = divmod(slot, self.block_size)
        k_blocks = cache[layer, 0, block].reshape(self.kv_heads, self.head_dim, self.block_size)
        v = self._v_blocks(cache, layer, block)[:, :, offset, :].reshape(self.kv_heads, self.head_dim)
        return k_blocks[:, :, offset].copy(), v.copy()

    def write_blocks(self, cache: np.ndarray, layer: int, blocks: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Stores whole blocks of a sequence at once: k and v [len(blocks) * block_size, kv_heads, head_dim] hold
        positions 0, 1, ... and blocks[i] receives positions i * block_size onwards."""
        count, bs = len(blocks), self.block_size
        if k.shape != v.shape or len(k) != count * bs:
            raise ValueError(f"{count} blocks hold {count * bs} tokens; k and v have {k.shape} and {v.shape}")
        per_token = (count, bs, self.kv_heads, self.head_dim)
        stored = (count, self.kv_heads, bs * self.head_dim)
        cache[layer, 0, blocks] = k.reshape(per_token).transpose(0, 2, 3, 1).reshape(stored)  # K dim-major
        chunk = self.v_chunk
        per_chunk = (count, bs, self.kv_heads, self.head_dim // chunk, chunk)
        cache[layer, 1, blocks] = v.reshape(per_chunk).transpose(0, 2, 3, 1, 4).reshape(stored)  # V chunk-major
