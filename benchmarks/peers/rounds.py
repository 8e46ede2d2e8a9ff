"""Interleaved rounds over engines (A B C A B C), after one untimed warm-up round, so a noisy minute of the shared
machine hits every engine alike; an engine that fails is dropped with the reason and the others go on. With a
Spotlight, the engines not being measured are stopped during each measurement."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

from benchmarks.peers.spotlight import Spotlight

T = TypeVar("T")


def interleaved(measures: dict[str, Callable[[bool], T]], rounds: int, skipped: dict[str, str],
                describe: Callable[[T], str] | None = None,
                spotlight: Spotlight | None = None) -> dict[str, list[T]]:
    """Calls each engine's measure(warm_up) once a round, warm-up round first; returns the timed results of the
    engines that never failed. `describe` prints a timed result as it comes; `spotlight` (released on the way out)
    stops the other engines while one is measured."""
    samples: dict[str, list[T]] = {name: [] for name in measures}
    active = dict(measures)
    try:
        for round_index in range(rounds + 1):
            warm_up = round_index == 0
            for name, measure in list(active.items()):
                if spotlight is not None:
                    spotlight.on(name)
                    time.sleep(0.2)  # the stopped engines' threads leave the cores
                try:
                    result = measure(warm_up)
                except RuntimeError as error:  # WorkerFailed, a peer tool's failure, failed requests
                    skipped[name] = str(error).splitlines()[0]
                    print(f"  {name}: dropped: {error}", file=sys.stderr)
                    del active[name], samples[name]
                    continue
                if not warm_up:
                    samples[name].append(result)
                    if describe is not None:
                        print(f"  {name}: {describe(result)}", flush=True)
                if spotlight is None:
                    time.sleep(0.5)  # OpenMP pools spin for a while after work: let them settle before the next
            print(f"{'warm-up' if warm_up else f'round {round_index}/{rounds}'} done", flush=True)
    finally:
        if spotlight is not None:
            spotlight.release()
    return samples
