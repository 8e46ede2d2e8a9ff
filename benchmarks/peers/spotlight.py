"""Only the engine being measured runs: every other engine's process group is stopped (SIGSTOP) during its turn
and continued (SIGCONT) for its own. On two cores an idle engine is not idle: in the first latency run the load
average rose from 0.2 to 4.7 with every engine loaded (an idle MILI worker used 7% of a core, vLLM's pools more),
and that load slowed whichever engine was being timed."""

from __future__ import annotations

import os
import signal


class Spotlight:
    """Process groups by engine name; `on(name)` lets that one run (a name with no group, such as a llama-bench
    run, stops them all) and `release()` lets them all run again, which must happen before they are closed."""

    def __init__(self, groups: dict[str, int]):
        self.groups = dict(groups)

    def add(self, name: str, group: int) -> None:
        self.groups[name] = group

    def on(self, name: str) -> None:
        for other, group in self.groups.items():
            if other != name:
                _signal(group, signal.SIGSTOP)
        if name in self.groups:
            _signal(self.groups[name], signal.SIGCONT)

    def release(self) -> None:
        for group in self.groups.values():
            _signal(group, signal.SIGCONT)


def _signal(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:  # it exited; the caller finds out when it next speaks to it
        pass
