"""Build, compile and run MILI's Qwen3 graph yourself, without the engine.

    python examples/graph_api.py MODEL_DIR

The graph takes the ragged batch arrays (mili.model.qwen3.BATCH_INPUTS, int32) and the KV cache buffer,
which it updates in place; it returns float32 logits for the rows named by `logits_indices`.
"""

from __future__ import annotations

import sys

import numpy as np
from max.driver import CPU, Buffer
from max.dtype import DType
from max.engine import InferenceSession

from mili.config import ModelConfig
from mili.model.qwen3 import Qwen3GraphSpec, build_qwen3_graph, load_qwen3_weights


def main(model_dir: str) -> None:
    spec = Qwen3GraphSpec(ModelConfig.from_pretrained(model_dir), dtype=DType.float32, block_size=16)
    session = InferenceSession(devices=[CPU()])
    model = session.load(build_qwen3_graph(spec), weights_registry=load_qwen3_weights(model_dir, spec))
    cache = Buffer(spec.dtype, spec.cache_shape(num_blocks=8).shape, CPU())

    # One sequence of 5 prompt tokens at positions 0..4, its KV pages are blocks 3 and 6 (any order works).
    prompt = np.array([9707, 11, 1879, 0, 358], np.int32)
    block_table = np.array([[3, 6]], np.int32)
    slots = block_table[0, np.arange(5) // 16] * 16 + np.arange(5) % 16
    inputs = {
        "input_ids": prompt,
        "positions": np.arange(5, dtype=np.int32),
        "query_start": np.array([0, 5], np.int32),
        "context_lens": np.array([5], np.int32),
        "block_tables": block_table,
        "slot_mapping": slots.astype(np.int32),
        "logits_indices": np.array([4], np.int32),  # only the last position's logits
    }
    (logits,) = model.execute(*(Buffer.from_numpy(a) for a in inputs.values()), cache)
    print("next token after the prompt:", int(np.argmax(logits.to_numpy()[0])))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/graph_api.py MODEL_DIR")
    main(sys.argv[1])
