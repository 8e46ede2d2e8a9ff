"""bfloat16 runs against float32 runs of the same (bfloat16) checkpoint: how often greedy decoding agrees."""

from __future__ import annotations

import numpy as np

from mili.engine.model_runner import ModelRunner
from tests.integration.conftest import NUM_BLOCKS, BlockAllocator
from tests.integration.helpers import greedy_generate, relative_error

PROMPTS, NEW_TOKENS = 8, 16
# bfloat16 logits carry ~3 significant digits: where float32's top-1/top-2 margin is below this share of
# the largest logit, the bfloat16 run may legitimately pick the other token.
BF16_RESOLUTION = 0.02


def clear_steps(logits: list[np.ndarray]) -> int:
    """Greedy steps before the first whose top-2 margin is within bfloat16's resolution."""
    for step, row in enumerate(logits):
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] < BF16_RESOLUTION * np.abs(row).max():
            return step
    return len(logits)


def test_bf16_greedy_tokens_agree_with_fp32(bf16_runner: ModelRunner, bf16_checkpoint_fp32_runner: ModelRunner, rng):
    agreeing_prompts, agreeing_tokens, largest_error = 0, 0, 0.0
    for _ in range(PROMPTS):
        prompt = rng.integers(0, 151_000, int(rng.integers(4, 40)))
        ours, ours_logits = greedy_generate(bf16_runner, prompt, NEW_TOKENS,
                                            BlockAllocator(NUM_BLOCKS).take(len(prompt) + NEW_TOKENS, 16))
        ref, ref_logits = greedy_generate(bf16_checkpoint_fp32_runner, prompt, NEW_TOKENS,
                                          BlockAllocator(NUM_BLOCKS).take(len(prompt) + NEW_TOKENS, 16))
        largest_error = max(largest_error, relative_error(ours_logits[0], ref_logits[0]))
        same = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), NEW_TOKENS)
        agreeing_tokens += same
        agreeing_prompts += same == NEW_TOKENS
        assert same >= clear_steps(ref_logits), f"bf16 left float32's clear choice at step {same}: {ours} vs {ref}"
    print(f"bf16 vs fp32: {agreeing_prompts}/{PROMPTS} prompts identical over {NEW_TOKENS} tokens, "
          f"{agreeing_tokens}/{PROMPTS * NEW_TOKENS} tokens before the first difference, "
          f"largest first-step logit error {largest_error:.2e} (relative to the largest logit)")
    assert largest_error < 0.05  # bf16 keeps ~3 significant digits; a wrong kernel is off by O(1)
