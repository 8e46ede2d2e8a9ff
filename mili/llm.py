"""The offline API: a batch of prompts in, their completions out.

    from mili import LLM, SamplingParams
    llm = LLM("path/to/Qwen3", max_num_seqs=32)          # quantization="int8" or "int4" for quantized weights
    for out in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=64))

All prompts are checked first (a bad one raises before anything runs), then queued at once and run with
continuous batching; results come back in prompt order. Without `sampling_params`, the checkpoint's own
sampling defaults apply (generation_config.json; Qwen3: temperature 0.6, top_p 0.95, top_k 20); pass
`SamplingParams(temperature=0)` for greedy. Progress goes to stderr: one updating line on a terminal,
a plain line every few seconds otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from mili.engine.engine import Engine
from mili.engine.outputs import RequestOutput
from mili.engine.sampling_params import SamplingParams
from mili.engine.speculative import SpeculativeConfig
from mili.model_source import ModelSource

Message = dict[str, Any]


class Progress:
    """Finished requests and generated tokens per second, counting tokens as they are generated."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total, self.stream = total, stream or sys.stderr
        self.is_terminal = self.stream.isatty()
        self.interval_s = 0.5 if self.is_terminal else 5.0
        self.started = self.last_shown = time.monotonic()
        self.finished = self.tokens = 0

    def update(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.tokens += sum(len(c.delta_token_ids) for c in out.outputs)
            self.finished += out.finished
        now = time.monotonic()
        if now - self.last_shown >= self.interval_s:
            self.last_shown = now
            self._show(now, end="")

    def close(self) -> None:
        self._show(time.monotonic(), end="\n")

    def _show(self, now: float, end: str) -> None:
        rate = self.tokens / max(now - self.started, 1e-9)
        line = f"generated {self.finished}/{self.total} requests, {self.tokens} tokens, {rate:.1f} tokens/s"
        if self.is_terminal:
            print(f"\r{line}", end=end, file=self.stream, flush=True)
        elif end or now != self.started:
            print(line, file=self.stream, flush=True)


VLLM_SPECULATIVE_NAMES = {"model": "draft_model", "prompt_lookup_min": "ngram_min", "prompt_lookup_max": "ngram_max"}


def speculative_config(value: SpeculativeConfig | dict[str, Any]) -> SpeculativeConfig:
    """A SpeculativeConfig from itself or from a dict of its fields (vLLM's key names accepted)."""
    if isinstance(value, SpeculativeConfig):
        return value
    fields = {VLLM_SPECULATIVE_NAMES.get(key, key): item for key, item in value.items()}
    known = set(SpeculativeConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown speculative_config keys {unknown}: use {sorted(known | set(VLLM_SPECULATIVE_NAMES))}")
    return SpeculativeConfig(**fields)


class LLM:
    def __init__(self, model: str, tokenizer: str | None = None, **engine_args: Any) -> None:
        """`model`: a checkpoint folder or a GGUF file (`model="qwen3-8b-q4_k_m.gguf"`); `tokenizer`: a Hugging
        Face tokenizer folder to use instead of the model's own (vLLM's `tokenizer=`). `engine_args`: dtype
        ("auto", the default: the checkpoint's dtype on CPU, bfloat16 on GPU; or
        "float32", "bfloat16"), quantization ("none", the default, "int8" or "int4"), float_activations (4-bit
        weights meet float activations instead of int8 ones: slower, exact), device, block_size,
        num_kv_blocks or kv_cache_bytes, max_num_seqs, max_num_batched_tokens, enable_prefix_cache,
        max_model_len (see Engine.from_pretrained and EngineConfig), speculative_config (a SpeculativeConfig or a
        dict as vLLM takes it: {"method": "ngram", "num_speculative_tokens": 4} or {"method": "draft", "model":
        "path/to/small-Qwen3", ...}; off by default)."""
        spec = engine_args.pop("speculative_config", None)
        if spec is not None:
            engine_args["speculative"] = speculative_config(spec)
        self.engine = Engine.from_pretrained(ModelSource.open(model, tokenizer), **engine_args)
        self.tokenizer = self.engine.tokenizer

    def default_sampling_params(self) -> SamplingParams:
        return self.engine.default_sampling_params()

    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completions for text prompts or token-id prompts, in the order given."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or self.default_sampling_params()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        stamp = time.monotonic_ns()
        requests = [self.engine.prepare_request(f"offline-{stamp}-{i}", prompt, p)  # type: ignore[arg-type]
                    for i, (prompt, p) in enumerate(zip(prompts, per_prompt))]
        for request in requests:  # only once every prompt passed its checks
            self.engine.enqueue(request)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | None = None, enable_thinking: bool | None = None,
             use_tqdm: bool = True, tools: Sequence[dict[str, Any]] | None = None) -> list[RequestOutput]:
        """Replies to one conversation or a list of them, through the model's chat template (which shows the
        model `tools`, OpenAI-style function definitions, when given)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(list(c), enable_thinking=enable_thinking, tools=tools)
                   for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        progress = Progress(len(ids)) if show_progress else None
        try:
            while self.engine.has_unfinished() and len(results) < len(ids):
                outputs = self.engine.step()
                for out in outputs:
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                if progress is not None:
                    progress.update(outputs)
        finally:
            for request_id in ids:  # an interrupted run leaves nothing behind in the engine
                if request_id not in results:
                    self.engine.abort(request_id)
            if progress is not None:
                progress.close()
        return [results[i] for i in ids]
