"""MILI against llama.cpp on the same GGUF files: load time, resident memory, batch-1 prefill and decode.

    python -m benchmarks.gguf [--model DIR] [--prompt 512] [--decode 128] [--rounds 3] [--formats BF16,Q8_0,...]
    make bench-gguf        (after `make bench-peers-setup`: llama.cpp's converter and llama-quantize make the files)

The checkpoint (default: the random-weight Qwen3-0.6B shape, `make checkpoint-0.6b`) is converted by llama.cpp's
own convert_hf_to_gguf.py to BF16 and quantized by llama-quantize to Q8_0, Q4_0 and Q4_K_M, the files users
download. Each file runs in MILI (bfloat16 activations, the file's own types) and in llama.cpp (llama-bench,
2 threads); MILI's safetensors bf16 run of the same checkpoint is the load-time baseline. Timings are medians of
interleaved rounds after an untimed warm-up; decode tokens/s comes with the weight bytes a token reads and the
share of the machine's read bandwidth measured in the same run.

Load: MILI's time to a ready engine (process start, GGUF metadata, repacking, graph from MAX's compile cache after
the first run, KV cache) and its peak resident memory; llama.cpp's time and peak memory for a llama-bench run
that loads the file and prefills one token. vLLM's CPU build does not run GGUF files, so llama.cpp is the peer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.latency import Contender, medians, run_rounds, worker_contender
from benchmarks.machine import measure
from benchmarks.peers import arguments, llama_cpp
from benchmarks.peers.engines import mili_gguf_worker, mili_worker
from benchmarks.peers.home import PeerHome
from benchmarks.peers.servers import unwind_on_sigterm
from benchmarks.peers.workers import WorkerSpec, start_all
from benchmarks.report import RunRecord, markdown_table

FORMATS = ("BF16", "Q8_0", "Q4_0", "Q4_K_M")
ENGINES = ("mili", "llama.cpp")
SAFETENSORS = "MILI safetensors bf16"


@dataclass
class GGUFRow:
    engine: str
    file_gb: float | None  # the GGUF file (None: the safetensors baseline)
    weight_gb: float  # what one decode step reads
    load_s: float | None
    weights_s: float | None  # MILI: reading and repacking the weights (within load_s)
    compile_s: float | None  # MILI: the graph compile, or its load from MAX's cache (within load_s)
    max_rss_gb: float | None
    prefill_tok_s: float
    decode_tok_s: float
    decode_gb_s: float
    roofline_share: float
    prefill_ms_samples: list[float]
    decode_ms_samples: list[float]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--decode", type=int, default=128, help="greedy tokens decoded after it (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"GGUF types (default {','.join(FORMATS)})")
    arguments.add_common(parser, ENGINES, "gguf")
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    engines = arguments.chosen_engines(parser, args, ENGINES)
    arguments.at_least_one(parser, args, "prompt", "decode", "rounds")
    formats = [f for f in args.formats.split(",") if f]
    if unknown := sorted(set(formats) - set(FORMATS)):
        parser.error(f"--formats: unknown {unknown}; choose from {','.join(FORMATS)}")
    model = arguments.checkpoint(args)
    record = RunRecord("GGUF files, MILI vs llama.cpp", str(model), measure(), method=(
        f"llama.cpp's converter and llama-quantize made each file from the checkpoint; prefill of {args.prompt} "
        f"tokens, then {args.decode} greedy tokens at batch 1; one untimed warm-up each, then {args.rounds} "
        f"interleaved rounds, medians; MILI bfloat16 activations"))
    if reason := PeerHome("llama.cpp").unavailable_reason():
        raise SystemExit(f"benchmarks.gguf: llama.cpp is not set up ({reason}); run `make bench-peers-setup` "
                         f"(its converter and llama-quantize make the GGUF files)")
    files = {fmt: llama_cpp.gguf(model, fmt) for fmt in formats}
    prompt = np.random.default_rng(0).integers(0, 151_000, args.prompt).tolist()
    kv_bytes = 256 << 20

    specs = []
    if "mili" in engines:
        specs.append(WorkerSpec(SAFETENSORS, Path(sys.executable), "mili_worker.py",
                                mili_worker(model, "bfloat16", kv_bytes).args))
        specs += [mili_gguf_worker(path, fmt, kv_bytes) for fmt, path in files.items()]
    workers = start_all(specs, record.skipped)
    contenders: list[Contender] = [worker_contender(w, prompt, args.decode, w.facts["weight_bytes"])
                                   for w in workers.values()]
    loads: dict[str, tuple[float, int, float | None, float | None]] = {
        name: (w.facts["startup_s"], w.facts["max_rss_bytes"], w.facts["weights_s"], w.facts["compile_s"])
        for name, w in workers.items()}
    if "llama.cpp" in engines:
        for fmt, path in files.items():
            name = f"llama.cpp {fmt}"
            probe = llama_cpp.load_probe(path)
            loads[name] = (probe.seconds, probe.max_rss_bytes, None, None)

            def once(path: Path = path) -> tuple[float, float]:
                result = llama_cpp.bench(path, args.prompt, args.decode)
                return result.prefill_s, result.decode_s
            contenders.append(Contender(name, path.stat().st_size, once))

    samples = run_rounds(contenders, workers, args.rounds, record)
    limits = record.machine
    rows = []
    for c in (c for c in contenders if c.name in samples):
        prefill_s, decode_s = medians(samples[c.name])
        fmt = c.name.rsplit(" ", 1)[-1]
        load_s, rss, weights_s, compile_s = loads.get(c.name, (None, None, None, None))
        rows.append(GGUFRow(
            engine=c.name, file_gb=files[fmt].stat().st_size / 1e9 if fmt in files else None,
            weight_gb=c.weight_bytes / 1e9, load_s=load_s, weights_s=weights_s, compile_s=compile_s,
            max_rss_gb=rss / 1e9 if rss else None,
            prefill_tok_s=args.prompt / prefill_s, decode_tok_s=1 / decode_s,
            decode_gb_s=c.weight_bytes / decode_s / 1e9,
            roofline_share=c.weight_bytes / decode_s / 1e9 / limits.read_gb_s,
            prefill_ms_samples=[s[0] * 1e3 for s in samples[c.name]],
            decode_ms_samples=[s[1] * 1e3 for s in samples[c.name]]))
    print("\n" + record.header() + "\n")
    print(table(rows, record.skipped))
    path = record.write([asdict(r) for r in rows], args.out, {"prompt": args.prompt, "decode": args.decode,
                                                              "formats": formats})
    print(f"\nwrote {path}")


def table(rows: list[GGUFRow], skipped: dict[str, str]) -> str:
    by_name = {r.engine: r for r in rows}
    lines = []
    for r in rows:
        peer = by_name.get(r.engine.replace("MILI GGUF", "llama.cpp")) if r.engine.startswith("MILI GGUF") else None
        versus = ""
        if peer is not None:
            versus = f"prefill {r.prefill_tok_s / peer.prefill_tok_s:.2f}x, decode {r.decode_tok_s / peer.decode_tok_s:.2f}x"
        lines.append([r.engine, f"{r.file_gb:.2f}" if r.file_gb else "", f"{r.weight_gb:.2f}",
                      f"{r.load_s:.1f}" if r.load_s is not None else "",
                      f"{r.weights_s:.1f} + {r.compile_s:.1f}" if r.weights_s is not None else "",
                      f"{r.max_rss_gb:.2f}" if r.max_rss_gb is not None else "",
                      f"{r.prefill_tok_s:.0f}", f"{r.decode_tok_s:.1f}", f"{r.decode_gb_s:.1f}",
                      f"{r.roofline_share:.0%}", versus])
    text = markdown_table(["engine", "file GB", "read GB/token", "load s", "of which weights + compile s",
                           "peak RSS GB", "prefill tok/s",
                           "decode tok/s", "decode GB/s", "% of read bw", "vs llama.cpp, same file"], lines)
    for name, reason in skipped.items():
        text += f"\n- {name}: not measured: {reason}"
    return text


if __name__ == "__main__":
    main()
