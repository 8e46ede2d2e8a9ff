"""Where a model comes from, resolved once: a Hugging Face checkpoint folder or a GGUF file.

    source = ModelSource.open("qwen3-8b-q4_k_m.gguf")         # or a checkpoint folder; tokenizer="dir" overrides
    source.config, source.tokenizer(), source.generation_config(), source.describe()
    spec = source.graph_spec(dtype=DType.bfloat16, block_size=16)
    registry = source.load_weights(spec)                      # for session.load(build_qwen3_graph(spec), ...)

Everything that differs between the two kinds of model lives here, so the engine, the server, the CLI and `LLM`
take either alike. A GGUF model is a `.gguf` file (a split set's first part, or any part) or a folder that holds
one and no config.json; its hyper-parameters, tokenizer and chat template come from the file's metadata, and its
tensors run in the types the file stores (mili/gguf/weights.py). Opening checks the metadata against the tensors,
so a bad file fails here, before anything is loaded or compiled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from mili.config import GenerationConfig, ModelConfig

if TYPE_CHECKING:
    from max.driver import Buffer, Device
    from max.dtype import DType

    from mili.gguf.files import GGUFModel
    from mili.model.packed_linear import WeightFormat
    from mili.model.qwen3 import Qwen3GraphSpec
    from mili.tokenizer import Tokenizer


class ModelSourceError(ValueError):
    """A model path or tokenizer override that cannot be used; the message names it and the fix."""


def is_gguf_path(path: Path) -> bool:
    """A .gguf file, or a folder holding .gguf files and no config.json (a checkpoint folder wins)."""
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and not (path / "config.json").exists() and any(path.glob("*.gguf"))


@dataclass(frozen=True)
class ModelSource:
    """A model's config and where its weights, tokenizer and generation settings are read from."""

    path: Path
    config: ModelConfig
    gguf: GGUFModel | None = None
    tokenizer_dir: Path | None = None  # a Hugging Face tokenizer folder that replaces the model's own

    @classmethod
    def open(cls, model: str | Path, tokenizer: str | Path | None = None) -> ModelSource:
        """Reads a checkpoint folder's config.json, or a GGUF model's metadata (checked against its tensors)."""
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelSourceError(f"{path} does not exist: pass a checkpoint folder or a GGUF file")
        if is_gguf_path(path):
            from mili.gguf.files import GGUFModel
            from mili.gguf.model_config import model_config_from_gguf
            from mili.gguf.weights import check_tensor_types

            gguf = GGUFModel.open(path)
            config = model_config_from_gguf(gguf)
            check_tensor_types(gguf)
            source = cls(gguf.paths[0], config, gguf)
        else:
            source = cls(path, ModelConfig.from_pretrained(path))
        return source.with_tokenizer(tokenizer) if tokenizer is not None else source

    def with_tokenizer(self, tokenizer: str | Path) -> ModelSource:
        """This model with the Hugging Face tokenizer folder `tokenizer` instead of its own; a vocabulary that
        holds ids past the embedding's rows is refused."""
        from mili.tokenizer import Tokenizer

        folder = Path(tokenizer).expanduser()
        if not (folder / "tokenizer.json").is_file():
            raise ModelSourceError(f"--tokenizer {folder}: no tokenizer.json there; pass a Hugging Face tokenizer "
                                   f"folder (tokenizer.json, tokenizer_config.json)")
        size = Tokenizer.from_pretrained(folder).vocab_size
        if size > self.config.vocab_size:
            raise ModelSourceError(f"--tokenizer {folder}: its vocabulary has {size} tokens but the model's "
                                   f"embedding has {self.config.vocab_size} rows; pass the tokenizer this model "
                                   f"was trained with")
        return ModelSource(self.path, self.config, self.gguf, folder)

    @property
    def is_gguf(self) -> bool:
        return self.gguf is not None

    @property
    def name(self) -> str:
        """What to serve the model as by default: the folder's or the file's name (without .gguf)."""
        return self.path.name.removesuffix(".gguf") if self.is_gguf else self.path.name

    @property
    def checkpoint_dtype(self) -> str | None:
        """The dtype `--dtype auto` follows on CPU (mili.dtypes.resolve_run_dtype): config.json's for a checkpoint;
        for a GGUF file float32 when every matrix is F32, else bfloat16 (quantized and half-precision files)."""
        if self.gguf is None:
            return self.config.checkpoint_dtype
        from mili.gguf.weights import matrix_types

        return "float32" if matrix_types(self.gguf) == {"F32"} else "bfloat16"

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, built on first use (a GGUF file's takes a second or two) and then shared."""
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> Tokenizer:
        from mili.tokenizer import Tokenizer

        if self.tokenizer_dir is not None:
            return Tokenizer.from_pretrained(self.tokenizer_dir)
        if self.gguf is not None:
            return Tokenizer.from_gguf(self.gguf)
        return Tokenizer.from_pretrained(self.path)

    def generation_config(self) -> GenerationConfig:
        """generation_config.json of a checkpoint folder; a GGUF file carries no sampling defaults (llama.cpp reads
        none either), only its special token ids."""
        if self.gguf is None:
            return GenerationConfig.from_pretrained(self.path)
        c = self.config
        return GenerationConfig(eos_token_ids=c.eos_token_ids, bos_token_id=c.bos_token_id,
                                pad_token_id=c.pad_token_id)

    def graph_spec(self, *, dtype: DType, block_size: int, device: Device | None = None,
                   weights: WeightFormat | None = None, float_activations: bool = False) -> Qwen3GraphSpec:
        """The graph spec for running this model: for a GGUF file, its tensors' own layouts (a `weights` choice,
        i.e. --quantization, is refused: the file's types are what runs). `float_activations`: 4-bit weights meet
        float activations (--float-activations) instead of activations quantized to int8."""
        from max.graph import DeviceRef

        from mili.model.packed_linear import WeightFormat
        from mili.model.qwen3 import Qwen3GraphSpec

        device_ref = DeviceRef.CPU() if device is None else DeviceRef.from_device(device)
        if self.gguf is None:
            return Qwen3GraphSpec(self.config, dtype=dtype, device=device_ref, block_size=block_size, weights=weights,
                                  float_activations=float_activations)
        if weights is not None:
            raise ModelSourceError(f"--quantization {weights.value}: {self.path.name} is a GGUF file, which runs "
                                   f"in the types it stores ({self.describe()}); drop --quantization")
        from mili.gguf.weights import gguf_tensor_formats

        return Qwen3GraphSpec(self.config, dtype=dtype, device=device_ref, block_size=block_size,
                              weights=WeightFormat.GGUF, float_activations=float_activations,
                              tensor_formats=gguf_tensor_formats(self.gguf, self.config,
                                                                 float_activations=float_activations))

    def load_weights(self, spec: Qwen3GraphSpec) -> dict[str, Buffer]:
        if self.gguf is None:
            from mili.model.qwen3 import load_qwen3_weights

            return load_qwen3_weights(self.path, spec)
        from mili.gguf.weights import load_gguf_weights

        return load_gguf_weights(self.gguf, spec)

    def describe(self) -> str:
        """`GGUF Q4_K_M, 4.9 bits/weight` for a GGUF file; `safetensors checkpoint` for a folder."""
        if self.gguf is None:
            return "safetensors checkpoint"
        from mili.gguf.weights import file_type_summary

        return file_type_summary(self.gguf)
