"""Checks MILI's serving client (benchmarks/serving_client.py) against `vllm bench serve`: both drive the same
`vllm serve` at one load point, taking turns (ours, vLLM's, ours, vLLM's, ...), and their medians are shown side
by side. Where the two clients agree to within the spread of their own repeats, our client measures what vLLM's
does, and the serving benchmark's figures read the same as `vllm bench serve`'s.

    python -m benchmarks.client_check [--model DIR] [--concurrency 16] [--num-prompts 32] [--input-len 256]
                                      [--output-len 64] [--rounds 2]
    make bench-client-check   (after `make bench-peers-setup`)

Both send streamed /v1/completions of exactly --input-len prompt tokens and --output-len greedy output tokens
(EOS ignored), --concurrency at a time. vLLM's prompts are its random dataset (random token ids decoded to
text), ours are words that are one token each; the server runs without prefix caching so that neither client's
repeats hit a cache the other's did not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import measure
from benchmarks.peers import arguments
from benchmarks.peers.home import PeerHome
from benchmarks.peers.servers import SERVED_NAME, RunningServer, server_spec, start, unwind_on_sigterm
from benchmarks.report import RunRecord, markdown_table
from benchmarks.serving_client import WordVocabulary, random_dataset, run_load, summarize

# our summary's latency fields and statistics -> the names `vllm bench serve` saves them under
VLLM_METRIC = {"ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "itl_ms": "itl_ms", "e2e_ms": "e2el_ms"}
VLLM_STAT = {"mean": "mean", "p50": "median", "p99": "p99"}
KEYS = ["output_tok_s"] + [f"{field}_{stat}" for field in VLLM_METRIC for stat in VLLM_STAT]


def ours(server: RunningServer, model: Path, args: argparse.Namespace, seed: int) -> dict:
    requests = random_dataset(WordVocabulary(model), args.num_prompts, (args.input_len, args.input_len),
                              (args.output_len, args.output_len), seed)
    outcomes, seconds = asyncio.run(run_load(server.spec.base_url, SERVED_NAME, requests, args.concurrency, None))
    summary = summarize(outcomes, seconds)
    if summary["failed"]:
        raise RuntimeError(f"our client: {summary['failed']} requests failed: {summary['errors']}")
    return {"output_tok_s": summary["output_tok_s"],
            **{f"{field}_{stat}": summary[field][stat] for field in VLLM_METRIC for stat in VLLM_STAT}}


def theirs(server: RunningServer, model: Path, args: argparse.Namespace, seed: int) -> dict:
    """One `vllm bench serve` run; its saved JSON, in our summary's field names."""
    with tempfile.TemporaryDirectory() as folder:
        command = [str(PeerHome("vllm").bin("vllm")), "bench", "serve", "--backend", "openai",
                   "--base-url", server.spec.base_url, "--endpoint", "/v1/completions", "--model", SERVED_NAME,
                   "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", str(args.input_len),
                   "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
                   "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency),
                   "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed", str(seed),
                   "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                   "--save-result", "--result-dir", folder, "--result-filename", "result.json"]
        done = subprocess.run(command, check=False, capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stderr[-3000:]}")
        result = json.loads((Path(folder) / "result.json").read_text())
    if result["completed"] != args.num_prompts:
        raise RuntimeError(f"vllm bench serve: {args.num_prompts - result['completed']} requests failed")
    return {"output_tok_s": result["output_throughput"],
            **{f"{field}_{stat}": result[f"{their_stat}_{their_field}"] for field, their_field in VLLM_METRIC.items()
               for stat, their_stat in VLLM_STAT.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each client, alternated (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    arguments.add_common(parser, (), "client-check")
    args = parser.parse_args(argv)
    arguments.at_least_one(parser, args, "concurrency", "num_prompts", "input_len", "output_len", "rounds")
    if reason := PeerHome("vllm").unavailable_reason():
        sys.exit(f"vLLM is not set up ({reason}); run `make bench-peers-setup` first")
    unwind_on_sigterm()
    model = arguments.checkpoint(args)
    record = RunRecord("serving client check", str(model), measure(), method=(
        f"`vllm serve` without prefix caching, driven by our client and by `vllm bench serve` in turn: "
        f"{args.num_prompts} streamed completions of {args.input_len} prompt + {args.output_len} output tokens, "
        f"greedy, EOS ignored, concurrency {args.concurrency}; {args.rounds} runs each, medians"))
    server = start(server_spec("vllm", model, 8180, args.concurrency, 2, prefix_cache=False), record.skipped)
    if server is None:
        sys.exit(f"vllm serve did not start: {record.skipped}")
    runs: dict[str, list[dict]] = {"ours": [], "vllm bench serve": []}
    try:
        server.resume()
        asyncio.run(run_load(server.spec.base_url, SERVED_NAME, random_dataset(
            WordVocabulary(model), 4, (64, 64), (8, 8), 10_000), 4, None))  # untimed warm-up
        for i in range(args.rounds):
            for name, client in (("ours", ours), ("vllm bench serve", theirs)):
                runs[name].append(client(server, model, args, args.seed + i))
                print(f"round {i + 1} {name}: {describe(runs[name][-1])}", flush=True)
    finally:
        server.stop()
    record.finish()
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in rows[0]} for name, rows in runs.items()}
    print("\n" + record.header() + "\n")
    print(table(medians))
    path = record.write([{"client": name, **row, "runs": runs[name]} for name, row in medians.items()], args.out)
    print(f"\nwrote {path}")


def describe(row: dict) -> str:
    return (f"{row['output_tok_s']:.1f} output tok/s, p50 TTFT {row['ttft_ms_p50']:.0f} ms, "
            f"TPOT {row['tpot_ms_p50']:.0f} ms, ITL {row['itl_ms_p50']:.0f} ms")


def table(medians: dict[str, dict]) -> str:
    ours_row, vllm_row = medians["ours"], medians["vllm bench serve"]
    lines = [[key, f"{ours_row[key]:.1f}", f"{vllm_row[key]:.1f}", f"{ours_row[key] / vllm_row[key]:.2f}"]
             for key in KEYS]
    return markdown_table(["metric", "our client", "vllm bench serve", "ours / vLLM's"], lines)


if __name__ == "__main__":
    main()
