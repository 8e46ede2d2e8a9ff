"""What every peer benchmark records beside its numbers (date, machine, load, checkpoint, method), and the
markdown table it prints and README shows."""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.machine import MachineLimits

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class RunRecord:
    workload: str
    checkpoint: str
    machine: MachineLimits
    method: str  # how it was measured, in a sentence or two: rounds, medians, warm-up
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())
    load_average: list[float] = field(default_factory=lambda: [round(x, 2) for x in os.getloadavg()])
    skipped: dict[str, str] = field(default_factory=dict)  # engine -> why it did not run

    def finish(self) -> None:
        """Records the load at the end too: a busy neighbour shows up as a load above the benchmark's own."""
        self.load_average += [round(x, 2) for x in os.getloadavg()]

    def header(self) -> str:
        return (f"{self.workload}, {self.date}: {self.machine.describe()}; checkpoint {Path(self.checkpoint).name}; "
                f"load average (1/5/15 min) at start {self.load_average[:3]}, end {self.load_average[3:]}\n"
                f"{self.method}")

    def write(self, rows: list[dict[str, Any]], name: str, extra: dict[str, Any] | None = None) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps({**asdict(self), **(extra or {}), "rows": rows}, indent=2) + "\n")
        return path


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
