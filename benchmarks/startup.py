"""Start-up of `mili serve` against `max serve` (MAX 26.7's own Qwen3 pipeline) on one checkpoint, cold and warm.

    python -m benchmarks.startup [--model DIR] [--engines mili,max] [--rounds 1]
    make bench-startup        (after `make bench-peers-setup`)

Cold: the install is done (MILI's kernel package built, MAX installed) and nothing is compiled: the server gets
a fresh, empty MAX compile cache (MODULAR_CACHE_DIR; it also holds the Mojo caches), so the start pays every graph
and kernel compile a first `serve` pays. Warm: a second start over the cache the cold start filled, as after a
restart. Each is timed from process start to the first /health 200 ("ready"), then one request of a 16-token
prompt and one output token ("first token": lazy compiles show up here). One server at a time; --rounds repeats
the cold + warm pair with a fresh cache, medians.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

from benchmarks.machine import measure
from benchmarks.peers import arguments
from benchmarks.peers.servers import SERVED_NAME, server_spec, start, unwind_on_sigterm
from benchmarks.report import RunRecord, markdown_table
from benchmarks.serving_client import Request, WordVocabulary, run_load

ENGINES = ("mili", "max")
TARGET_COLD_RATIO = 0.5  # issue 13: MILI's cold start <= 0.5x MAX's
TARGET_WARM_S = 10.0


def one_start(engine: str, model: Path, cache_dir: Path, probe: Request, skipped: dict[str, str],
              ) -> tuple[str, float, float] | None:
    """Starts the engine's server over `cache_dir`: (its name, seconds to ready, ms to the first token)."""
    spec = server_spec(engine, model, 8170, 4, 1)
    spec = replace(spec, env={**spec.env, "MODULAR_CACHE_DIR": str(cache_dir)}, startup_timeout_s=1800)
    server = start(spec, skipped)
    if server is None:
        return None
    try:
        server.resume()  # start() paused it
        outcomes, _ = asyncio.run(run_load(spec.base_url, SERVED_NAME, [probe], 1, None))
        if not outcomes[0].ok:
            skipped[spec.name] = f"its first request failed: {outcomes[0].error}"
            return None
        return spec.name, server.startup_s, outcomes[0].ttft_s * 1e3
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_common(parser, ENGINES, "startup")
    parser.add_argument("--rounds", type=int, default=1, help="cold + warm pairs per engine (default 1)")
    args = parser.parse_args(argv)
    unwind_on_sigterm()
    engines = arguments.chosen_engines(parser, args, ENGINES)
    arguments.at_least_one(parser, args, "rounds")
    model = arguments.checkpoint(args)
    record = RunRecord("start-up", str(model), measure(), method=(
        f"server process start to the first /health 200, then one 16-token request's first token; cold = a fresh "
        f"MODULAR_CACHE_DIR, warm = the same cache again; engines one at a time; {args.rounds} round(s), medians"))
    probe = Request(WordVocabulary(model).text(random.Random(0), 16), 16, 1)
    samples: dict[str, dict[str, list[float]]] = {}
    for round_index in range(args.rounds):
        for engine in engines:
            with tempfile.TemporaryDirectory(prefix=f"startup-{engine}-") as cache:
                for phase in ("cold", "warm"):
                    print(f"round {round_index + 1}/{args.rounds}: {engine} {phase} start ...", flush=True)
                    result = one_start(engine, model, Path(cache), probe, record.skipped)
                    if result is None:
                        break
                    name, ready_s, first_ms = result
                    runs = samples.setdefault(name, {})
                    runs.setdefault(f"{phase}_ready_s", []).append(ready_s)
                    runs.setdefault(f"{phase}_first_token_ms", []).append(first_ms)
                    print(f"  {name} {phase}: ready in {ready_s:.1f} s, first token {first_ms:.0f} ms", flush=True)
    record.machine = record.machine.best_of(measure())
    record.finish()
    rows = [{"engine": name, **{key: statistics.median(values) for key, values in runs.items()},
             "samples": runs} for name, runs in samples.items()]
    print("\n" + record.header() + "\n")
    print(table(rows, record.skipped))
    print(f"\nwrote {record.write(rows, args.out)}")


def table(rows: list[dict], skipped: dict[str, str]) -> str:
    cold = {r["engine"].split()[0]: r.get("cold_ready_s") for r in rows}
    lines = []
    for r in rows:
        targets = []
        if r["engine"].startswith("MILI"):
            if cold.get("MAX") and r.get("cold_ready_s"):
                targets.append(f"cold {r['cold_ready_s'] / cold['MAX']:.2f}x MAX (target <= {TARGET_COLD_RATIO}x)")
            if r.get("warm_ready_s"):
                targets.append(f"warm {r['warm_ready_s']:.1f} s (target <= {TARGET_WARM_S:.0f} s)")
        lines.append([r["engine"], _s(r.get("cold_ready_s")), _ms(r.get("cold_first_token_ms")),
                      _s(r.get("warm_ready_s")), _ms(r.get("warm_first_token_ms")), "; ".join(targets)])
    text = markdown_table(["engine", "cold: ready s", "cold: first token ms", "warm: ready s",
                           "warm: first token ms", "against the targets"], lines)
    for name, reason in skipped.items():
        text += f"\n- {name}: not measured: {reason}"
    return text


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


if __name__ == "__main__":
    main()
