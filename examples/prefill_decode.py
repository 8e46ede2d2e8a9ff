"""A minimal greedy generation loop on the model runner: one prefill, then one decode step per token.

    python examples/prefill_decode.py MODEL_DIR [PROMPT] [NEW_TOKENS]

The runner owns the compiled graph and the KV cache; a Batch says which tokens run and where their K/V
live (here one sequence on KV blocks 0, 1, 2, ...). The engine's scheduler does the same for many
sequences at once.

This is the one example with a hand-written loop, because its point is the layer below the engine. To
generate text, use the engine: `mili generate`, `mili.LLM`, or `Engine.add_request` + `Engine.step`.
"""

from __future__ import annotations

import sys

import numpy as np

from mili.engine.batch import Batch, SequenceChunk
from mili.engine.model_runner import ModelRunner
from mili.tokenizer import Tokenizer


def main(model_dir: str, prompt: str, new_tokens: int) -> None:
    runner = ModelRunner.from_pretrained(model_dir, num_blocks=64)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    ids = tokenizer.encode(prompt)
    blocks = list(range(-(-(len(ids) + new_tokens) // runner.block_size)))

    logits = runner.run(Batch.from_chunks([SequenceChunk(ids, 0, blocks)], runner.block_size))  # prefill
    generated = [int(np.argmax(logits[0]))]
    while len(generated) < new_tokens:  # decode: the last token, at its position, on the same blocks
        step = SequenceChunk([generated[-1]], len(ids) + len(generated) - 1, blocks)
        logits = runner.run(Batch.from_chunks([step], runner.block_size))
        generated.append(int(np.argmax(logits[0])))
    print(repr(tokenizer.decode(generated)))


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 4:
        sys.exit("usage: python examples/prefill_decode.py MODEL_DIR [PROMPT] [NEW_TOKENS]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "The capital of France is",
         int(sys.argv[3]) if len(sys.argv) > 3 else 16)
