"""Batch-1 latency of MILI and its peers on one checkpoint, per engine and weight format, in one run: prefill of
a 512-token prompt and greedy decode of 128 tokens after it.

    python -m benchmarks.latency [--model DIR] [--prompt 512] [--decode 128] [--rounds 3]
                                 [--engines mili,vllm,transformers,llama.cpp]
    make bench-latency        (after `make bench-peers-setup`)

Engines and formats: MILI float32 / bfloat16 / int8 / int4 (`--quantization`), MILI on llama.cpp's Q4_0 and Q4_K_M
files (the files llama.cpp runs, as stored), transformers bf16 / fp32, vLLM bf16 (and fp32 where the CPU has no bf16
dot products), llama.cpp BF16 / Q8_0 / Q4_0 / Q4_K_M. Every engine is loaded once, warmed up with one
untimed measurement, then timed in interleaved rounds (A B C A B C); the table shows medians. Decode tokens/s
comes with the weight bytes one token reads, the achieved GB/s and its share of the machine's read bandwidth
measured in the same run (the batch-1 decode roofline).
Without --model it uses the random-weight Qwen3-0.6B-shaped checkpoint (`make checkpoint-0.6b`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import measure
from benchmarks.peers import arguments, llama_cpp
from benchmarks.peers.engines import (
    MILI_CONFIGS,
    batched_peer_dtype,
    checkpoint_weight_bytes,
    mili_gguf_worker,
    mili_worker,
    runnable,
    transformers_worker,
    vllm_worker,
)
from benchmarks.peers.home import PeerHome
from benchmarks.peers.rounds import interleaved
from benchmarks.peers.servers import unwind_on_sigterm
from benchmarks.peers.spotlight import Spotlight
from benchmarks.peers.workers import WorkerProcess, WorkerSpec, start_all
from benchmarks.report import RunRecord, markdown_table

ENGINES = ("mili", "vllm", "transformers", "llama.cpp")
# the decode comparisons the table makes: the same bits, or the same file
EQUAL_BITS = {"MILI bfloat16": "llama.cpp BF16", "MILI int8": "llama.cpp Q8_0", "MILI int4": "MILI int8",
              "MILI GGUF Q4_0": "llama.cpp Q4_0", "MILI GGUF Q4_K_M": "llama.cpp Q4_K_M"}
MILI_GGUF_FORMATS = ("Q4_0", "Q4_K_M")  # files MILI runs beside llama.cpp (needs llama.cpp's converter)


@dataclass
class Contender:
    """One engine in one weight format: how to take one measurement, and the weight bytes a token reads."""
    name: str
    weight_bytes: int
    measure: Callable[[], tuple[float, float]]  # -> (prefill seconds, decode seconds per token)
    startup_s: float | None = None


@dataclass
class LatencyRow:
    engine: str
    weight_gb: float
    startup_s: float | None
    prefill_tok_s: float
    decode_tok_s: float
    decode_gb_s: float
    roofline_share: float  # decode GB/s over the machine's read bandwidth
    prefill_ms_samples: list[float]
    decode_ms_samples: list[float]


def worker_contender(worker: WorkerProcess, prompt: list[int], decode: int, weight_bytes: int) -> Contender:
    def once() -> tuple[float, float]:
        reply = worker.call("latency", prompt=prompt, decode=decode)
        return reply["prefill_s"], reply["decode_s"]
    return Contender(worker.spec.name, weight_bytes, once, worker.facts["startup_s"])


def llama_contenders(model: Path, prompt: int, decode: int, skipped: dict[str, str]) -> list[Contender]:
    contenders = []
    for fmt in llama_cpp.FORMATS:
        name = f"llama.cpp {fmt}"
        try:
            path = llama_cpp.gguf(model, fmt)
        except RuntimeError as error:
            skipped[name] = str(error).splitlines()[0]
            print(f"  {name}: skipped: {error}", file=sys.stderr)
            continue

        def once(path: Path = path) -> tuple[float, float]:
            result = llama_cpp.bench(path, prompt, decode)
            return result.prefill_s, result.decode_s
        # a GGUF's tensors are what a token reads (a tied embedding is the output head); metadata is ~10 MB
        contenders.append(Contender(name, path.stat().st_size, once))
    return contenders


def mili_gguf_specs(model: Path, kv_bytes: int, skipped: dict[str, str]) -> list[WorkerSpec]:
    """MILI workers for llama.cpp's 4-bit files of the checkpoint (made by llama.cpp's converter and quantizer)."""
    names = [f"MILI GGUF {fmt}" for fmt in MILI_GGUF_FORMATS]
    if reason := PeerHome("llama.cpp").unavailable_reason():
        skipped.update({name: f"llama.cpp makes the file: {reason}" for name in names})
        return []
    specs = []
    for name, fmt in zip(names, MILI_GGUF_FORMATS, strict=True):
        try:
            specs.append(mili_gguf_worker(llama_cpp.gguf(model, fmt), fmt, kv_bytes))
        except RuntimeError as error:
            skipped[name] = str(error).splitlines()[0]
    return specs


def run_rounds(contenders: list[Contender], workers: dict[str, WorkerProcess], rounds: int,
               record: RunRecord) -> dict[str, list[tuple[float, float]]]:
    """Every contender timed in interleaved rounds after an untimed warm-up (the workers closed after), then the
    machine measured again into the record, which is finished: (prefill s, decode s per token) samples by name."""
    try:
        samples = interleaved({c.name: lambda _warm_up, c=c: c.measure() for c in contenders}, rounds,
                              record.skipped, spotlight=Spotlight(workers))
    finally:
        for worker in workers.values():
            worker.close()
    record.machine = record.machine.best_of(measure())
    record.finish()
    return samples


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(median prefill s, median decode s per token)."""
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--decode", type=int, default=128, help="greedy tokens decoded after it (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    arguments.add_common(parser, ENGINES, "latency")
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # and workers: the `finally` closes them
    engines = arguments.chosen_engines(parser, args, ENGINES)
    arguments.at_least_one(parser, args, "prompt", "decode", "rounds")
    model = arguments.checkpoint(args)
    record = RunRecord("batch-1 latency", str(model), measure(), method=(
        f"prefill of {args.prompt} tokens, then {args.decode} greedy tokens (EOS ignored) at batch 1; one untimed "
        f"warm-up each, then {args.rounds} interleaved rounds, medians; no prefix cache"))
    prompt = np.random.default_rng(0).integers(0, 151_000, args.prompt).tolist()
    kv_bytes = 256 << 20

    specs = []
    for config in MILI_CONFIGS if "mili" in engines else ():
        specs.append(mili_worker(model, config, kv_bytes))
    if "mili" in engines:
        specs += mili_gguf_specs(model, kv_bytes, record.skipped)
    if "vllm" in engines:
        vllm_specs = [vllm_worker(model, 1, "bfloat16")]
        if batched_peer_dtype() == "float32":  # bf16 is emulated here: its fp32 build may prefill faster
            vllm_specs.append(vllm_worker(model, 1, "float32"))
        else:
            record.skipped["vLLM fp32"] = (
                "not run where the CPU has bf16 dot products: vLLM bf16 is faster in both phases, and fp32's ~6 GB "
                "worker beside every other engine ran a 24 GiB machine out of memory")
        specs += runnable("vllm", vllm_specs, record.skipped)
    if "transformers" in engines:
        specs += runnable("transformers", [transformers_worker(model, "bfloat16"),
                                           transformers_worker(model, "float32")], record.skipped)
    workers = start_all(specs, record.skipped)
    contenders = []
    for worker in workers.values():
        # vLLM reports no weight bytes: its checkpoint's parameters at the row's dtype
        bytes_per_param = 4 if "fp32" in worker.spec.name else 2
        nbytes = worker.facts.get("weight_bytes") or checkpoint_weight_bytes(model, bytes_per_param)
        contenders.append(worker_contender(worker, prompt, args.decode, nbytes))
    if "llama.cpp" in engines:
        if reason := PeerHome("llama.cpp").unavailable_reason():
            record.skipped.update({f"llama.cpp {fmt}": reason for fmt in llama_cpp.FORMATS})
        else:
            contenders += llama_contenders(model, args.prompt, args.decode, record.skipped)

    samples = run_rounds(contenders, workers, args.rounds, record)
    limits = record.machine
    rows = []
    for c in (c for c in contenders if c.name in samples):
        prefill_s, decode_s = medians(samples[c.name])
        rows.append(LatencyRow(
            engine=c.name, weight_gb=c.weight_bytes / 1e9, startup_s=c.startup_s,
            prefill_tok_s=args.prompt / prefill_s, decode_tok_s=1 / decode_s,
            decode_gb_s=c.weight_bytes / decode_s / 1e9, roofline_share=c.weight_bytes / decode_s / 1e9 / limits.read_gb_s,
            prefill_ms_samples=[s[0] * 1e3 for s in samples[c.name]],
            decode_ms_samples=[s[1] * 1e3 for s in samples[c.name]]))
    print("\n" + record.header() + "\n")
    print(table(rows, record.skipped))
    path = record.write([asdict(r) for r in rows], args.out, {"prompt": args.prompt, "decode": args.decode})
    print(f"\nwrote {path}")


def table(rows: list[LatencyRow], skipped: dict[str, str]) -> str:
    by_name = {r.engine: r for r in rows}
    lines = []
    for r in rows:
        peer = by_name.get(EQUAL_BITS.get(r.engine, ""))
        versus = f"{r.decode_tok_s / peer.decode_tok_s:.2f}x {peer.engine}" if peer else ""
        lines.append([r.engine, f"{r.weight_gb:.2f}", f"{r.prefill_tok_s:.0f}", f"{r.decode_tok_s:.1f}",
                      f"{r.decode_gb_s:.1f}", f"{r.roofline_share:.0%}", versus])
    text = markdown_table(["engine", "weights GB/token", "prefill tok/s", "decode tok/s", "decode GB/s",
                           "% of read bw", "decode vs equal bits"], lines)
    for name, reason in skipped.items():
        text += f"\n- {name}: not measured: {reason}"
    return text


if __name__ == "__main__":
    main()
