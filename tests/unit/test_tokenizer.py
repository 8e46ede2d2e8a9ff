"""Tokenizer, chat template and incremental detokenizer against transformers on the real Qwen3 files."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from mili.detokenizer import IncrementalDetokenizer
from mili.checkpoints import TOKENIZER_SHA256, qwen3_tokenizer_dir
from mili.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Hello, world!",
    "",
    " leading and trailing spaces  ",
    "多语言支持：你好，世界！今天天气怎么样？",
    "日本語のテキストと한국어 텍스트",
    "emoji: 👍🏽 👨‍👩‍👧‍👦 🇯🇵 🤖✨ 🫠",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|endoftext|>",
    "tabs\tand\nnewlines\r\n and   runs    of spaces",
    "numbers 1234567890 3.14159 -2e-7",
    "Ünïcödé ßtraße naïve café — “quotes” ‘single’ … ½ ≠ ∞",
    "mixed 中文 and English with emoji 🎉 and code `x += 1`",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
    "<think>reasoning</think> answer",
]


@pytest.fixture(scope="module")
def tokenizer(small_checkpoint_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(small_checkpoint_dir)


@pytest.fixture(scope="module")
def reference(small_checkpoint_dir):
    return AutoTokenizer.from_pretrained(small_checkpoint_dir)


def test_tokenizer_files_are_the_official_ones(tokenizer_dir):
    assert qwen3_tokenizer_dir() == tokenizer_dir
    import hashlib

    assert hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest() == TOKENIZER_SHA256


def test_known_facts(tokenizer):
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.vocab_size == 151669
    assert tokenizer.token_to_id("<|im_end|>") == 151645
    assert tokenizer.token_to_id("<think>") == 151667
    assert tokenizer.eos_token_ids == {151645, 151643}


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_decode_of_random_ids_matches_transformers(tokenizer, reference, seed):
    rng = random.Random(seed)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (False, True):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
     {"role": "user", "content": "and again 👋"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
     {"role": "assistant", "content": "a1", "reasoning_content": "r1"}, {"role": "user", "content": "q2"},
     {"role": "assistant", "content": "<think>r2</think>a2"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city <b>now</b>",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("chat_index", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_chat_template_matches_transformers(tokenizer, reference, chat_index, add_generation_prompt,
                                            enable_thinking):
    messages = CHATS[chat_index]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    actual = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           enable_thinking=enable_thinking)
    assert actual == expected


def test_chat_template_with_tools_matches_transformers(tokenizer, reference):
    expected = reference.apply_chat_template(CHATS[5], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(CHATS[5], tools=TOOLS) == expected
    assert "<b>now</b>" in expected  # tojson must not HTML-escape


def test_bad_chats_are_rejected(tokenizer):
    with pytest.raises(TokenizerError, match="at least one message"):
        tokenizer.apply_chat_template([])
    with pytest.raises(TokenizerError, match="message 1 must be an object with a 'role'"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="could not be loaded"):
        Tokenizer.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- incremental detokenizer


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finish())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_streamed_text_equals_full_decode(tokenizer, text, skip_special_tokens):
    ids = tokenizer.encode(text)
    deltas = stream(tokenizer, ids, skip_special_tokens)
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any("\ufffd" in d for d in deltas)  # no half characters were ever released


def test_multi_token_characters_are_held_back_until_complete(tokenizer):
    text = "🫠"
    ids = tokenizer.encode(text)
    assert len(ids) > 1, "this emoji should span several byte-level tokens"
    deltas = stream(tokenizer, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == text and deltas[-1] == ""


def test_random_ids_stream_to_the_full_decode(tokenizer, seed):
    """Arbitrary ids can form invalid UTF-8; the stream still ends equal to the full decode."""
    rng = random.Random(seed)
    for _ in range(100):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)
