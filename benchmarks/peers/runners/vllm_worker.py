"""vLLM's CPU build as a benchmark worker (see protocol.py): `python vllm_worker.py MODEL_DIR DTYPE PREFIX_CACHE` in
vLLM's venv, through its offline API (vllm.LLM). Threads and KV space come from the environment the driver sets
(VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_KVCACHE_SPACE)."""

from __future__ import annotations

import sys
from typing import Any

from protocol import serve


class VllmWorker:
    def __init__(self, model: str, dtype: str, prefix_cache: bool):
        from vllm import LLM
        self.llm = LLM(model=model, dtype=dtype, max_model_len=2048, enable_prefix_caching=prefix_cache, seed=0)

    def facts(self) -> dict[str, Any]:
        import vllm
        return {"version": vllm.__version__}

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)


if __name__ == "__main__":  # vLLM's engine core is a child process: the guard is required
    model, dtype, prefix_cache = sys.argv[1:4]
    serve(lambda: VllmWorker(model, dtype, prefix_cache == "1"))
