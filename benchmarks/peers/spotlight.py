"""Only the engine being measured runs: every other engine's process group is stopped (SIGSTOP) during its turn
and continued (SIGCONT) for its own. On two cores an idle engine is not idle: in the first latency run the load
average rose from 0.2 to 4.7 with every engine loaded (an idle MILI worker used 7% of a core, vLLM's worker a
whole core: it busy-polls), and that load slowed whichever engine was being timed."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from typing import Protocol


class OwnsProcess(Protocol):
    """A worker or a server: it leads the process group of `process` (started with start_new_session=True)."""

    process: subprocess.Popen


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """Sends `signum` to the process group `process` leads, unless it has exited (its owner finds out when it
    next speaks to it)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:  # exited between the poll and the signal
            pass


class Spotlight:
    """Engines by name; `on(name)` lets that one run (a name that is not here, such as a llama-bench run, stops
    them all) and `release()` lets them all run again, which must happen before they are closed."""

    def __init__(self, engines: Mapping[str, OwnsProcess]):
        self.processes = {name: engine.process for name, engine in engines.items()}

    def on(self, name: str) -> None:
        for other, process in self.processes.items():
            if other != name:
                signal_group(process, signal.SIGSTOP)
        if name in self.processes:
            signal_group(self.processes[name], signal.SIGCONT)

    def release(self) -> None:
        for process in self.processes.values():
            signal_group(process, signal.SIGCONT)
