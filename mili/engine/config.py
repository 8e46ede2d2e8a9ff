"""EngineConfig: how much the engine batches, and how long a sequence may grow."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mili.engine.scheduler import SchedulerConfig
from mili.engine.speculative import SpeculativeConfig

log = logging.getLogger(__name__)


class ContextTooLong(ValueError):
    """The asked-for context (`max_model_len`) cannot be served: beyond the model, or the KV cache."""


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_cache: bool = True
    debug_checks: bool = False  # audit the block bookkeeping whenever the engine goes idle
    max_model_len: int | None = None  # context limit (prompt + output); default: what model and cache allow
    speculative: SpeculativeConfig | None = None  # speculative decoding (off by default)

    def scheduler_config(self, block_size: int) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens, block_size)

    def context_limit(self, model_positions: int, kv_capacity_tokens: int) -> int:
        """The context every sequence may reach. A sequence must always fit in the KV cache alone (or the
        scheduler could never finish it), so an explicit `max_model_len` beyond the cache is refused, and
        the model's own limit is capped at the cache's size with a warning that says what to change."""
        if self.max_model_len is not None:
            if self.max_model_len > model_positions:
                raise ContextTooLong(f"max_model_len (--max-model-len) is {self.max_model_len}, beyond this "
                                     f"model's {model_positions} positions")
            if self.max_model_len > kv_capacity_tokens:
                raise ContextTooLong(f"max_model_len (--max-model-len) is {self.max_model_len} tokens, but the KV "
                                     f"cache holds only {kv_capacity_tokens}: raise --kv-cache-memory or lower "
                                     f"--max-model-len")
            return self.max_model_len
        if kv_capacity_tokens < model_positions:
            log.warning("the KV cache holds %d tokens, fewer than the model's %d-token context: capping the context "
                        "(prompt + output) at %d tokens; raise --kv-cache-memory for longer ones",
                        kv_capacity_tokens, model_positions, kv_capacity_tokens)
            return kv_capacity_tokens
        return model_positions
