"""Where a batch-1 decode step's (or a prefill's) time goes: the whole step, then the same graph with its linear
layers (every projection and the LM head) replaced by a broadcast of one input column, then with attention
replaced by its input as well. The differences are what the linear layers and attention cost inside the real
step (caches as the real step leaves them: the weight stream evicts the KV cache), and the remainder is
everything else (norms, RoPE, KV store, SwiGLU, MAX's dispatch, the host).

    python -m benchmarks.step [--model DIR|FILE.gguf] [--dtype bfloat16] [--quantization int8|int4] [--context 512]
                              [--rounds 6] [--steps 16] [--prefill TOKENS]

With --prefill, each round times one prefill of that many tokens (from position 0, the last token's logits)
per variant instead of decode steps, and the parts are reported in GFLOP/s.

The ablated graphs compute garbage, only their timing is used. All three run in interleaved rounds (the
machine is shared and noisy), medians of every step. Linear layers are reported with their weight bytes per
token and achieved GB/s, attention with its K/V bytes per token and GB/s, both as shares of the machine's read
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from max.graph import TensorValue, ops

from benchmarks.machine import measure
from benchmarks.model import decode_steps, prefill_once, weight_bytes
from mili.engine.model_runner import ModelRunner
from mili.quantization import QUANTIZATIONS
from mili.model import ops as mili_ops
from mili.model import packed_linear, qwen3

VARIANTS = ("whole step", "no linear layers", "no linear layers, no attention")


def _broadcast_column(x: TensorValue, out_features, out_dtype=None) -> TensorValue:
    """[M, K] -> [M, out_features] copies of column 0: the shape of a projection's output at almost no cost."""
    y = ops.broadcast_to(ops.slice_tensor(x, [slice(None), slice(0, 1)]), [x.shape[0], out_features])
    return ops.cast(y, out_dtype or x.dtype)


@contextlib.contextmanager
def ablated(variant: str) -> Iterator[None]:
    """While building a graph: linear layers and/or attention swapped for cheap stand-ins of the same shape."""
    saved = packed_linear.linear, qwen3._linear, mili_ops.paged_attention
    if variant != VARIANTS[0]:
        packed_linear.linear = lambda x, weight, shape, out_features, out_dtype=None: (
            _broadcast_column(x, out_features, out_dtype))
        qwen3._linear = lambda x, weight, in_out: _broadcast_column(x, weight.shape[1 if in_out else 0])
    if variant == VARIANTS[2]:
        mili_ops.paged_attention = lambda cache, q, *args: q
    try:
        yield
    finally:
        packed_linear.linear, qwen3._linear, mili_ops.paged_attention = saved


def kv_bytes(runner: ModelRunner, context: int) -> int:
    """K and V bytes one decode step reads at this context, over every layer."""
    c = runner.spec.config
    return c.num_hidden_layers * 2 * context * c.num_key_value_heads * c.head_dim * runner.spec.dtype.size_in_bytes


def split_by_ablation(ms: dict[str, float], linear_work: float,
                      attention_work: float) -> list[tuple[str, float, float]]:
    """(part, ms, work) for the linear layers, attention and the rest, from the median times of the variants."""
    return [("linear layers", ms[VARIANTS[0]] - ms[VARIANTS[1]], linear_work),
            ("attention", ms[VARIANTS[1]] - ms[VARIANTS[2]], attention_work),
            ("everything else", ms[VARIANTS[2]], 0.0)]


def prefill_flops(runner: ModelRunner, tokens: int) -> tuple[float, float]:
    """(linear, attention) floating-point operations of a causal prefill of `tokens` tokens from position 0 that
    computes the last token's logits."""
    c = runner.spec.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    linear = 2 * tokens * c.num_hidden_layers * per_layer + 2 * c.hidden_size * c.vocab_size
    attention = c.num_hidden_layers * 4 * q * tokens * (tokens + 1) / 2
    return linear, attention


