"""MILI: a serving engine for Qwen3 language models on Modular's MAX."""

from mili.config import ConfigError, GenerationConfig, ModelConfig
from mili.engine.sampling_params import SamplingParams
from mili.engine.structured_output import StructuredOutput
from mili.llm import LLM
from mili.tokenizer import Tokenizer, TokenizerError
from mili.weights import CheckpointError, load_weights

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "GenerationConfig",
    "LLM",
    "ModelConfig",
    "SamplingParams",
    "StructuredOutput",
    "Tokenizer",
    "TokenizerError",
    "load_weights",
]
