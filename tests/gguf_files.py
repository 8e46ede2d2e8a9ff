"""GGUF test files written as llama.cpp writes them, from the random-weight test checkpoints.

`write_gguf` converts a checkpoint folder (config.json, model.safetensors, the Qwen3 tokenizer files) the way
convert_hf_to_gguf.py converts a Qwen3 or Qwen2 model: the same metadata keys (TextModel.set_gguf_parameters),
the tokenizer as its gpt2-vocab path writes it, llama.cpp's tensor names, 1-D tensors (norms, biases) in F32 and
matrices in the type asked for. F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 are quantized from the checkpoint's weights
with gguf-py; gguf-py cannot quantize Q4_K/Q5_K/Q6_K, so those tensors hold valid random blocks from
tests.gguf_blocks instead (a loader test then dequantizes the file's blocks for its reference, not the
checkpoint's weights).

`cached_gguf(checkpoint, types)` writes one file per checkpoint and named type recipe (TYPE_RECIPES) under
`$MILI_CACHE_DIR/gguf` and shares it between tests and processes, as mili.checkpoints does for checkpoints.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from mili.checkpoints import PRESETS, QWEN3_VOCAB_SIZE, _file_lock, cache_dir, cached_checkpoint
from mili.config import ModelConfig
from mili.gguf.model_config import gguf_tensor_name

# (GGUF tensor name, (rows, cols) of the Hugging Face [out, in] matrix) -> the type to store it in
TensorTypeRule = Callable[[str, tuple[int, int]], T]
K_QUANTS = frozenset({T.Q4_K, T.Q5_K, T.Q6_K})  # gguf-py has no quantizer for these: random blocks instead
GGUF_FORMAT_VERSION = 1  # bump to invalidate cached files when the writer changes

# general.file_type of a file whose matrices are all of one type (llama.cpp's llama_ftype)
FILE_TYPES = {
    T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
    T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    T.Q5_0: LlamaFileType.MOSTLY_Q5_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    T.Q5_K: LlamaFileType.MOSTLY_Q5_K_S, T.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}


# --- the tokenizer, as convert_hf_to_gguf.py's _set_vocab_gpt2 writes it -------------------------------------

def llama_cpp_token_types(tokenizer_json: dict, vocab_size: int = QWEN3_VOCAB_SIZE) -> tuple[list[str], list[int]]:
    """Token strings and types in id order as convert_hf_to_gguf.py's get_vocab_base writes them: one per
    embedding row, [PAD<i>] fillers for ids the tokenizer does not use."""
    vocab = tokenizer_json["model"]["vocab"]
    added = {t["id"]: t for t in tokenizer_json["added_tokens"]}
    by_id = {i: token for token, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = added[i]["content"]
            looks_special = text.startswith("<|") and text.endswith("|>")  # its does_token_look_special
            tokens.append(text)
            control = added[i]["special"] or looks_special
            types.append(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_qwen3_tokenizer(writer: gguf.GGUFWriter, source: Path, vocab_size: int = QWEN3_VOCAB_SIZE) -> None:
    """The tokenizer.ggml.* keys of the tokenizer files in `source`; gguf-py's SpecialVocab adds the merges,
    special token ids and chat template (from tokenizer_config.json, then config.json), as the converter does."""
    tokens, types = llama_cpp_token_types(json.loads((source / "tokenizer.json").read_text()), vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # what the converter's pre-tokenizer hash names Qwen2/Qwen2.5/Qwen3's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(source, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)


# --- model metadata and tensors -------------------------------------------------------------------------------

def _add_model_metadata(writer: gguf.GGUFWriter, hparams: dict[str, Any], name: str,
                        file_type: LlamaFileType) -> None:
    """general.* and the <arch>.* keys TextModel.set_gguf_parameters writes for a Qwen3/Qwen2 config.json."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    rope = hparams.get("rope_parameters") or {"rope_theta": hparams["rope_theta"]}  # transformers 5, or 4
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if (head_dim := hparams.get("head_dim")) is not None:  # Qwen3 configs have one, Qwen2 configs do not
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _checkpoint_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(Hugging Face name, float32 array) in file order; torch reads bfloat16, which numpy cannot."""
    from safetensors import safe_open

    for path in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _stored(name: str, data: np.ndarray, rule: TensorTypeRule, rng: np.random.Generator) -> tuple[np.ndarray, T]:
    """The bytes (or float array) a tensor is stored as, and its type."""
    if data.ndim < 2:  # llama.cpp keeps norms and biases in F32 whatever the file type
        return data, T.F32
    rows, cols = data.shape
    qtype = rule(name, (rows, cols))
    if qtype in K_QUANTS:
        from tests.gguf_blocks import random_blocks  # a colleague's module; absent until it lands

        return random_blocks(qtype, rows, cols, rng), qtype
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:  # a row that is no whole number of blocks: the converter falls back to F16
        return gguf.quants.quantize(data, T.F16), T.F16


def _as_rule(tensor_type: TensorTypeRule | T) -> TensorTypeRule:
    if isinstance(tensor_type, T):
        return lambda name, shape: tensor_type
    return tensor_type


def _file_type(types: list[T]) -> LlamaFileType:
    """general.file_type of a file whose matrices have `types`: that of the commonest one."""
    if not types:
        return LlamaFileType.ALL_F32
    return FILE_TYPES.get(Counter(types).most_common(1)[0][0], LlamaFileType.GUESSED)


def write_gguf(checkpoint_dir: str | Path, out_path: str | Path, tensor_type: TensorTypeRule | T = T.F32, *,
               file_type: LlamaFileType | None = None, seed: int = 0) -> Path:
    """Converts the checkpoint in `checkpoint_dir` to the GGUF file `out_path` as convert_hf_to_gguf.py would.

    `tensor_type` is one type for every matrix or a rule (GGUF name, (rows, cols)) -> type; `file_type` (the
    general.file_type key) defaults to that of the commonest matrix type; `seed` seeds the random K-quant blocks."""
    checkpoint_dir, out_path = Path(checkpoint_dir), Path(out_path)
    hparams = json.loads((checkpoint_dir / "config.json").read_text())
    config = ModelConfig.from_dict(hparams)
    rule, rng = _as_rule(tensor_type), np.random.default_rng(seed)
    stored = []
    for hf_name, data in _checkpoint_tensors(checkpoint_dir):
        name = gguf_tensor_name(hf_name)
        stored.append((name, *_stored(name, data, rule, rng)))
    matrix_types = [qtype for _, data, qtype in stored if data.ndim == 2]
    writer = gguf.GGUFWriter(out_path, config.model_type)
    _add_model_metadata(writer, hparams, checkpoint_dir.name, file_type or _file_type(matrix_types))
    add_qwen3_tokenizer(writer, checkpoint_dir, config.vocab_size)
    for name, data, qtype in stored:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


# --- named type recipes and the cache -------------------------------------------------------------------------

@dataclass(frozen=True)
class TypeRecipe:
    """How a named test file types its matrices: a rule made from the model's config, and its file type."""

    file_type: LlamaFileType
    make_rule: Callable[[ModelConfig], TensorTypeRule]
    k_quants: bool = False  # needs tests.gguf_blocks


