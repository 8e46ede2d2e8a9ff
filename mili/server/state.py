"""The server's settings and its one piece of mutable state (the engine, counters, metrics)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mili.engine.async_engine import AsyncEngine
from mili.engine.outputs import RequestOutput
from mili.server.metrics import ServerMetrics


@dataclass
class ServerSettings:
    model_name: str
    model_path: str = ""               # the checkpoint folder or GGUF file served (routers read it from /server_info)
    tokenizer_path: str = ""           # where the tokenizer comes from (model_path unless --tokenizer)
    model_format: str = ""             # "safetensors checkpoint" or "GGUF Q4_K_M, 4.9 bits/weight"
    device: str = "cpu"
    dtype: str = "float32"             # the run dtype (activations and KV cache), resolved
    weights: str = "dense"             # the weight format: dense, bf16 (packed), int8, int4, gguf (WeightFormat)
    weight_group_size: int | None = None  # int8 / int4: inputs per scale; None otherwise
    activations: str = "float32"       # what the linear layers' weights meet: "int8" (4/6-bit weights) or the dtype
    weight_bytes_per_token: int = 0    # the weight bytes one decode step reads (all but an untied embedding)
    api_key: str | None = None
    max_queue: int = 256               # requests in flight beyond this get 429
    max_body_bytes: int = 4 << 20
    reasoning_parser: str | None = None      # "qwen3": think blocks go to reasoning_content (None: left in content)
    tool_call_parser: str | None = "hermes"  # None: requests with tools are refused


@dataclass
class ServerState:
    settings: ServerSettings
    engine: AsyncEngine | None = None  # None while the model loads
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    requests_seen: int = 0
    prompt_tokens_seen: int = 0
    cached_tokens_seen: int = 0

    def attach(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.metrics.watch(engine.engine)

    @property
    def health(self) -> str:
        """"ok", "loading", "draining" (shutting down) or "dead" (the engine loop stopped)."""
        if self.engine is None:
            return "loading"
        if self.engine.is_accepting:
            return "ok"
        return "draining" if self.engine.is_running else "dead"

    def record(self, out: RequestOutput) -> None:
        """Counts a finished request."""
        self.metrics.observe(out)
        self.requests_seen += 1
        self.prompt_tokens_seen += len(out.prompt_token_ids)
        self.cached_tokens_seen += out.metrics.cached_tokens
