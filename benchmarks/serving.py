"""Serving benchmark: MILI and its peers as OpenAI-compatible servers, driven by benchmarks/serving_client.py at
fixed concurrencies and at Poisson request rates, on a random dataset and a shared-prefix one.

    python -m benchmarks.serving [--model DIR] [--engines mili,vllm,llama.cpp,max] [--concurrency 1,4,16,64]
                                 [--request-rates 2] [--datasets random,shared-prefix] [--gguf Q4_K_M]
    make bench-serving        (after `make bench-peers-setup`)

With --gguf FORMAT, MILI and llama-server both serve the checkpoint's GGUF file of that format (llama.cpp's
converter and llama-quantize make it; each engine runs the file's own types); other engines serve the checkpoint.

All servers are started first (one after another, so start-up times are not mixed up) and stay up, but only the
one being driven runs: the others are paused (SIGSTOP, benchmarks/peers/spotlight.py). Each is warmed up with a
few untimed requests; then every load point runs on every engine in turn (interleaved), so a noisy minute of the
shared machine hits all engines alike. Each load point sends 2 x its concurrency requests
(at least --min-prompts); a rate point sends --rate-prompts. Same KV-cache budget, batch limit (64 sequences)
and tokenizer for all. Results: a table per dataset, benchmarks/results/serving.json, and the plots of
benchmarks/plots.py.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from benchmarks.machine import measure
from benchmarks.peers import arguments
from benchmarks.peers.servers import (
    SERVED_NAME,
    SERVERS,
    RunningServer,
    server_spec,
    start,
    unwind_on_sigterm,
)
from benchmarks.peers.spotlight import Spotlight
from benchmarks.report import RunRecord, markdown_table
from benchmarks.serving_client import (
    Request,
    WordVocabulary,
    random_dataset,
    run_load,
    shared_prefix_dataset,
    summarize,
)


def parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def dataset(name: str, vocab: WordVocabulary, count: int, seed: int) -> list[Request]:
    if name == "random":
        return random_dataset(vocab, count, (64, 512), (32, 128), seed)
    return shared_prefix_dataset(vocab, count, num_prefixes=4, prefix_tokens=1000, question_tokens=32,
                                 output_tokens=64, seed=seed)


def load_plan(datasets: list[str], points: list[tuple[str, float]], seed: int) -> list[tuple[str, str, float, int]]:
    """(dataset, load kind, value, seed) for every load point. Each point draws its own prompts (seed + its
    index): reusing one set would let later points hit the prefix cache the earlier ones filled, and the
    random dataset would measure cached prefill. Within a point every engine gets the same prompts."""
    plan = [(name, kind, value) for name in datasets for kind, value in points]
    return [(name, kind, value, seed + i) for i, (name, kind, value) in enumerate(plan)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_common(parser, SERVERS, "serving")
    parser.add_argument("--concurrency", default="1,4,16,64", help="fixed-concurrency points (default 1,4,16,64)")
    parser.add_argument("--request-rates", default="2", help="Poisson points, requests/s (default 2; '' for none)")
    parser.add_argument("--datasets", default="random,shared-prefix")
    parser.add_argument("--min-prompts", type=int, default=8, help="fewest requests a concurrency point sends")
    parser.add_argument("--rate-prompts", type=int, default=32, help="requests a rate point sends (default 32)")
    parser.add_argument("--kv-gib", type=int, default=3, help="KV-cache budget of every server, GiB (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", metavar="FORMAT", default=None,
                        help="MILI and llama.cpp serve the same GGUF file of this format, e.g. Q4_K_M (default: MILI "
                             "the checkpoint in bfloat16, llama.cpp its BF16 file)")
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    engines = arguments.chosen_engines(parser, args, SERVERS)
    datasets = parse_list(args.datasets, str)
    if unknown := [d for d in datasets if d not in ("random", "shared-prefix")]:
        parser.error(f"--datasets: unknown {', '.join(unknown)}; choose from random, shared-prefix")
    concurrencies = parse_list(args.concurrency, int)
    rates = parse_list(args.request_rates, float)
    max_seqs = max(64, *concurrencies)

    model = arguments.checkpoint(args)
    record = RunRecord("serving", str(model), measure(), method=(
        f"streamed /v1/completions, greedy, EOS ignored; concurrency points send max({args.min_prompts}, "
        f"2 x concurrency) requests, rate points {args.rate_prompts} (Poisson); fresh prompts per point (seed "
        f"{args.seed} + its index), the same for every engine; engines interleaved per point; 4 untimed "
        f"warm-up requests per server; one run per point"
        + (f"; MILI and llama.cpp serve the {args.gguf} GGUF file" if args.gguf else "")))
    vocab = WordVocabulary(model)
    servers: dict[str, RunningServer] = {}
    try:
        for i, engine in enumerate(engines):
            try:
                spec = server_spec(engine, model, 8100 + i, max_seqs, args.kv_gib, gguf_format=args.gguf or "BF16",
                                   mili_gguf=args.gguf is not None)
            except RuntimeError as error:  # e.g. the GGUF conversion failed
                record.skipped[engine] = str(error).splitlines()[0]
                continue
            if (server := start(spec, record.skipped)) is not None:
                servers[spec.name] = server
        warm_up = random_dataset(vocab, 4, (64, 128), (8, 8), seed=10_000 + args.seed)
        only = Spotlight(servers)
        for name, server in servers.items():
            only.on(name)
            asyncio.run(run_load(server.spec.base_url, SERVED_NAME, warm_up, 4, None))
        rows = []
        points = [("concurrency", c) for c in concurrencies] + [("rate", r) for r in rates]
        for dataset_name, kind, value, seed in load_plan(datasets, points, args.seed):
            count = max(args.min_prompts, 2 * int(value)) if kind == "concurrency" else args.rate_prompts
            requests = dataset(dataset_name, vocab, count, seed)
            for name, server in servers.items():
                only.on(name)
                outcomes, duration = asyncio.run(run_load(
                    server.spec.base_url, SERVED_NAME, requests, int(value) if kind == "concurrency" else None,
                    value if kind == "rate" else None, seed))
                summary = summarize(outcomes, duration)
                rows.append({"engine": name, "dataset": dataset_name, "load": kind, "value": value, **summary})
                print(f"{dataset_name} {kind} {value:g} {name}: {describe_row(rows[-1])}", flush=True)
        startup = {name: server.startup_s for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    record.machine = record.machine.best_of(measure())
    record.finish()
    print("\n" + record.header() + "\n")
    print(table(rows, record.skipped))
    path = record.write(rows, args.out, {"startup_s": startup})
    print(f"\nwrote {path}")


def describe_row(row: dict) -> str:
    return (f"{row['output_tok_s']:.1f} tok/s, TTFT p50 {fmt(row['ttft_ms']['p50'])} ms, "
            f"TPOT p50 {fmt(row['tpot_ms']['p50'])} ms, failed {row['failed']}")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(rows: list[dict], skipped: dict[str, str]) -> str:
    lines = [[r["dataset"], f"{r['load']} {r['value']:g}", r["engine"], f"{r['output_tok_s']:.1f}",
              f"{r['requests_s']:.2f}", f"{fmt(r['ttft_ms']['p50'])} / {fmt(r['ttft_ms']['p99'])}",
              f"{fmt(r['tpot_ms']['p50'])} / {fmt(r['tpot_ms']['p99'])}", fmt(r["itl_ms"]["p50"]),
              f"{fmt(r['e2e_ms']['p50'])} / {fmt(r['e2e_ms']['p99'])}", f"{r['failed']}/{r['requests']}"]
             for r in rows]
    text = markdown_table(["dataset", "load", "engine", "output tok/s", "req/s", "TTFT p50/p99 ms",
                           "TPOT p50/p99 ms", "ITL p50 ms", "e2e p50/p99 ms", "failed"], lines)
    for name, reason in skipped.items():
        text += f"\n- {name}: not measured: {reason}"
    return text


if __name__ == "__main__":
    sys.exit(main())
