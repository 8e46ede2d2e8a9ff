"""MILI's graph against transformers' Qwen3ForCausalLM and Qwen2ForCausalLM (float64) on the test checkpoints."""

from __future__ import annotations

import numpy as np
import torch

from mili.engine.batch import Batch, LogitRows, SequenceChunk
from tests.integration.conftest import NUM_BLOCKS, BlockAllocator, ModelPair
from tests.integration.helpers import greedy_generate, relative_error, run_chunk

VOCAB_SAMPLE = 151_000  # prompts draw from the ordinary (non-special) token ids
NEAR_TIE = 1e-4  # a reference top-1/top-2 margin below this (relative) is a coin toss for any float32 engine


def random_prompt(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(0, VOCAB_SAMPLE, length)


def test_prefill_logits_at_every_position(fp32_pair: ModelPair, rng):
    blocks = BlockAllocator(NUM_BLOCKS)
    for length in (1, 17, int(rng.integers(40, 90))):  # within a block, across several
        prompt = random_prompt(rng, length)
        ours = run_chunk(fp32_pair.runner, prompt, 0, blocks.take(length, fp32_pair.runner.block_size))
        expected = fp32_pair.reference_logits(prompt)
        assert ours.shape == expected.shape
        assert relative_error(ours, expected) <= 1e-4, (fp32_pair.name, length)


def test_decode_steps_match_cached_reference(fp32_pair: ModelPair, rng):
    """Token-by-token decode (teacher-forced random tokens) against transformers with past_key_values."""
    runner, reference = fp32_pair.runner, fp32_pair.reference
    prompt, steps = random_prompt(rng, 21), random_prompt(rng, 12)
    blocks = BlockAllocator(NUM_BLOCKS).take(len(prompt) + len(steps), runner.block_size)
    run_chunk(runner, prompt, 0, blocks, LogitRows.NONE)
    with torch.no_grad():
        past = reference(torch.tensor(prompt[None]), use_cache=True).past_key_values
        for i, token in enumerate(steps):
            ours = run_chunk(runner, [token], len(prompt) + i, blocks)
            out = reference(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert relative_error(ours[0], out.logits[0, -1].numpy()) <= 1e-4, (fp32_pair.name, i)


def test_greedy_generation_matches_transformers_generate(fp32_pair: ModelPair, rng):
    runner, reference = fp32_pair.runner, fp32_pair.reference
    compared = total = 0
    for _ in range(8):
        prompt = random_prompt(rng, int(rng.integers(3, 40)))
        blocks = BlockAllocator(NUM_BLOCKS).take(len(prompt) + 32, runner.block_size)
        ours, _ = greedy_generate(runner, prompt, 32, blocks)
        with torch.no_grad():
            out = reference.generate(torch.tensor(prompt[None]), max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False, output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=0)
        theirs = out.sequences[0, len(prompt):].tolist()
        for step, (scores, mine, expected) in enumerate(zip(out.logits, ours, theirs)):  # raw logits
            top2 = torch.topk(scores[0], 2).values
            if float(top2[0] - top2[1]) < NEAR_TIE * float(scores[0].abs().max()):
                break  # past a near-tie the two continuations may legitimately differ
            assert mine == expected, f"{fp32_pair.name}: token {step} differs: {ours} vs {theirs}"
            compared += 1
        total += 32
    assert compared >= total // 2, f"only {compared} of {total} tokens were away from near-ties"


def test_chunked_prefill_equals_single_prefill(fp32_pair: ModelPair, rng):
    runner = fp32_pair.runner
    prompt = random_prompt(rng, 70)
    blocks = BlockAllocator(NUM_BLOCKS)
    whole = run_chunk(runner, prompt, 0, blocks.take(len(prompt), runner.block_size))
    for chunk in (1, 7, 16, 33):
        table = blocks.take(len(prompt), runner.block_size)
        pieces = [run_chunk(runner, prompt[start:start + chunk], start, table)
                  for start in range(0, len(prompt), chunk)]
        assert relative_error(np.concatenate(pieces), whole) <= 1e-5, (fp32_pair.name, chunk)


def test_mixed_batch_gives_each_sequence_its_solo_logits(fp32_pair: ModelPair, rng):
    """Prefill, chunk, decode and verify sequences in one shuffled batch, vs each run alone."""
    runner = fp32_pair.runner
    bs = runner.block_size
    # (cached prefix length, new tokens, which logits) per sequence
    shapes = [(0, 30, LogitRows.LAST), (40, 9, LogitRows.LAST), (25, 1, LogitRows.LAST), (18, 4, LogitRows.ALL),
              (0, 5, LogitRows.ALL), (33, 1, LogitRows.LAST), (16, 20, LogitRows.NONE), (0, 1, LogitRows.LAST)]
    order = rng.permutation(len(shapes))
    sequences = [(random_prompt(rng, cached + new), cached, rows) for cached, new, rows in shapes]
    blocks = BlockAllocator(NUM_BLOCKS)

    def prepare() -> list[list[int]]:
        """Fresh pages for every sequence, holding its cached prefix (computed alone)."""
        tables = []
        for tokens, cached, _ in sequences:
            table = blocks.take(len(tokens), bs)
            if cached:
                run_chunk(runner, tokens[:cached], 0, table, LogitRows.NONE)
            tables.append(table)
        return tables

    solo_tables = prepare()
    solo = [run_chunk(runner, tokens[cached:], cached, table, rows)
            for (tokens, cached, rows), table in zip(sequences, solo_tables)]
    mixed_tables = prepare()
    chunks = [SequenceChunk(sequences[i][0][sequences[i][1]:], sequences[i][1], mixed_tables[i], sequences[i][2])
              for i in order]
    mixed = runner.run(Batch.from_chunks(chunks, bs))
    row = 0
    largest = 0.0
    for i in order:
        expected = solo[i]
        got = mixed[row:row + len(expected)]
        row += len(expected)
        if len(expected):
            largest = max(largest, relative_error(got, expected))
    assert row == len(mixed)
    print(f"{fp32_pair.name}: largest mixed-vs-solo relative difference {largest:.2e}")
    assert largest <= 1e-5
