"""The paged KV cache layout shared by the kernels (mojo_kernels/kv_cache.mojo) and the host.

One buffer for every layer: [num_layers, 2, num_blocks, kv_heads, block_size * head_dim], K at index 0
of the second axis, V at 1. Within a block, V is token-major [block_size, head_dim] and K is dim-major
[head_dim, block_size] (transposed), which lets attention score a block of keys with SIMD FMAs.
These numpy helpers read and write that layout for tests and debugging tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    def write(self, cache: np.ndarray, layer: int, slot: int, k: np.ndarray, v: np.ndarray) -> None:
        """Stores one token's k and v ([kv_heads, head_dim] each) at `slot` of `layer`."""
        block, offset = divmod(slot, self.block_size)
        k_blocks = cache[layer, 0, block].reshape(self.kv_heads, self.head_dim, self.block_size)
        v_blocks = cache[layer, 1, block].reshape(self.kv_heads, self.block_size, self.head_dim)
        k_blocks[:, :, offset] = k
        v_blocks[:, offset, :] = v

    def read(self, cache: np.ndarray, layer: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(k, v) of the token at `slot` of `layer`, each [kv_heads, head_dim]."""
        block, offset = divmod(slot, self.block_size)
        k_blocks = cache[layer, 0, block].reshape(self.kv_heads, self.head_dim, self.block_size)
        v_blocks = cache[layer, 1, block].reshape(self.kv_heads, self.block_size, self.head_dim)
        return k_blocks[:, :, offset].copy(), v_blocks[:, offset, :].copy()
