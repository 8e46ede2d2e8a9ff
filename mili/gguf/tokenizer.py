"""The tokenizer a GGUF file carries (`tokenizer.ggml.*`), rebuilt as a Hugging Face `tokenizers` tokenizer.

Qwen2, Qwen2.5 and Qwen3 files hold a byte-level BPE tokenizer: model `gpt2`, pre-tokenizer `qwen2`, the token
strings in id order with a type each, the merges, and the special token ids. The rebuilt tokenizer is what
Qwen's own tokenizer.json describes (NFC, Qwen2's split regex, byte-level BPE): every normal, control and
user-defined token is in the BPE vocabulary at its id, the control and user-defined ones also as added tokens
(control ones special); unused padding entries are left out. llama.cpp's converter marks every `<|...|>` added
token as control, so a few that Qwen's tokenizer.json calls non-special (`<|fim_prefix|>`, ...) are special here;
text encodes the same either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import TokenType
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from mili.gguf.files import GGUFError, GGUFModel

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2, Qwen2.5 and Qwen3; llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
SUPPORTED_PRE = ("qwen2",)
# llama.cpp ends generation on these control tokens too, whatever eos_token_id says (as Qwen's
# generation_config.json lists both <|im_end|> and <|endoftext|>).
END_OF_GENERATION_TEXTS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class GGUFTokenizer:
    """The tokenizer, and what tokenizer_config.json would say: special tokens, chat template, stop ids."""

    hf: HFTokenizer
    tokenizer_config: dict[str, object]
    eos_token_ids: tuple[int, ...]


def _token_id(model: GGUFModel, key: str, tokens: list[str]) -> int | None:
    value = model.value(key, int, None)
    if value is not None and not 0 <= value < len(tokens):
        raise GGUFError(f"{model.name}: '{key}' is {value}, outside the {len(tokens)} tokens of the vocabulary")
    return value


def read_tokenizer(model: GGUFModel) -> GGUFTokenizer:
    """Rebuilds the file's tokenizer; a GGUFError names the key when it is one MILI cannot rebuild."""
    kind = model.value("tokenizer.ggml.model", str)
    pre = model.value("tokenizer.ggml.pre", str, "default")
    if kind != "gpt2" or pre not in SUPPORTED_PRE:
        raise GGUFError(f"{model.name}: its tokenizer is model '{kind}' with pre-tokenizer '{pre}'; MILI rebuilds "
                        f"byte-level BPE ('gpt2') with pre-tokenizer {', '.join(SUPPORTED_PRE)} (Qwen2, Qwen2.5, "
                        "Qwen3); pass --tokenizer with a Hugging Face tokenizer folder instead")
    if model.value("tokenizer.ggml.add_bos_token", bool, False):
        raise GGUFError(f"{model.name}: 'tokenizer.ggml.add_bos_token' is true; Qwen models start prompts without "
                        "a BOS token and MILI adds none")
    tokens = model.value("tokenizer.ggml.tokens", list)
    types = model.value("tokenizer.ggml.token_type", list)
    merges = model.value("tokenizer.ggml.merges", list)
    if len(types) != len(tokens):
        raise GGUFError(f"{model.name}: 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens")
    # Control and user-defined tokens are in the BPE vocabulary too, so that added below they keep their ids.
    kept = (TokenType.NORMAL, TokenType.CONTROL, TokenType.USER_DEFINED)
    vocab = {token: i for i, (token, kind) in enumerate(zip(tokens, types, strict=True)) if kind in kept}
    pairs = []
    for merge in merges:
        left, space, right = merge.partition(" ")
        if not space or left not in vocab or right not in vocab:
            raise GGUFError(f"{model.name}: merge {merge!r} in 'tokenizer.ggml.merges' is not two vocabulary tokens")
        pairs.append((left, right))
    hf = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False, ignore_merges=False))
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    hf.decoder = decoders.ByteLevel()
    added = [(i, token, kind) for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
             if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    hf.add_tokens([AddedToken(token, special=kind == TokenType.CONTROL, normalized=False) for _, token, kind in added])
    config: dict[str, object] = {"chat_template": model.value("tokenizer.chat_template", str, None)}
    for name in ("eos", "bos", "padding"):
        token_id = _token_id(model, f"tokenizer.ggml.{name}_token_id", tokens)
        if token_id is not None:
            config[f"{'pad' if name == 'padding' else name}_token"] = tokens[token_id]
    stop_ids = {_token_id(model, f"tokenizer.ggml.{name}_token_id", tokens) for name in ("eos", "eot", "eom")}
    stop_ids |= {i for i, token, kind in added if kind == TokenType.CONTROL and token in END_OF_GENERATION_TEXTS}
    return GGUFTokenizer(hf, config, tuple(sorted(i for i in stop_ids if i is not None)))
