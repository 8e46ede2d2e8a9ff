"""The tokenizer MILI rebuilds from a GGUF file against the Hugging Face tokenizer of the same vocabulary.

The GGUF files are written here as llama.cpp's converter writes a Qwen3 file (convert_hf_to_gguf.py's gpt2 vocab:
every id in order, added tokens typed control or user-defined as it decides, [PAD] fillers up to the embedding's
rows), with gguf-py's own SpecialVocab adding the merges, special ids and chat template: tests.gguf_files'
add_qwen3_tokenizer. The reference is the official Qwen3 tokenizer.json read by `tokenizers` (through
mili.tokenizer.Tokenizer.from_pretrained).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from mili.checkpoints import qwen3_tokenizer_dir
from mili.gguf.files import GGUFError, GGUFModel
from mili.tokenizer import Tokenizer
from tests.gguf_files import add_qwen3_tokenizer

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "MILI's tokenizer doesn't change: we'll see, they're sure, I'd say it's 1,234,567.89 (or 3.14e-10).",
    "机器学习是人工智能的一个分支。我们今天讨论大型语言模型的推理效率，以及量化对精度的影响。",
    "日本語のテキスト、한국어 텍스트, русский текст, العربية, ελληνικά, עברית.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\nprint(fib(30))\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\t// dot\n}\r\n",
    "Emoji: 😀🎉👩‍👩‍👧‍👦🏳️‍🌈 and 🇯🇵 flags, ✔︎ marks, ©®™ symbols.",
    "   leading spaces, trailing spaces   \n\n\n\t\t  mixed \u3000 whitespace \u00a0 runs          end",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning here\n</think>\n\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call><|endoftext|>",
    "Ｆｕｌｌｗｉｄｔｈ and combining: e\u0301 vs é, Å vs A\u030a, ﬁ ligature.",
    "",
]


def write_gguf(path: Path, fill=None) -> Path:
    """A GGUF file with no tensors whose metadata `fill(writer)` adds."""
    writer = gguf.GGUFWriter(path, "qwen3")
    if fill is not None:
        fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def qwen3_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "qwen3-tokenizer.gguf"
    return write_gguf(path, lambda writer: add_qwen3_tokenizer(writer, qwen3_tokenizer_dir()))


@pytest.fixture(scope="module")
def tokenizers(qwen3_gguf) -> tuple[Tokenizer, Tokenizer]:
    return Tokenizer.from_gguf(GGUFModel.open(qwen3_gguf)), Tokenizer.from_pretrained(qwen3_tokenizer_dir())


def random_text(rng: np.random.Generator) -> str:
    """Characters from several scripts, digits, punctuation, whitespace and emoji, in random runs."""
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " \t\n\r  ",
             ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`", "的一是不了人我在有他这中大来上国个到说们为",
             "アイウエオカキクケコあいうえお", "😀😂🤖🚀🌍✨🔥👍🏽", "éüñçßøåæœ", "ΑΒΓαβγДЖЯжя"]
    pieces = []
    for _ in range(int(rng.integers(1, 30))):
        pool = pools[int(rng.integers(len(pools)))]
        pieces.append("".join(rng.choice(list(pool), int(rng.integers(1, 12)))))
    return "".join(pieces)


def test_gguf_tokenizer_encodes_and_decodes_like_the_hugging_face_one(tokenizers, rng):
    ours, reference = tokenizers
    texts = CORPUS + [random_text(rng) for _ in range(300)]
    compared = 0
    for text in texts:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == reference.decode(ids)
        compared += len(ids)
    assert compared > 5_000, compared  # the corpus really was tokenized
    assert ours.vocab_size == reference.vocab_size == 151_669
    sample = range(0, 151_669, 97)
    assert [ours.token_bytes(i) for i in sample] == [reference.token_bytes(i) for i in sample]


def test_gguf_tokenizer_carries_the_special_tokens_and_chat_template(tokenizers):
    ours, reference = tokenizers
    assert ours.special_tokens.eos_token == "<|im_end|>" == reference.special_tokens.eos_token
    assert ours.eos_token_ids == {151643, 151645}  # eos, and <|endoftext|> as llama.cpp (and generation_config)
    assert {ours.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>")} == {151667, 151668, 151657}
    assert set(reference.special_token_ids()) <= set(ours.special_token_ids())
    assert ours.token_to_id("<think>") not in ours.special_token_ids()  # user-defined: stands for text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"}, {"role": "user", "content": "Why?"}]
    for thinking in (True, False):
        assert (ours.apply_chat_template(messages, enable_thinking=thinking)
                == reference.apply_chat_template(messages, enable_thinking=thinking))


@pytest.mark.parametrize(("model", "pre", "add_bos", "message"), [
    ("gpt2", "llama-bpe", False, "pre-tokenizer 'llama-bpe'"),
    ("llama", "default", False, "model 'llama'"),
    ("gpt2", "qwen2", True, "'tokenizer.ggml.add_bos_token' is true"),
])
def test_tokenizers_mili_cannot_rebuild_are_refused_naming_the_key(tmp_path, model, pre, add_bos, message):
    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_add_bos_token(add_bos)

    with pytest.raises(GGUFError, match=message):
        Tokenizer.from_gguf(GGUFModel.open(write_gguf(tmp_path / "bad.gguf", fill)))


def test_unreadable_files_are_named(tmp_path, qwen3_gguf):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF one" * 4)
    with pytest.raises(GGUFError, match="model.gguf is not a readable GGUF file"):
        GGUFModel.open(not_gguf)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(qwen3_gguf.read_bytes()[:100_000])
    with pytest.raises(GGUFError, match="truncated.gguf is not a readable GGUF file"):
        GGUFModel.open(truncated)
    with pytest.raises(GGUFError, match="lacks the metadata key 'tokenizer.ggml.model'"):
        Tokenizer.from_gguf(GGUFModel.open(write_gguf(tmp_path / "empty.gguf")))


def test_split_files_and_folders_are_found(tmp_path, qwen3_gguf):
    from mili.gguf.files import gguf_files

    parts = [tmp_path / f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for part in parts:
        part.write_bytes(b"")
    assert gguf_files(parts[1]) == parts == gguf_files(tmp_path)
    parts[2].unlink()
    with pytest.raises(GGUFError, match="missing beside it: m-00003-of-00003.gguf"):
        gguf_files(parts[0])
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="must hold exactly one GGUF model"):
        gguf_files(tmp_path)
