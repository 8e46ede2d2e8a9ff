"""The built-in demo model for `mili serve` without --model: a small random-weight Qwen3 with the real
Qwen3 tokenizer, written with numpy and safetensors on first use and cached. Its text is gibberish (the
weights are random); it exists so the server can be tried and tested with no download.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from mili.config import ModelConfig
from mili.checkpoints import QWEN3_EOS_TOKEN_ID, TOKENIZER_FILES, generation_config_json, cache_dir, qwen3_tokenizer_dir
from mili.weights import expected_shapes

log = logging.getLogger(__name__)

DEMO_NAME = "mili-demo-qwen3-random"
DEMO_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 128,
    "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": QWEN3_EOS_TOKEN_ID, "torch_dtype": "float32",
}


def demo_model_dir() -> Path:
    """The demo checkpoint folder, written on first use."""
    folder = cache_dir() / "checkpoints" / DEMO_NAME
    if (folder / "model.safetensors").exists():
        return folder
    log.info("writing the demo model (random weights, real Qwen3 tokenizer) to %s", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent))
    config = ModelConfig.from_dict(DEMO_CONFIG)
    rng = np.random.default_rng(0)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            tensors[name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(scratch / "model.safetensors"), metadata={"format": "pt"})
    (scratch / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2))
    (scratch / "generation_config.json").write_text(json.dumps(generation_config_json(), indent=2))
    for name in TOKENIZER_FILES:
        shutil.copyfile(qwen3_tokenizer_dir() / name, scratch / name)
    if folder.exists():
        shutil.rmtree(scratch)  # another process finished first
    else:
        scratch.rename(folder)
    return folder
