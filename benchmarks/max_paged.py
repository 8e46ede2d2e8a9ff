"""MAX's own paged-KV attention and KV-store ops, set up for side-by-side timing with MILI's.

MAX keeps its cache as [pages, 2 (K/V), layers, page_size, kv_heads, head_dim] and describes a batch by
`cache_lengths` (tokens cached *before* this step), a uint32 page lookup table and row offsets; its
attention reads dispatch metadata packed on the host. This module builds those graphs and buffers for
one sequence, so the benchmark can compare MAX's `flash_attention_ragged` and `kv_cache_store_paged_ragged`
with MILI's ops on the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession, Model
from max.graph import DeviceRef, Graph, TensorType, ops
from max.nn.attention.mask_config import MHAMaskVariant
from max.nn.kernels import flash_attention_ragged, kv_cache_store_paged_ragged
from max.nn.kv_cache import KVCacheInputsPerDevice, MHAAttnKey, MHAKVCacheParams

from mili.dtypes import numpy_to_buffer

# The cache fields our graphs take, in input order (MAX's other fields are unused for plain paged MHA).
CACHE_FIELDS = ("kv_blocks", "cache_lengths", "lookup_table", "max_prompt_length", "max_cache_length",
                "page_stride", "attention_dispatch_metadata")


@dataclass
class MaxPagedModels:
    params: MHAKVCacheParams
    attention: Model
    store: Model


def build_models(session: InferenceSession, dtype: DType, heads: int, kv_heads: int, head_dim: int,
                 page_size: int) -> MaxPagedModels:
    cpu = DeviceRef.CPU()
    params = MHAKVCacheParams(dtype=dtype, n_kv_heads=kv_heads, head_dim=head_dim, num_layers=1,
                              devices=[cpu], page_size=page_size)
    symbolic = params.get_symbolic_inputs()[0]
    cache_types = [getattr(symbolic, name) for name in CACHE_FIELDS]
    row_offsets_t = TensorType(DType.uint32, ["b1"], cpu)

    def cache_values(values) -> KVCacheInputsPerDevice:
        return KVCacheInputsPerDevice(**dict(zip(CACHE_FIELDS, values)))

    with Graph("max_flash_attention", input_types=[TensorType(dtype, ["t", heads, head_dim], cpu), row_offsets_t,
                                                    *cache_types]) as g:
        q, row_offsets, *cache = g.inputs
        layer = ops.constant(0, DType.uint32, cpu)
        g.output(flash_attention_ragged(params, q.tensor, row_offsets.tensor, cache_values(cache), layer,
                                        MHAMaskVariant.CAUSAL_MASK, head_dim ** -0.5))
    attention = session.load(g)

    kv_t = TensorType(dtype, ["t", kv_heads, head_dim], cpu)
    with Graph("max_kv_store", input_types=[kv_t, kv_t, row_offsets_t, *cache_types]) as g:
        k, v, row_offsets, *cache = g.inputs
        layer = ops.constant(0, DType.uint32, cpu)
        for key_or_value, x in ((0, k), (1, v)):
            kv_cache_store_paged_ragged(cache_values(cache), x.tensor, row_offsets.tensor, layer,
                                        key_or_value=key_or_value)
        g.output()
    store = session.load(g)
    return MaxPagedModels(params, attention, store)


def random_blocks(rng: np.random.Generator, pages: int, models: MaxPagedModels, dtype: DType) -> Buffer:
    """A MAX cache of `pages` pages, [pages, 2, 1, page_size, kv_heads, head_dim], filled with N(0, 1)."""
    shape = (pages, *models.params.shape_per_block)
    return numpy_to_buffer(rng.standard_normal(shape).astype(np.float32), dtype)


def cache_inputs(blocks: Buffer, page_table: np.ndarray, cached: int, new: int) -> list[Buffer]:
    """MAX's cache inputs for one sequence with `cached` tokens before this step and `new` tokens in it."""
    total = cached + new
    metadata = MHAAttnKey(batch_size=1, max_prompt_length=new, num_partitions=1).pack_into_buffer(CPU(), total)
    page_elems = int(np.prod(blocks.shape[1:]))
    return [
        blocks,
        Buffer.from_numpy(np.array([cached], np.uint32)),
        Buffer.from_numpy(page_table.astype(np.uint32)[None, :]),
        Buffer.from_numpy(np.array([new], np.uint32)),
        Buffer.from_numpy(np.array([total], np.uint32)),
        Buffer.from_numpy(np.array([page_elems], np.int64)),
        metadata,
    ]


def row_offsets(new: int) -> Buffer:
    return Buffer.from_numpy(np.array([0, new], np.uint32))
