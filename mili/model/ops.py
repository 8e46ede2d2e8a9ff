"""Graph-building wrappers for MILI's Mojo custom ops.

Each function adds one op to the graph being built and returns its output value(s), so model code
reads like ordinary tensor code. The graph must list `mili.kernels.kernel_package()` in its
`custom_extensions`. Index tensors (positions, slots, query_start, context_lens, block_tables, layer)
are int32. The KV cache layout is described in `mili/model/kv_layout.py`.
"""

from __future__ import annotations

from max.graph import BufferValue, TensorType, TensorValue, ops


def rms_norm(x: TensorValue, weight: TensorValue, eps: float) -> TensorValue:
    """RMSNorm over the last axis of `x` [rows, hidden], scaled by `weight` [hidden] (Qwen3RMSNorm)."""
    return ops.custom(
        "mili_rms_norm", x.device, [x, weight],
        out_types=[TensorType(x.dtype, x.shape, x.device)], parameters={"eps": eps},
    )[0].tensor


def add_rms_norm(x: TensorValue, residual: TensorValue, weight: TensorValue,
                 eps: float) -> tuple[TensorValue, TensorValue]:
    """(rmsnorm(x + residual) * weight, x + residual) in one pass over [rows, hidden]."""
    normed, summed = ops.custom(
        "mili_add_rms_norm", x.device, [x, residual, weight],
        out_types=[TensorType(x.dtype, x.shape, x.device)] * 2, parameters={"eps": eps},
    )
    return normed.tensor, summed.tensor


def head_rms_norm(x: TensorValue, weight: TensorValue, eps: float) -> TensorValue:
    """Qwen3's per-head q/k norm: RMSNorm over head_dim of every head of `x` [tokens, heads, head_dim]."""
    tokens, heads, head_dim = x.shape
    rows = ops.reshape(x, [tokens * heads, head_dim])
    return ops.reshape(rms_norm(rows, weight, eps), [tokens, heads, head_dim])


def rope(x: TensorValue, positions: TensorValue, table: TensorValue) -> TensorValue:
    """Rotates every head of `x` [tokens, heads, head_dim] by its token's position (rotate-half layout).

    `table` is [max_positions, head_dim] float32 from `mili.model.rope.rope_table`.
    """
    return ops.custom(
        "mili_rope", x.device, [x, positions, table],
        out_types=[TensorType(x.dtype, x.shape, x.device)], parameters={"head_dim": int(x.shape[2])},
    )[0].tensor


def swiglu(gate_up: TensorValue) -> TensorValue:
    """silu(gate) * up for the fused [tokens, 2 * inter] gate/up projection output."""
    tokens, width = gate_up.shape
    return ops.custom(
        "mili_swiglu", gate_up.device, [gate_up],
        out_types=[TensorType(gate_up.dtype, [tokens, width // 2], gate_up.device)],
    )[0].tensor


def kv_store(cache: BufferValue, k: TensorValue, v: TensorValue, slots: TensorValue, layer: TensorValue,
             block_size: int) -> None:
    """Writes k and v [tokens, kv_heads, head_dim] into `cache` at `slots` of `layer` (-1 slots skipped)."""
    ops.inplace_custom(
        "mili_kv_store", k.device, [cache, k, v, slots, layer],
        parameters={"block_size": block_size, "head_dim": int(k.shape[2])},
    )


def paged_attention(cache: BufferValue, q: TensorValue, layer: TensorValue, query_start: TensorValue,
                    context_lens: TensorValue, block_tables: TensorValue, block_size: int) -> TensorValue:
    """Causal GQA attention of `q` [tokens, heads, head_dim] over the paged cache, for a ragged batch."""
    return ops.inplace_custom(
        "mili_paged_attention", q.device, [cache, q, layer, query_start, context_lens, block_tables],
        out_types=[TensorType(q.dtype, q.shape, q.device)],
        parameters={"block_size": block_size, "head_dim": int(q.shape[2])},
    )[0].tensor
