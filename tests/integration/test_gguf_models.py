"""GGUF files through the engine and the server: the properties the safetensors path has hold for them too.

tests/integration/test_qwen3_vs_hf.py already runs the GGUF files of conftest.GGUF_FILES against transformers
with float activations (logits at every position, cached decode, greedy generation, chunking, mixed batches);
here the default, 4-bit tensors meeting activations quantized to int8: its accuracy against transformers, the
engine's prefix cache, batching and speculative decoding, and `mili serve` with the chat template the file
carries.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from mili.engine.config import EngineConfig
from mili.engine.engine import Engine
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import SpeculativeConfig
from mili.model_source import ModelSource
from mili.engine.model_runner import ModelRunner
from mili.model.packed_linear import WeightFormat
from tests.integration.conftest import GGUF_FILES, NUM_BLOCKS, ModelPair, model_pair
from tests.integration.helpers import run_all, run_chunk
from tests.servers import mili_serve

GGUF_FILE = GGUF_FILES[0]  # Qwen3, untied: its embedding is packed apart from the head
GREEDY = SamplingParams.greedy(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    return model_pair(GGUF_FILE)


@pytest.fixture(scope="module")
def source(pair: ModelPair) -> ModelSource:
    return pair.runner.source


@pytest.fixture(scope="module")
def runner(pair: ModelPair) -> ModelRunner:
    """The file as `mili serve` runs it by default: 4-bit tensors with int8 activations."""
    runner = ModelRunner.from_pretrained(pair.path, dtype="float32", num_blocks=NUM_BLOCKS)
    assert any(shape.format is WeightFormat.INT4 for _, shape in runner.spec.tensor_formats)
    assert any(shape.format is WeightFormat.PARTS for _, shape in runner.spec.tensor_formats)
    return runner


def new_engine(runner: ModelRunner, source: ModelSource, **config) -> Engine:
    return Engine(runner, source.tokenizer(), EngineConfig(debug_checks=True, **config))


def kl_and_agreement(logits: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """Per position KL(reference || MILI) of the next-token distributions, and the share of positions whose
    top tokens agree."""
    def log_softmax(values: np.ndarray) -> np.ndarray:
        shifted = values - values.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return kl, float(np.mean(reference.argmax(axis=-1) == logits.argmax(axis=-1)))


def test_int8_activations_stay_close_to_transformers(pair: ModelPair, runner: ModelRunner, rng):
    """Logits at every position of a 200-token prompt with 4-bit tensors meeting int8 activations, against
    transformers (float64 over gguf-py's dequantized weights) and against MILI's exact path (float activations)."""
    prompt = rng.integers(0, 151_000, 200)
    blocks = list(range(-(-len(prompt) // runner.block_size)))
    fast = run_chunk(runner, prompt, 0, blocks)
    exact = run_chunk(pair.runner, prompt, 0, blocks)
    kl, agreement = kl_and_agreement(fast, pair.reference_logits(prompt))
    kl_exact, agreement_exact = kl_and_agreement(exact, pair.reference_logits(prompt))
    print(f"{len(prompt)} positions: int8 activations KL mean {kl.mean():.3g} max {kl.max():.3g}, top-1 "
          f"agreement {agreement:.3f}; float activations KL mean {kl_exact.mean():.3g}, "
          f"agreement {agreement_exact:.3f}")
    assert len(kl) == len(prompt)
    # measured (Zen 3, 2026-12-07, seed 1118779059): KL mean 3.0e-3, max 0.11, top-1 agreement 0.995; float
    # activations 1.6e-10. Layer 0's q/k/v are random K-quant blocks (tests/gguf_blocks.py) with weights ~10x the
    # checkpoint's, which makes its attention sharp: int8 activations for q alone (Q4_K) or v alone (Q6_K) give
    # KL 1.2e-3 / 1.3e-3, while the 4-bit gate/up of checkpoint weights alone gave 1.6e-6. A part in the wrong place
    # or layout gives KL of order 1 and agreement far below these bounds.
    assert kl.mean() < 1e-2 and agreement >= 0.97
    assert kl_exact.mean() < 1e-8 and agreement_exact == 1


def prompts(rng: np.random.Generator, count: int, low: int = 4, high: int = 70) -> list[list[int]]:
    return [rng.integers(0, 151_000, int(rng.integers(low, high))).tolist() for _ in range(count)]


def tokens(engine: Engine, requests: dict[str, list[int]], params: SamplingParams = GREEDY) -> dict[str, list[int]]:
    for request_id, prompt in requests.items():
        engine.add_request(request_id, prompt, params)
    return {request_id: out.outputs[0].token_ids for request_id, out in run_all(engine).items()}


def test_a_cache_hit_gives_exactly_the_tokens_of_a_miss(runner: ModelRunner, source: ModelSource, rng):
    shared = prompts(rng, 1, 100, 101)[0] + [7, 8, 9]
    engine = new_engine(runner, source)
    miss = tokens(engine, {"miss": shared})["miss"]
    engine.add_request("hit", shared, GREEDY)
    hit = run_all(engine)["hit"]
    assert hit.metrics.cached_tokens == 96
    assert hit.outputs[0].token_ids == miss and len(miss) == 24


def test_a_request_gets_the_same_tokens_alone_or_among_16_others(runner: ModelRunner, source: ModelSource, rng):
    batch = {str(i): p for i, p in enumerate(prompts(rng, 17))}
    together = tokens(new_engine(runner, source, max_num_seqs=17, max_num_batched_tokens=96), batch)
    compared = 0
    for i in ("0", "9", "16"):
        alone = tokens(new_engine(runner, source), {i: batch[i]})[i]
        assert together[i] == alone, i
        compared += len(alone)
    assert compared == 3 * 24


def test_speculative_decoding_gives_the_tokens_of_plain_decoding(runner: ModelRunner, source: ModelSource, rng):
    """N-gram guesses on prompts that repeat themselves (so guesses are made and some accepted)."""
    requests = {str(i): (p * 4)[:90] for i, p in enumerate(prompts(rng, 6, 5, 20))}
    plain = tokens(new_engine(runner, source), requests)
    engine = new_engine(runner, source, speculative=SpeculativeConfig("ngram", 4, max_batch_size=8))
    guessed = tokens(engine, requests)
    assert guessed == plain and sum(len(t) for t in plain.values()) == 6 * 24
    assert engine.speculation.proposed > 0


@pytest.fixture(scope="module")
def server(pair: ModelPair) -> Iterator[str]:
    # float32, as `runner` runs: MAX's compile cache has the graph already
    with mili_serve(["--model", str(pair.path), "--dtype", "float32", "--kv-cache-memory", "2e8",
                     "--max-model-len", "256"], "gguf-server") as (url, _):
        yield url


def test_the_server_runs_a_gguf_file_with_its_own_chat_template(server: str, pair: ModelPair, runner: ModelRunner,
                                                                source: ModelSource):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    name = pair.path.stem
    assert [m.id for m in client.models.list().data] == [name]
    status = httpx.get(f"{server}/status").json()
    assert status["weights"] == "gguf" and status["model_format"] == source.describe()
    assert status["activations"] == "int8"  # its Q4_0 + Q4_1 gate/up run as 4-bit codes
    assert status["model_format"].startswith("GGUF BF16+F16+F32+Q4_0+Q4_1+Q4_K+Q5_0+Q5_1+Q5_K+Q6_K+Q8_0, ")
    assert 0 < status["weight_bytes_per_token"] < pair.runner.spec.weight_bytes()  # the embedding is not read whole

    messages = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    tokenizer = source.tokenizer()
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    assert chat.usage.prompt_tokens == len(prompt)  # the template the file carries, rendered as transformers would
    expected = tokens(new_engine(runner, source), {"chat": prompt}, SamplingParams.greedy(max_tokens=12,
                                                                                       ignore_eos=True))["chat"]
    assert chat.usage.completion_tokens == len(expected) == 12
    assert chat.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