def _uniform(qtype: T) -> TypeRecipe:
    return TypeRecipe(FILE_TYPES[qtype], lambda config: _as_rule(qtype))


# llama-quantize's fallback when a row is no whole number of 256-value super-blocks (tensor_type_fallback)
_K_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def _fitting(qtype: T, cols: int) -> T:
    if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = _K_FALLBACK[qtype]
    return fallback if cols % gguf.GGML_QUANT_SIZES[fallback][0] == 0 else T.F16


def q4_k_m_rule(config: ModelConfig) -> TensorTypeRule:
    """llama-quantize's Q4_K_M mix (src/llama-quant.cpp, llama_tensor_get_type_impl) for a dense model: Q4_K
    everywhere except Q6_K for output.weight (token_embd.weight when tied; Q8_0 when its rows do not split into
    256-value blocks) and for attn_v / ffn_down of the layers use_more_bits picks, each falling back to a 32-value
    type when the row length is no multiple of 256."""
    n = config.num_hidden_layers
    # llama.cpp counts attn_v and ffn_down tensors in its std::map's name order (blk.1, blk.10, blk.11, blk.2...)
    rank = {layer: i for i, layer in enumerate(sorted(range(n), key=lambda layer: f"blk.{layer}."))}

    def more_bits(i: int) -> bool:
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def rule(name: str, shape: tuple[int, int]) -> T:
        cols = shape[1]
        if name == "output.weight" or (name == "token_embd.weight" and config.tie_word_embeddings):
            return T.Q6_K if cols % 256 == 0 else T.Q8_0
        wanted = T.Q4_K
        if name.endswith((".attn_v.weight", ".ffn_down.weight")) and more_bits(rank[int(name.split(".")[1])]):
            wanted = T.Q6_K
        return _fitting(wanted, cols)

    return rule


# The mixed recipe's types per layer (cycling), so that one file, and one compiled graph, runs every type MILI
# runs, and the fused q/k/v and gate/up join different types: layer 0 joins three K-quants (groups of 16 and 32,
# offsets or none) and Q4_0 with Q4_1; layer 1 joins F16, BF16 and F32 (float32 panels) and BF16 with BF16.
_MIXED_LAYERS = (
    {"attn_q": T.Q4_K, "attn_k": T.Q5_K, "attn_v": T.Q6_K, "attn_output": T.Q8_0, "ffn_gate": T.Q4_0,
     "ffn_up": T.Q4_1, "ffn_down": T.Q5_0},
    {"attn_q": T.F16, "attn_k": T.BF16, "attn_v": T.F32, "attn_output": T.Q5_1, "ffn_gate": T.BF16,
     "ffn_up": T.BF16, "ffn_down": T.F16},
)


