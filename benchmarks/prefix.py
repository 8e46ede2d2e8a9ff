"""Prefix cache: time to first token of a request whose first 1,000 tokens another request just sent, against the
same request on a cold cache, for MILI and vLLM (and llama.cpp, whose server reuses a slot's previous prompt).

    python -m benchmarks.prefix [--model DIR] [--engines mili,vllm,llama.cpp] [--prefix 1000] [--rounds 5]
    make bench-prefix         (after `make bench-peers-setup`)

Each round makes a fresh random prefix (never seen by any server), then for each engine in turn: request A =
prefix + question A (cold: nothing cached), then request B = prefix + question B (warm: the prefix is cached);
both stream one token, so TTFT is the prompt's cost. Medians over the rounds; the first round is a warm-up and
not counted. The servers run with their prefix caches on (the default of all three); only the one being asked
runs, the others are paused (benchmarks/peers/spotlight.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics

from benchmarks.machine import measure
from benchmarks.peers import arguments
from benchmarks.peers.servers import SERVED_NAME, RunningServer, server_spec, start, unwind_on_sigterm
from benchmarks.peers.spotlight import Spotlight
from benchmarks.report import RunRecord, markdown_table
from benchmarks.serving_client import Request, WordVocabulary, run_load

ENGINES = ("mili", "vllm", "llama.cpp")


def ttft_ms(server: RunningServer, request: Request) -> float:
    outcomes, _ = asyncio.run(run_load(server.spec.base_url, SERVED_NAME, [request], 1, None))
    if not outcomes[0].ok:
        raise RuntimeError(f"{server.spec.name}: {outcomes[0].error}")
    return outcomes[0].ttft_s * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_common(parser, ENGINES, "prefix")
    parser.add_argument("--prefix", type=int, default=1000, help="shared prefix tokens (default 1000)")
    parser.add_argument("--question", type=int, default=24, help="tokens after the prefix (default 24)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    engines = arguments.chosen_engines(parser, args, ENGINES)
    model = arguments.checkpoint(args)
    record = RunRecord("prefix cache", str(model), measure(), method=(
        f"TTFT of prefix ({args.prefix} tokens) + question ({args.question} tokens), cold then warm, a fresh "
        f"prefix each round; 1 warm-up round + {args.rounds} timed, medians; engines interleaved"))
    vocab = WordVocabulary(model)
    rng = random.Random(args.seed)
    servers: dict[str, RunningServer] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        for i, engine in enumerate(engines):
            if server := start(server_spec(engine, model, 8150 + i, 16, 2), record.skipped):
                servers[server.spec.name] = server
                samples[server.spec.name] = {"cold": [], "warm": []}
        only = Spotlight(servers)
        for round_index in range(args.rounds + 1):
            prefix = vocab.text(rng, args.prefix)
            cold = Request(prefix + vocab.text(rng, args.question), args.prefix + args.question, 1)
            warm = Request(prefix + vocab.text(rng, args.question), args.prefix + args.question, 1)
            for name, server in servers.items():
                only.on(name)
                cold_ms, warm_ms = ttft_ms(server, cold), ttft_ms(server, warm)
                if round_index:
                    samples[name]["cold"].append(cold_ms)
                    samples[name]["warm"].append(warm_ms)
                    print(f"  {name}: cold {cold_ms:.0f} ms, warm {warm_ms:.0f} ms", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    record.machine = record.machine.best_of(measure())
    record.finish()
    rows = [{"engine": name, "cold_ms": statistics.median(s["cold"]), "warm_ms": statistics.median(s["warm"]),
             "warm_over_cold": statistics.median(s["warm"]) / statistics.median(s["cold"]),
             "cold_samples_ms": s["cold"], "warm_samples_ms": s["warm"]} for name, s in samples.items()]
    print("\n" + record.header() + "\n")
    text = markdown_table(["engine", "cold TTFT ms", "warm TTFT ms", "warm / cold"],
                          [[r["engine"], f"{r['cold_ms']:.0f}", f"{r['warm_ms']:.0f}", f"{r['warm_over_cold']:.2f}"]
                           for r in rows])
    for name, reason in record.skipped.items():
        text += f"\n- {name}: not measured: {reason}"
    print(text)
    print(f"\nwrote {record.write(rows, args.out, {'prefix': args.prefix})}")


if __name__ == "__main__":
    main()
