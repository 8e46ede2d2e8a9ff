"""MILI as a benchmark worker (see protocol.py): `python mili_worker.py MODEL DTYPE QUANTIZATION KV_BYTES
PREFIX_CACHE` in MILI's own environment, through its offline API (mili.LLM); MODEL is a checkpoint folder or a GGUF
file."""

from __future__ import annotations

import resource
import sys
from typing import Any

from protocol import serve

from mili import LLM, SamplingParams


class MiliWorker:
    def __init__(self, model: str, dtype: str, quantization: str, kv_cache_bytes: int, prefix_cache: bool):
        self.llm = LLM(model, dtype=dtype, quantization=None if quantization == "none" else quantization,
                       kv_cache_bytes=kv_cache_bytes, enable_prefix_cache=prefix_cache, max_num_seqs=256)

    def facts(self) -> dict[str, Any]:
        from benchmarks.model import weight_bytes
        runner = self.llm.engine.runner
        return {"weight_bytes": weight_bytes(runner), "compile_s": runner.startup.compile_s,
                "weights_s": runner.startup.weights_s,
                # the peak resident memory of the loaded model, KV cache allocated (Linux reports KiB)
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> int:
        params = [SamplingParams.greedy(max_tokens=n, ignore_eos=True) for n in max_tokens]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)


if __name__ == "__main__":
    model, dtype, quantization, kv_bytes, prefix_cache = sys.argv[1:6]
    serve(lambda: MiliWorker(model, dtype, quantization, int(kv_bytes), prefix_cache == "1"))
