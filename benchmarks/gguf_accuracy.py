"""How close MILI runs a GGUF file to the file's own values, with llama.cpp beside it: mean KL divergence and top-1
agreement of the next-token distributions at 511 positions of varied text, against transformers loading the same
file (gguf-py's dequantization, float32).

    python -m benchmarks.gguf_accuracy [--model DIR] [--format Q4_K_M] [--context 1024]
    make bench-gguf-accuracy      (after `make bench-peers-setup`)

The text is the docstrings of a fixed list of Python standard-library modules (prose, code and tables; English).
llama.cpp's `llama-perplexity --kl-divergence-base` tokenizes it, runs the file over the first `--context` tokens
and saves its log-probabilities at positions context/2 .. context-2 (as 16-bit steps of 16/65535 nats below the top,
rounding that moves a KL by ~1e-8) with the tokens; transformers and MILI run those very tokens. MILI runs in
three ways: float32 with float activations (the exact path, `--float-activations`), float32 with activations
quantized to int8 (the 4- and 6-bit tensors' default) and bfloat16 with int8 activations (what `mili serve` runs).
The issue's bars: float activations KL <= 1e-5 and every greedy token the same; int8 activations no worse than
llama.cpp's KL against the same reference.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import measure
from benchmarks.peers import arguments, llama_cpp
from benchmarks.peers.engines import THREADS
from benchmarks.peers.home import PeerHome
from benchmarks.report import RunRecord, markdown_table

TEXT_MODULES = ("argparse", "json", "csv", "difflib", "heapq", "decimal", "fractions", "statistics", "textwrap",
                "zipfile", "asyncio", "subprocess", "datetime", "collections", "functools", "itertools", "re",
                "string", "pathlib", "logging", "unittest", "typing", "sqlite3", "http.server", "email", "tarfile")
MILI_RUNS = (("float32", True), ("float32", False), ("bfloat16", False))  # (run dtype, float activations)


@dataclass
class AccuracyRow:
    engine: str
    positions: int
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float


def varied_text() -> str:
    """The docstrings of TEXT_MODULES, and of their public classes and functions, in a fixed order."""
    parts = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attribute in sorted(vars(module)):
            value = getattr(module, attribute)
            if not attribute.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)):
                parts.append(f"{name}.{attribute}: {inspect.getdoc(value) or ''}")
    return "\n\n".join(p for p in parts if p)


@dataclass
class LlamaLogProbs:
    tokens: np.ndarray  # the first chunk's tokens [context]
    first: int  # the first scored position: log_probs[i] is the distribution after tokens[first + i]
    log_probs: np.ndarray  # [context - 1 - first, vocab] float64


def read_kld_base(path: Path, vocab_size: int) -> LlamaLogProbs:
    """llama-perplexity's --kl-divergence-base file: "_logits_", n_ctx, n_vocab, n_chunk (int32), the tokens
    [n_chunk * n_ctx] (int32), then per scored position 2 * ceil(n_vocab / 2) + 4 uint16: a float32 scale and
    minimum log-probability, then each token's log-probability as (value - minimum) / scale (0: at or below
    the minimum, 16 nats under the top)."""
    data = path.read_bytes()
    if data[:8] != b"_logits_":
        raise ValueError(f"{path} is not a llama-perplexity log-probability file")
    n_ctx, n_vocab, n_chunk = np.frombuffer(data, np.int32, 3, 8)
    if n_vocab < vocab_size:
        raise ValueError(f"{path}: {n_vocab} tokens, the model has {vocab_size}")
    at = 20
    tokens = np.frombuffer(data, np.int32, n_chunk * n_ctx, at)[:n_ctx]
    at += 4 * n_chunk * n_ctx
    first = n_ctx // 2
    scored = n_ctx - 1 - first
    stride = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(data, np.uint16, scored * stride, at).reshape(scored, stride)
    scale_and_min = rows[:, :4].copy().view(np.float32)
    values = rows[:, 4:4 + n_vocab].astype(np.float64)
    log_probs = scale_and_min[:, :1].astype(np.float64) * values + scale_and_min[:, 1:2].astype(np.float64)
    return LlamaLogProbs(tokens.astype(np.int64), first, log_probs[:, :vocab_size])


def llama_log_probs(path: Path, text: str, context: int, vocab_size: int) -> LlamaLogProbs:
    perplexity = llama_cpp.tool("llama-perplexity")
    if not perplexity.exists():
        raise SystemExit("benchmarks.gguf_accuracy: llama-perplexity is not built; run `python -m "
                         "benchmarks.peers.setup --only llama.cpp --force` (it builds it beside llama-bench)")
    with tempfile.TemporaryDirectory() as folder:
        text_file, base = Path(folder) / "text.txt", Path(folder) / "base.kld"
        text_file.write_text(text)
        print(f"llama.cpp: log-probabilities of {path.name} (llama-perplexity, {context} tokens) ...", flush=True)
        result = subprocess.run([str(perplexity), "-m", str(path), "-f", str(text_file), "-c", str(context),
                                 "-b", str(context), "--chunks", "1", "-t", str(THREADS),
                                 "--kl-divergence-base", str(base)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"llama-perplexity failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        return read_kld_base(base, vocab_size)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(engine: str, log_q: np.ndarray, log_p: np.ndarray) -> AccuracyRow:
    """KL(reference p || engine q) per position, and how often their top tokens agree."""
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    agreement = float(np.mean(log_p.argmax(axis=-1) == log_q.argmax(axis=-1)))
    return AccuracyRow(engine, len(kl), float(kl.mean()), float(np.quantile(kl, 0.99)), float(kl.max()), agreement)


def reference_log_probs(path: Path, tokens: np.ndarray, first: int) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    print(f"transformers: loading {path.name} (gguf-py dequantizes it to float32) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    print("transformers: running the chunk ...", flush=True)
    with torch.no_grad():
        logits = model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()
    return log_softmax(logits[first:-1])


def mili_log_probs(path: Path, tokens: np.ndarray, first: int, dtype: str, float_activations: bool) -> np.ndarray:
    from mili.engine.batch import Batch, LogitRows, SequenceChunk
    from mili.engine.model_runner import ModelRunner

    print(f"MILI: {dtype}, {'float' if float_activations else 'int8'} activations ...", flush=True)
    runner = ModelRunner.from_pretrained(path, dtype=dtype, num_blocks=-(-len(tokens) // 16) + 1,
                                         float_activations=float_activations)
    blocks = list(range(-(-len(tokens) // runner.block_size)))
    logits = runner.run(Batch.from_chunks([SequenceChunk(tokens, 0, blocks, LogitRows.ALL)], runner.block_size))
    return log_softmax(logits[first:-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", default="Q4_K_M", help="GGUF type llama-quantize makes (default Q4_K_M)")
    parser.add_argument("--context", type=int, default=1024,
                        help="tokens run; the last half (less one) are scored (default 1024: 511 positions)")
    arguments.add_common(parser, (), "gguf-accuracy")
    args = parser.parse_args(argv)
    arguments.at_least_one(parser, args, "context")
    model = arguments.checkpoint(args)
    if reason := PeerHome("llama.cpp").unavailable_reason():
        raise SystemExit(f"benchmarks.gguf_accuracy: llama.cpp is not set up ({reason}); run `make "
                         f"bench-peers-setup`")
    record = RunRecord(f"GGUF accuracy ({args.format}), MILI and llama.cpp vs transformers", str(model), measure(),
                       method=(f"llama.cpp's converter and llama-quantize made the file; {args.context} tokens of "
                               f"standard-library docstrings as llama.cpp tokenizes them, KL(transformers float32 "
                               f"|| engine) of the next-token distributions at positions {args.context // 2} .. "
                               f"{args.context - 2}"))
    path = llama_cpp.gguf(model, args.format)
    from mili.model_source import ModelSource

    vocab_size = ModelSource.open(path).config.vocab_size
    llama = llama_log_probs(path, varied_text(), args.context, vocab_size)
    reference = reference_log_probs(path, llama.tokens, llama.first)
    rows = [compare(f"llama.cpp {args.format}", llama.log_probs, reference)]
    for dtype, float_activations in MILI_RUNS:
        name = f"MILI {dtype}, {'float' if float_activations else 'int8'} activations"
        rows.append(compare(name, mili_log_probs(path, llama.tokens, llama.first, dtype, float_activations),
                            reference))
    record.finish()
    print("\n" + record.header() + "\n")
    print(markdown_table(["engine", "positions", "KL mean", "KL p99", "KL max", "top-1 agreement"],
                         [[r.engine, str(r.positions), f"{r.kl_mean:.3g}", f"{r.kl_p99:.3g}", f"{r.kl_max:.3g}",
                           f"{r.top1_agreement:.3f}"] for r in rows]))
    out = record.write([asdict(r) for r in rows], args.out, {"format": args.format, "context": args.context})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
