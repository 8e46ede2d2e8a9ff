"""The whole model with packed weights (bf16 panels, int8 with group scales) through MILI's linear op.

- Against transformers in float64 holding the very weights the packed format holds (bf16-rounded, or q * scale):
  float32-activation runs must match as tightly as the dense float32 graph does.
- A bfloat16 run (activations and weights) against transformers: logits within bfloat16's resolution and greedy
  tokens equal up to the first step where the reference's top two are closer than that.
- int8 and int4 (activations quantized to int8) against the float32 model they were quantised from: top-1
  agreement and mean KL divergence, reported and bounded; int4 with float activations against transformers
  holding the int4 weights, as tightly as the dense graph.
- The engine's guarantees hold for every format: a request's tokens are the same alone or in a batch of 17, and
  a prefix-cache hit gives exactly a miss's tokens.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from max.dtype import DType
from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

from mili.checkpoints import cached_checkpoint
from mili.engine.config import EngineConfig
from mili.engine.engine import Engine
from mili.engine.model_runner import ModelRunner
from mili.engine.sampling_params import SamplingParams
from mili.model.packed_linear import WeightFormat, pack_weight
from mili.model_source import ModelSource
from mili.tokenizer import Tokenizer
from tests.integration.conftest import BF16_CHECKPOINT, NUM_BLOCKS, BlockAllocator, ModelPair, model_pair
from tests.integration.helpers import greedy_generate, relative_error, run_chunk

CHECKPOINTS = ("tiny-tied-gqa2-d64", "tiny-untied-mha-d128", "tiny-qwen2-tied-gqa2-d64")  # tied, untied, Qwen2
PACKED = (WeightFormat.BF16, WeightFormat.INT8)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB_SAMPLE = 151_000
BF16_RESOLUTION = 0.02  # bfloat16 logits: ~3 significant digits, relative to the largest logit
# int8 with a float16 scale per 32 weights against the float32 model, on these random-weight checkpoints
# (measured over 6 x 64 positions: top-1 agreement 0.987, mean KL 3.5e-6 nats); the bounds leave room for seeds.
INT8_MIN_TOP1 = 0.9
INT8_MAX_MEAN_KL = 1e-3
# int4 (a float16 scale and offset per 32 weights, activations quantized to int8 per 32 inputs) against the float32
# model (measured over 6 x 64 positions: top-1 agreement 0.78, mean KL 7.4e-4 nats; these random models' next-token
# distributions are nearly flat, so their top tokens swap at small errors); 4 bits lose more than 8.
INT4_MIN_TOP1 = 0.6
INT4_MAX_MEAN_KL = 5e-3


def runner_for(name: str, dtype: DType, weights: WeightFormat, float_activations: bool = False) -> ModelRunner:
    return ModelRunner(ModelSource.open(cached_checkpoint(name)), dtype=dtype, device="cpu", block_size=16,
                       num_blocks=NUM_BLOCKS, weights=weights, float_activations=float_activations)


@functools.cache
def packed_pair(name: str, weights: WeightFormat, float_activations: bool = False) -> ModelPair:
    """MILI (float32 activations, `weights` packed) beside transformers in float64 whose projection weights are
    replaced by exactly what the packed format holds (quantisation is per output channel, so packing each
    checkpoint tensor alone gives the same values as packing the fused q/k/v and gate/up)."""
    path = cached_checkpoint(name)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        for param_name, param in reference.named_parameters():
            head = param_name == "lm_head.weight" or (  # a tied head is the embedding's parameter
                reference.config.tie_word_embeddings and param_name == "model.embed_tokens.weight")
            if head or (param_name.endswith(".weight") and param_name.rsplit(".", 2)[-2] in PROJECTIONS):
                held = pack_weight(param.numpy().astype(np.float32), weights).dense()
                param.copy_(torch.from_numpy(held.astype(np.float64)))
    return ModelPair(name, path, runner_for(name, DType.float32, weights, float_activations), reference)


@pytest.mark.parametrize("weights", PACKED, ids=lambda w: w.value)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_packed_weights_match_transformers_holding_the_same_weights(name, weights, rng):
    pair = packed_pair(name, weights)
    blocks = BlockAllocator(NUM_BLOCKS)
    for length in (1, 17, int(rng.integers(40, 90))):  # the decode tiles, and the prefill path
        prompt = rng.integers(0, VOCAB_SAMPLE, length)
        ours = run_chunk(pair.runner, prompt, 0, blocks.take(length, pair.runner.block_size))
        assert relative_error(ours, pair.reference_logits(prompt)) <= 1e-4, (name, weights.value, length)


def test_int4_with_float_activations_matches_transformers_holding_the_same_weights(rng):
    """--quantization int4 --float-activations: the int4 values in the int8 layout, multiplied exactly."""
    pair = packed_pair(CHECKPOINTS[1], WeightFormat.INT4, float_activations=True)
    assert pair.runner.spec.packed_shape("layers.0.o_proj").format is WeightFormat.INT8
    blocks = BlockAllocator(NUM_BLOCKS)
    for length in (1, 17, int(rng.integers(40, 90))):
        prompt = rng.integers(0, VOCAB_SAMPLE, length)
        ours = run_chunk(pair.runner, prompt, 0, blocks.take(length, pair.runner.block_size))
        assert relative_error(ours, pair.reference_logits(prompt)) <= 1e-4, length


def test_bfloat16_run_follows_transformers_until_a_near_tie(bf16_runner: ModelRunner, rng):
    """bf16 weights and bfloat16 activations (the CPU default for a bf16 checkpoint) against transformers in
    float64 on the same (bf16) weights."""
    assert bf16_runner.spec.weight_format is WeightFormat.BF16
    reference = Qwen3ForCausalLM.from_pretrained(cached_checkpoint(BF16_CHECKPOINT), dtype=torch.float64).eval()
    compared = 0
    for _ in range(6):
        prompt = rng.integers(0, VOCAB_SAMPLE, int(rng.integers(4, 40)))
        ours, ours_logits = greedy_generate(bf16_runner, prompt, 16,
                                            BlockAllocator(NUM_BLOCKS).take(len(prompt) + 16, 16))
        with torch.no_grad():
            out = reference.generate(torch.from_numpy(prompt[None]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        theirs = out.sequences[0, len(prompt):].tolist()
        assert relative_error(ours_logits[0], out.logits[0][0].numpy()) < 0.05
        for step, logits in enumerate(out.logits):
            top2 = torch.topk(logits[0], 2).values
            if float(top2[0] - top2[1]) < BF16_RESOLUTION * float(logits[0].abs().max()):
                break
            assert ours[step] == theirs[step], f"step {step}: {ours} vs {theirs}"
            compared += 1
    print(f"bf16 run: {compared} greedy tokens compared before near-ties")
    assert compared >= 6 * 16 // 4, f"only {compared} of 96 tokens were clear of bfloat16 near-ties"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("weights, min_top1, max_kl", [(WeightFormat.INT8, INT8_MIN_TOP1, INT8_MAX_MEAN_KL),
                                                       (WeightFormat.INT4, INT4_MIN_TOP1, INT4_MAX_MEAN_KL)],
                         ids=["int8", "int4"])
def test_quantized_weights_agree_with_the_float32_model(weights, min_top1, max_kl, rng):
    name = CHECKPOINTS[0]
    quantized = packed_pair(name, weights).runner
    fp32 = model_pair(name).runner
    positions, agree, kl_sum = 0, 0, 0.0
    for _ in range(6):
        prompt = rng.integers(0, VOCAB_SAMPLE, 64)
        ours = run_chunk(quantized, prompt, 0, BlockAllocator(NUM_BLOCKS).take(64, 16))
        theirs = run_chunk(fp32, prompt, 0, BlockAllocator(NUM_BLOCKS).take(64, 16))
        p, q = log_softmax(theirs), log_softmax(ours)
        kl_sum += float((np.exp(p) * (p - q)).sum())
        agree += int((ours.argmax(axis=1) == theirs.argmax(axis=1)).sum())
        positions += len(prompt)
    print(f"{weights.value} (group 32) vs float32 over {positions} positions: top-1 agreement "
          f"{agree / positions:.4f}, mean KL {kl_sum / positions:.2e} nats")
    assert positions == 6 * 64
    assert agree / positions >= min_top1
    assert kl_sum / positions <= max_kl


@functools.cache
def engine_runner(label: str) -> ModelRunner:
    if label == "bf16 weights, bfloat16 run":
        return runner_for(CHECKPOINTS[0], DType.bfloat16, WeightFormat.BF16)
    if label == "int4 weights, float32 run":
        return packed_pair(CHECKPOINTS[0], WeightFormat.INT4).runner
    return packed_pair(CHECKPOINTS[0], WeightFormat.INT8).runner


@pytest.mark.parametrize("label", ["bf16 weights, bfloat16 run", "int8 weights, float32 run",
                                   "int4 weights, float32 run"])
def test_engine_guarantees_hold_for_packed_weights(label, rng):
    runner = engine_runner(label)
    tokenizer = Tokenizer.from_pretrained(cached_checkpoint(CHECKPOINTS[0]))
    greedy = SamplingParams.greedy(max_tokens=16, ignore_eos=True)

    def run(prompts: list[list[int]], **config) -> list[list[int]]:
        engine = Engine(runner, tokenizer, EngineConfig(debug_checks=True, **config))
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, greedy)
        done = {}
        while engine.has_unfinished():
            done |= {out.request_id: out for out in engine.step() if out.finished}
        return [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]

    batch = [rng.integers(0, VOCAB_SAMPLE, int(rng.integers(4, 70))).tolist() for _ in range(17)]
    together = run(batch, max_num_seqs=17, max_num_batched_tokens=96)  # chunked prefills beside decodes
    for i in (0, 9, 16):
        assert together[i] == run([batch[i]])[0], f"{label}: request {i} changed in company"
    # at least two whole KV blocks, or there is nothing cached to hit (a 5-token batch[0] once made 15 tokens)
    shared = batch[0] * max(3, 2 * runner.block_size // len(batch[0]) + 1)
    engine = Engine(runner, tokenizer, EngineConfig(debug_checks=True))
    outputs = {}
    for request in ("miss", "hit"):
        engine.add_request(request, shared, greedy)
        while engine.has_unfinished():
            outputs |= {out.request_id: out for out in engine.step() if out.finished}
    assert outputs["hit"].metrics.cached_tokens > 0
    assert outputs["hit"].outputs[0].token_ids == outputs["miss"].outputs[0].token_ids
    print(f"{label}: 3 requests alone == in a batch of 17; a hit of {outputs['hit'].metrics.cached_tokens} "
          f"cached tokens == the miss (16 tokens each)")
