"""Whole-model speed of MILI's Qwen3 graph per run configuration, beside transformers bf16 in the same run:
prefill tokens/s and batch-1 decode tokens/s.

    python -m benchmarks.model [--model DIR] [--configs float32,bfloat16,bfloat16+int8] [--prompt 512]
                               [--decode 32] [--no-transformers]

A configuration is a run dtype, with `+int8` for int8 weights (bfloat16 runs keep bf16 weights packed for
MILI's linear op; float32 runs use MAX's matmul). Without --model it uses the random-weight
Qwen3-0.6B-shaped checkpoint (`make checkpoint-0.6b` writes it once). Every engine is timed in interleaved
rounds, so all see the same machine conditions. Decode is reported with the weight bytes it streams per token:
achieved GB/s and % of the bandwidth roofline (the machine's read bandwidth, measured in the same run, over
those bytes), the number that bounds batch-1 decode. Start-up (weights + compile or compile-cache load) is
reported per configuration as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import measure
from mili.engine.batch import Batch, LogitRows, SequenceChunk
from mili.engine.model_runner import ModelRunner

TRANSFORMERS = "transformers bf16"


@dataclass
class ModelRow:
    engine: str
    startup_weights_s: float
    startup_compile_s: float
    prefill_tokens: int
    prefill_ms: float
    prefill_tok_s: float
    decode_ms: float
    decode_tok_s: float
    decode_weight_gb_s: float
    decode_roofline_share: float  # decode tok/s over read bandwidth / weight bytes per token
    decode_vs_transformers: float | None  # transformers' step time / this one's (> 1: faster)
    prefill_vs_transformers: float | None


def weight_bytes(runner: ModelRunner) -> int:
    """Bytes of weights one decode step reads (Qwen3GraphSpec.weight_bytes_per_token)."""
    return runner.spec.weight_bytes_per_token()


def transformers_bytes(model) -> int:
    """The same count for transformers: every parameter except an untied embedding table."""
    tied = model.config.tie_word_embeddings
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if tied or "embed_tokens" not in name)


class TransformersRunner:
    """transformers' Qwen3ForCausalLM in bfloat16 driven like the MILI runner: one prefill, then cached decode."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from transformers import Qwen3ForCausalLM
        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.torch = torch
        self.model = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        self.load_s = time.perf_counter() - started
        self.past = None

    def prefill(self, prompt: np.ndarray) -> float:
        start = time.perf_counter()
        with self.torch.no_grad():
            out = self.model(self.torch.from_numpy(prompt[None]), use_cache=True)
        self.past = out.past_key_values
        return time.perf_counter() - start

    def decode(self, steps: int) -> list[float]:
        times, token = [], 0
        with self.torch.no_grad():
            for _ in range(steps):
                start = time.perf_counter()
                out = self.model(self.torch.tensor([[token]]), past_key_values=self.past, use_cache=True)
                times.append(time.perf_counter() - start)
                self.past, token = out.past_key_values, int(out.logits[0, -1].argmax())
        return times


def prefill_once(runner: ModelRunner, prompt: np.ndarray, blocks: list[int]) -> float:
    start = time.perf_counter()
    runner.run(Batch.from_chunks([SequenceChunk(prompt, 0, blocks, LogitRows.LAST)], runner.block_size))
    return time.perf_counter() - start


def decode_steps(runner: ModelRunner, prompt_len: int, steps: int, blocks: list[int]) -> list[float]:
    times = []
    token = 0
    for i in range(steps):
        start = time.perf_counter()
        logits = runner.run(Batch.from_chunks([SequenceChunk([token], prompt_len + i, blocks)], runner.block_size))
        times.append(time.perf_counter() - start)
        token = int(np.argmax(logits[0]))
    return times


