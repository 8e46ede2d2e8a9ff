"""The offline API: a batch of prompts in, their completions out.

    from mili import LLM, SamplingParams
    llm = LLM("path/to/Qwen3", max_num_seqs=32)
    for out in llm.generate(["Hello", "The capital of France is"], SamplingParams(max_tokens=32)):
        print(out.outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=64))

All prompts are queued at once and run with continuous batching; results come back in prompt order.
A progress line on stderr shows finished requests and generated tokens per second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from mili.engine.engine import Engine, RequestOutput
from mili.engine.sampling_params import SamplingParams

Message = dict[str, Any]
PROGRESS_INTERVAL_S = 0.5


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        """`engine_args`: dtype, device, block_size, num_kv_blocks or kv_cache_bytes, max_num_seqs,
        max_num_batched_tokens, enable_prefix_cache (see Engine.from_pretrained and EngineConfig)."""
        self.engine = Engine.from_pretrained(model, **engine_args)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completions for text prompts or token-id prompts, in the order given."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        ids = [f"offline-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, per_prompt):
            self.engine.add_request(request_id, prompt, p)  # type: ignore[arg-type]
        return self._run(ids, use_tqdm)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             sampling_params: SamplingParams | None = None, enable_thinking: bool | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Replies to one conversation or a list of them, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(list(c), enable_thinking=enable_thinking)
                   for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], show_progress: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        started = last_report = time.monotonic()
        generated = 0
        while len(finished) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    generated += sum(len(c.token_ids) for c in out.outputs)
            now = time.monotonic()
            if show_progress and (now - last_report >= PROGRESS_INTERVAL_S or len(finished) == len(ids)):
                last_report = now
                rate = generated / max(now - started, 1e-9)
                print(f"\rgenerated {len(finished)}/{len(ids)} requests, {rate:.1f} tokens/s", end="",
                      file=sys.stderr, flush=True)
        if show_progress:
            print(file=sys.stderr)
        return [finished[i] for i in ids]
