"""transformers (torch CPU) as a benchmark worker (see protocol.py): `python transformers_worker.py MODEL_DIR DTYPE
THREADS BATCH` in its own venv. Offline requests run as batched `generate` calls of BATCH prompts, sorted by
length and left-padded; a batch generates its longest max_tokens and each request counts only its own."""

from __future__ import annotations

import sys
from typing import Any

from protocol import serve


class TransformersWorker:
    def __init__(self, model: str, dtype: str, threads: int, batch: int):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(threads)
        self.torch, self.batch = torch, batch
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def facts(self) -> dict[str, Any]:
        import transformers
        tied = self.model.config.tie_word_embeddings
        weight_bytes = sum(p.numel() * p.element_size() for name, p in self.model.named_parameters()
                           if tied or "embed_tokens" not in name)
        return {"weight_bytes": weight_bytes, "version": transformers.__version__,
                "torch": self.torch.__version__}

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> int:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        produced = 0
        for start in range(0, len(order), self.batch):
            chosen = order[start:start + self.batch]
            width = max(len(prompts[i]) for i in chosen)
            ids = self.torch.zeros((len(chosen), width), dtype=self.torch.long)
            mask = self.torch.zeros((len(chosen), width), dtype=self.torch.long)
            for row, i in enumerate(chosen):  # left padding, as decoder-only generation wants
                ids[row, width - len(prompts[i]):] = self.torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            new = max(max_tokens[i] for i in chosen)
            with self.torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, pad_token_id=0)
            produced += sum(min(max_tokens[i], out.shape[1] - width) for i in chosen)
        return produced


if __name__ == "__main__":
    model, dtype, threads, batch = sys.argv[1:5]
    serve(lambda: TransformersWorker(model, dtype, int(threads), int(batch)))