def parse_config(text: str) -> tuple[str, str | None]:
    """"bfloat16+int8" -> ("bfloat16", "int8"); "float32" -> ("float32", None)."""
    dtype, _, quantization = text.partition("+")
    return dtype, quantization or None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen3 checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    parser.add_argument("--configs", default="float32,bfloat16,bfloat16+int8",
                        help="comma-separated run configurations: a dtype, +int8 for int8 weights")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers bf16 (the reference peer)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill length in tokens (default 512)")
    parser.add_argument("--decode", type=int, default=32, help="decode steps per round (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--out", default="benchmarks/results/model.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    for name in ("prompt", "decode", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.model is None:
        from mili.checkpoints import cached_checkpoint  # writes the checkpoint on first use (needs transformers)
        model_dir = cached_checkpoint("qwen3-0.6b")
    else:
        model_dir = Path(args.model)
    limits = measure()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    block_size = 16
    num_blocks = -(-(args.prompt + args.decode) // block_size) + 1
    runners: dict[str, ModelRunner] = {}
    for config in configs:
        dtype, quantization = parse_config(config)
        runners[config] = ModelRunner.from_pretrained(model_dir, dtype=dtype, quantization=quantization,
                                                      num_blocks=num_blocks)
    peer = None if args.no_transformers else TransformersRunner(model_dir, limits.cores)

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 151_000, args.prompt)
    blocks = list(range(num_blocks))
    engines = list(runners) + ([] if peer is None else [TRANSFORMERS])
    prefill: dict[str, list[float]] = {e: [] for e in engines}
    decode: dict[str, list[float]] = {e: [] for e in engines}
    for runner in runners.values():  # warm-up: first executions allocate and fault in pages
        prefill_once(runner, prompt, blocks)
        decode_steps(runner, args.prompt, 2, blocks)
    if peer is not None:
        peer.prefill(prompt)
        peer.decode(2)
    for round_index in range(args.repeats):
        for name, runner in runners.items():
            prefill[name].append(prefill_once(runner, prompt, blocks))
            decode[name].extend(decode_steps(runner, args.prompt, args.decode, blocks))
        if peer is not None:
            prefill[TRANSFORMERS].append(peer.prefill(prompt))
            decode[TRANSFORMERS].extend(peer.decode(args.decode))
        print(f"round {round_index + 1}/{args.repeats} done", flush=True)

    limits = limits.best_of(measure())
    medians = {e: (statistics.median(prefill[e]), statistics.median(decode[e])) for e in engines}
    rows = []
    for name in engines:
        prefill_s, step_s = medians[name]
        if name == TRANSFORMERS:
            nbytes, weights_s, compile_s = transformers_bytes(peer.model), peer.load_s, 0.0
        else:
            runner = runners[name]
            nbytes, weights_s, compile_s = weight_bytes(runner), runner.startup.weights_s, runner.startup.compile_s
        peer_medians = medians.get(TRANSFORMERS)
        rows.append(ModelRow(
            engine=name, startup_weights_s=weights_s, startup_compile_s=compile_s,
            prefill_tokens=args.prompt, prefill_ms=prefill_s * 1e3, prefill_tok_s=args.prompt / prefill_s,
            decode_ms=step_s * 1e3, decode_tok_s=1 / step_s, decode_weight_gb_s=nbytes / step_s / 1e9,
            decode_roofline_share=nbytes / step_s / 1e9 / limits.read_gb_s,
            decode_vs_transformers=None if peer_medians is None else peer_medians[1] / step_s,
            prefill_vs_transformers=None if peer_medians is None else peer_medians[0] / prefill_s,
        ))
    print(f"\n{limits.describe()}")
    print(f"{'engine':18s} {'weights s':>9s} {'compile s':>9s} {'prefill tok/s':>13s} {'vs HF':>6s} "
          f"{'decode tok/s':>12s} {'GB/s':>6s} {'roofline':>8s} {'vs HF':>6s}")
    for r in rows:
        vs_prefill = f"{r.prefill_vs_transformers:5.2f}x" if r.prefill_vs_transformers else "     -"
        vs_decode = f"{r.decode_vs_transformers:5.2f}x" if r.decode_vs_transformers else "     -"
        print(f"{r.engine:18s} {r.startup_weights_s:9.1f} {r.startup_compile_s:9.1f} {r.prefill_tok_s:13.1f} "
              f"{vs_prefill} {r.decode_tok_s:12.2f} {r.decode_weight_gb_s:6.1f} {r.decode_roofline_share:8.0%} "
              f"{vs_decode}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model_dir), "repeats": args.repeats, "machine": limits.as_dict(),
                               "note": "medians over interleaved rounds; decode at batch 1 after the prefill; "
                                       "roofline = read bandwidth / weight bytes per token",
                               "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
