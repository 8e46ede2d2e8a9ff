"""Interleaved rounds over engines (A B C A B C), after one untimed warm-up round, so a noisy minute of the shared
machine hits every engine alike; an engine that fails is dropped with the reason and the others go on."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def interleaved(measures: dict[str, Callable[[bool], T]], rounds: int, skipped: dict[str, str],
                describe: Callable[[T], str] | None = None) -> dict[str, list[T]]:
    """Calls each engine's measure(warm_up) once a round, warm-up round first; returns the timed results of the
    engines that never failed. `describe` prints a timed result as it comes."""
    samples: dict[str, list[T]] = {name: [] for name in measures}
    active = dict(measures)
    for round_index in range(rounds + 1):
        warm_up = round_index == 0
        for name, measure in list(active.items()):
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
            time.sleep(0.5)  # OpenMP pools spin for a while after work: let them settle before the next engine
        print(f"{'warm-up' if warm_up else f'round {round_index}/{rounds}'} done", flush=True)
    return samples