def prefill_breakdown(runners: dict[str, ModelRunner], args: argparse.Namespace, limits, blocks: list[int]) -> None:
    prompt = np.random.default_rng(1).integers(0, runners[VARIANTS[0]].spec.config.vocab_size, args.prefill)
    for runner in runners.values():
        prefill_once(runner, prompt, blocks)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        for variant, runner in runners.items():
            times[variant].append(prefill_once(runner, prompt, blocks))
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    runner = runners[VARIANTS[0]]
    linear, attention = prefill_flops(runner, args.prefill)
    parts = split_by_ablation(ms, linear, attention)
    print(f"\n{limits.describe()}")
    print(f"{runner.spec.dtype.name} activations, {runner.weight_format.value} weights: prefill of {args.prefill} "
          f"tokens {ms[VARIANTS[0]]:.1f} ms ({args.prefill / ms[VARIANTS[0]] * 1e3:.0f} tok/s)")
    print(f"{'part':16s} {'ms':>8s} {'share':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s}")
    for name, part_ms, flops in parts:
        rate = f"{flops / 1e9:7.1f} {flops / part_ms / 1e6:8.0f}" if flops and part_ms > 0 else ""
        print(f"{name:16s} {part_ms:8.1f} {part_ms / ms[VARIANTS[0]]:6.0%} {rate}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Qwen3 checkpoint folder (default: the random Qwen3-0.6B-shaped one)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="run dtype")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none", help="weight quantization")
    parser.add_argument("--context", type=int, default=512, help="tokens in the cache before the timed steps")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (default 6)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per variant per round (default 16)")
    parser.add_argument("--prefill", type=int, default=0,
                        help="time a prefill of this many tokens instead of decode steps")
    args = parser.parse_args(argv)
    for name in ("context", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.prefill < 0:
        parser.error("--prefill must be a number of tokens (0: time decode steps)")
    if args.model is None:
        from mili.checkpoints import cached_checkpoint  # writes the checkpoint on first use (needs transformers)
        model_dir = cached_checkpoint("qwen3-0.6b")
    else:
        model_dir = Path(args.model)
    quantization = None if args.quantization == "none" else args.quantization
    block_size = 16
    num_blocks = -(-(max(args.context, args.prefill) + args.rounds * args.steps + 8) // block_size) + 1
    runners: dict[str, ModelRunner] = {}
    for variant in VARIANTS:
        print(f"building the graph: {variant}...", flush=True)
        with ablated(variant):
            runners[variant] = ModelRunner.from_pretrained(model_dir, dtype=args.dtype, quantization=quantization,
                                                           num_blocks=num_blocks)
    limits = measure()
    blocks = list(range(num_blocks))
    if args.prefill:  # its own warm-up: the decode set-up below would only cost time
        prefill_breakdown(runners, args, limits, blocks)
        return
    prompt = np.random.default_rng(0).integers(0, runners[VARIANTS[0]].spec.config.vocab_size, args.context)
    for runner in runners.values():
        prefill_once(runner, prompt, blocks)
        decode_steps(runner, args.context, 2, blocks)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_index in range(args.rounds):
        for variant, runner in runners.items():
            # Every round decodes at the same positions, so the context stays args.context (+ steps).
            times[variant] += decode_steps(runner, args.context, args.steps, blocks)
        print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    limits = limits.best_of(measure())

    step = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    runner = runners[VARIANTS[0]]
    parts = split_by_ablation(step, weight_bytes(runner), kv_bytes(runner, args.context))
    print(f"\n{limits.describe()}")
    print(f"{runner.spec.dtype.name} activations, {runner.weight_format.value} weights, context {args.context}: "
          f"decode step {step[VARIANTS[0]]:.2f} ms ({1e3 / step[VARIANTS[0]]:.2f} tok/s)")
    print(f"{'part':16s} {'ms':>7s} {'share':>6s} {'MB/token':>9s} {'GB/s':>6s} {'of read bw':>10s}")
    for name, ms, nbytes in parts:
        rate = nbytes / ms / 1e6 if nbytes and ms > 0 else None
        print(f"{name:16s} {ms:7.2f} {ms / step[VARIANTS[0]]:6.0%} "
              + (f"{nbytes / 1e6:9.1f} {rate:6.1f} {rate / limits.read_gb_s:10.0%}" if rate else ""))


if __name__ == "__main__":
    main()