def mixed_rule(config: ModelConfig) -> TensorTypeRule:
    """Every supported type somewhere (_MIXED_LAYERS), the embedding in Q6_K and an untied output in Q5_K, each
    falling back as llama-quantize does where a row is no whole number of 256-value super-blocks."""

    def rule(name: str, shape: tuple[int, int]) -> T:
        if name == "token_embd.weight":
            return _fitting(T.Q6_K, shape[1])
        if name == "output.weight":
            return _fitting(T.Q5_K, shape[1])
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        wanted = _MIXED_LAYERS[layer % len(_MIXED_LAYERS)][kind]
        return _fitting(wanted, shape[1]) if wanted in K_QUANTS else wanted

    return rule


TYPE_RECIPES: dict[str, TypeRecipe] = {
    "f32": _uniform(T.F32), "f16": _uniform(T.F16), "bf16": _uniform(T.BF16), "q8_0": _uniform(T.Q8_0),
    "q4_0": _uniform(T.Q4_0), "q4_1": _uniform(T.Q4_1), "q5_0": _uniform(T.Q5_0), "q5_1": _uniform(T.Q5_1),
    "q4_k_m": TypeRecipe(LlamaFileType.MOSTLY_Q4_K_M, q4_k_m_rule, k_quants=True),
    "mixed": TypeRecipe(LlamaFileType.GUESSED, mixed_rule, k_quants=True),
}


def cached_gguf(checkpoint_name: str, types_name: str) -> Path:
    """The GGUF file of test checkpoint `checkpoint_name` with matrices typed by TYPE_RECIPES[`types_name`],
    written on first use and then reused; safe across processes (file lock, atomic rename)."""
    if checkpoint_name not in PRESETS:
        raise KeyError(f"unknown checkpoint {checkpoint_name!r}; choose from {', '.join(PRESETS)}")
    if types_name not in TYPE_RECIPES:
        raise KeyError(f"unknown type recipe {types_name!r}; choose from {', '.join(TYPE_RECIPES)}")
    spec, recipe = PRESETS[checkpoint_name], TYPE_RECIPES[types_name]
    root = cache_dir() / "gguf"
    target = root / f"{spec.cache_key()}-{types_name}-v{GGUF_FORMAT_VERSION}.gguf"
    if target.exists():
        return target
    source = cached_checkpoint(spec)
    with _file_lock(root / f".{target.name}.lock"):
        if target.exists():
            return target
        scratch = root / f".writing-{os.getpid()}-{target.name}"
        try:
            rule = recipe.make_rule(ModelConfig.from_pretrained(source))
            write_gguf(source, scratch, rule, file_type=recipe.file_type)
            scratch.rename(target)
        except BaseException:
            scratch.unlink(missing_ok=True)
            raise
    return target


# --- small hand-written files ---------------------------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FF, VOCAB = 32, 2, 1, 24, 64, 16  # head_dim != hidden / heads, as in Qwen3


def tiny_tensors(arch: str = "qwen3", tied: bool = True) -> dict[str, tuple[int, ...]]:
    """One layer's tensors by llama.cpp name, with their numpy ([out, in]) shapes, written out by hand."""
    head_dim = HEAD_DIM if arch == "qwen3" else HIDDEN // HEADS
    q, kv = HEADS * head_dim, KV_HEADS * head_dim
    tensors = {
        "token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,), "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (q, HIDDEN), "blk.0.attn_k.weight": (kv, HIDDEN), "blk.0.attn_v.weight": (kv, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, q), "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FF, HIDDEN), "blk.0.ffn_up.weight": (FF, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FF),
    }
    if arch == "qwen3":
        tensors |= {"blk.0.attn_q_norm.weight": (head_dim,), "blk.0.attn_k_norm.weight": (head_dim,)}
    else:
        tensors |= {"blk.0.attn_q.bias": (q,), "blk.0.attn_k.bias": (kv,), "blk.0.attn_v.bias": (kv,)}
    if not tied:
        tensors["output.weight"] = (VOCAB, HIDDEN)
    return tensors


def tiny_metadata(arch: str = "qwen3") -> dict[str, Any]:
    keys = {"block_count": 1, "context_length": 256, "embedding_length": HIDDEN, "feed_forward_length": FF,
            "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS, "rope.freq_base": 1e6,
            "attention.layer_norm_rms_epsilon": 1e-6}
    if arch == "qwen3":
        keys |= {"attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM}
    return {f"{arch}.{key}": value for key, value in keys.items()} | {
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def write_tiny(path: Path, arch: str = "qwen3", metadata: dict[str, Any] | None = None,
               tensors: dict[str, tuple[int, ...]] | None = None, types: dict[str, T] | None = None) -> Path:
    """A file of zero tensors named and shaped as `tensors` says (numpy order), with `metadata` (ints as uint32,
    floats as float32, as the converter writes them); `types` stores some tensors as zero blocks of another type."""
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (tiny_metadata(arch) if metadata is None else metadata).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, shape in (tiny_tensors(arch) if tensors is None else tensors).items():
        qtype = (types or {}).get(name, T.F32)
        if qtype == T.F32:
            writer.add_tensor(name, np.zeros(shape, np.float32))
        else:
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            rows, cols = shape
            writer.add_tensor(name, np.zeros((rows, cols // block_size * block_bytes), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
