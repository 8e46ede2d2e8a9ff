"""The offline API: LLM.generate and LLM.chat, results in prompt order, a progress line."""

from __future__ import annotations

import pytest

from mili import LLM, SamplingParams
from mili.engine.engine import RequestError
from mili.checkpoints import cached_checkpoint


def test_generate_and_chat_in_order(capsys):
    llm = LLM(str(cached_checkpoint("tiny-tied-gqa2-d64")), num_kv_blocks=64, max_num_seqs=4)
    prompts = ["Hello there", "The capital of France is", "1, 2, 3,", "Qwen3 is", "Mojo and MAX"]
    greedy = SamplingParams.greedy(max_tokens=8, ignore_eos=True)
    outputs = llm.generate(prompts, greedy)
    assert [o.prompt_token_ids for o in outputs] == [llm.tokenizer.encode(p) for p in prompts]
    assert all(len(o.outputs[0].token_ids) == 8 and o.finished for o in outputs)
    again = llm.generate(prompts[1], greedy)  # one prompt alone (now a prefix-cache hit or not: same tokens)
    assert again[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids
    progress = capsys.readouterr().err
    assert "generated 1/1 requests, 8 tokens" in progress and "\r" not in progress  # not a terminal: plain lines

    chats = llm.chat([[{"role": "user", "content": "Hi!"}], [{"role": "user", "content": "Bye!"}]],
                     SamplingParams.greedy(max_tokens=4, ignore_eos=True), enable_thinking=False, use_tqdm=False)
    expected = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}],
                                                                      enable_thinking=False))
    assert chats[0].prompt_token_ids == expected and len(chats) == 2


def test_a_rejected_prompt_leaves_nothing_queued():
    llm = LLM(str(cached_checkpoint("tiny-tied-gqa2-d64")), num_kv_blocks=64, max_num_seqs=4)
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[1, 2, 3], [], [4, 5]], SamplingParams.greedy(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished()
    (out,) = llm.generate([[1, 2, 3]], SamplingParams.greedy(max_tokens=4), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4


def test_without_sampling_params_the_checkpoints_defaults_apply():
    llm = LLM(str(cached_checkpoint("tiny-tied-gqa2-d64")), num_kv_blocks=64)
    params = llm.default_sampling_params()  # Qwen3's generation_config.json, as the test checkpoint carries it
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
