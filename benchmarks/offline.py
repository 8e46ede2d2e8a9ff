"""Offline throughput of MILI and its peers: one seeded batch of requests in the style of nano-vllm's bench, scaled
to this CPU (64 requests, prompts of 64-512 random tokens, 32-256 greedy output tokens each, EOS ignored),
submitted at once; output tokens/s and requests/s.

    python -m benchmarks.offline [--model DIR] [--requests 64] [--rounds 2]
                                 [--engines mili,vllm,transformers,max]
    make bench-offline        (after `make bench-peers-setup`)

MILI (bfloat16 weights; int8 decodes at about the same batched speed, and a second MILI process would not fit in
memory beside the peers) and vLLM run through their offline APIs (LLM.generate); transformers through
batched `generate` (16 prompts a call, sorted by length, left-padded: it cannot stop rows at different lengths,
so a batch runs to its longest request and only the tokens asked for are counted); MAX, whose CPU pipeline has
no documented offline API, through `max serve` with every request sent at once (prompts of the same lengths,
as text). Each engine is loaded once, runs one untimed warm-up batch (8 requests), then the timed rounds
interleave the engines; medians. Same KV-cache budget in tokens (2 GiB of bf16) and thread count for all.
All engines stay loaded: on a 24 GiB machine MAX (float32 weights, plus its KV share) does not fit beside the
others, so run it on its own with MILI as the common reference (`--engines mili,max`). vLLM and transformers run
in their faster dtype on this CPU (engines.batched_peer_dtype: float32 where the CPU has no bf16 dot products).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.machine import measure
from benchmarks.peers import arguments
from benchmarks.peers.engines import batched_peer_dtype, mili_worker, runnable, transformers_worker, vllm_worker
from benchmarks.peers.rounds import interleaved
from benchmarks.peers.servers import SERVED_NAME, RunningServer, server_spec, start, unwind_on_sigterm
from benchmarks.peers.spotlight import Spotlight
from benchmarks.peers.workers import WorkerProcess, start_all
from benchmarks.report import RunRecord, markdown_table
from benchmarks.serving_client import Request, WordVocabulary, run_load, summarize

ENGINES = ("mili", "vllm", "transformers", "max")
# GiB of bfloat16 KV cache (engines.kv_gib_for: float32 caches get the bytes that hold as many tokens): 18,700
# tokens, more than 32 requests at once need. Every engine stays loaded for the whole run, so their memory adds
# up: with 4 GiB each, MILI bf16 and int8 (~5 GB each once the cache was used), vLLM fp32 (8.7 GB) and
# transformers (4.5 GB) filled 24 GiB and the machine thrashed in round 2.
KV_GIB = 2


def workload(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": rng.integers(0, 151_000, int(rng.integers(64, 513))).tolist(),
             "max_tokens": int(rng.integers(32, 257))} for _ in range(count)]


def served_batches(server: RunningServer, model: Path, requests: list[dict], warm_up_requests: list[dict],
                   seed: int) -> Callable[[bool], dict]:
    """The batch (or the warm-up batch) sent to a server all at once, as text prompts of the same token lengths."""
    vocab, rng = WordVocabulary(model), random.Random(seed)

    def as_text(batch: list[dict]) -> list[Request]:
        return [Request(vocab.text(rng, len(r["prompt"])), len(r["prompt"]), r["max_tokens"]) for r in batch]
    texts, warm_up_texts = as_text(requests), as_text(warm_up_requests)

    def run(warm_up: bool) -> dict:
        batch = warm_up_texts if warm_up else texts
        outcomes, seconds = asyncio.run(run_load(server.spec.base_url, SERVED_NAME, batch, len(batch), None))
        summary = summarize(outcomes, seconds)
        if summary["failed"]:
            raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors']}")
        return {"seconds": seconds, "output_tokens": summary["output_tokens"]}
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per round (default 64)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (default 2)")
    arguments.add_common(parser, ENGINES, "offline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    engines = arguments.chosen_engines(parser, args, ENGINES)
    arguments.at_least_one(parser, args, "requests", "rounds")
    model = arguments.checkpoint(args)
    record = RunRecord("offline throughput", str(model), measure(), method=(
        f"{args.requests} requests (seed {args.seed}), prompts 64-512 tokens, outputs 32-256 greedy tokens, EOS "
        f"ignored, all submitted at once; one untimed warm-up batch per engine, {args.rounds} interleaved rounds, "
        f"medians"))
    requests = workload(args.requests, args.seed)
    warm_up_requests = workload(8, args.seed + 1)

    specs = []
    if "mili" in engines:
        specs.append(mili_worker(model, "bfloat16", KV_GIB << 30))
    if "vllm" in engines:
        specs += runnable("vllm", [vllm_worker(model, KV_GIB, batched_peer_dtype())], record.skipped)
    if "transformers" in engines:
        specs += runnable("transformers", [transformers_worker(model, batched_peer_dtype())], record.skipped)
    workers = start_all(specs, record.skipped)
    batches: dict[str, Callable[[bool], dict]] = {
        name: lambda warm_up, worker=worker: worker.call("offline", requests=warm_up_requests if warm_up else requests)
        for name, worker in workers.items()}
    engines_by_name: dict[str, WorkerProcess | RunningServer] = dict(workers)
    server = None
    if "max" in engines and (server := start(server_spec("max", model, 8199, 64, KV_GIB), record.skipped)):
        batches[server.spec.name] = served_batches(server, model, requests, warm_up_requests, args.seed)
        engines_by_name[server.spec.name] = server
    try:
        samples = interleaved(batches, args.rounds, record.skipped,
                              describe=lambda r: f"{r['output_tokens'] / r['seconds']:.1f} output tok/s",
                              spotlight=Spotlight(engines_by_name))
    finally:
        for worker in workers.values():
            worker.close()
        if server is not None:
            server.stop()

    record.machine = record.machine.best_of(measure())
    record.finish()
    wanted = sum(r["max_tokens"] for r in requests)
    rows = []
    for name in samples:
        seconds = statistics.median(s["seconds"] for s in samples[name])
        produced = samples[name][0]["output_tokens"]
        rows.append({"engine": name, "seconds": seconds, "output_tokens": produced, "asked_tokens": wanted,
                     "output_tok_s": produced / seconds, "requests_s": args.requests / seconds,
                     "seconds_samples": [s["seconds"] for s in samples[name]]})
    print("\n" + record.header() + "\n")
    print(table(rows, record.skipped))
    path = record.write(rows, args.out, {"requests": args.requests})
    print(f"\nwrote {path}")


def table(rows: list[dict], skipped: dict[str, str]) -> str:
    tok_s_of = {r["engine"]: r["output_tok_s"] for r in rows}
    lines = []
    for r in rows:
        vs = [f"{r['output_tok_s'] / tok_s:.2f}x {peer}" for peer, tok_s in tok_s_of.items()
              if r["engine"].startswith("MILI") and not peer.startswith("MILI")]
        lines.append([r["engine"], f"{r['output_tok_s']:.1f}", f"{r['requests_s']:.2f}", f"{r['seconds']:.1f}",
                      f"{r['output_tokens']}/{r['asked_tokens']}", ", ".join(vs)])
    text = markdown_table(["engine", "output tok/s", "req/s", "seconds", "tokens", "MILI vs peer"], lines)
    for name, reason in skipped.items():
        text += f"\n- {name}: not measured: {reason}"
    return text


if __name__ == "__main__":
    main()
