"""Plain-words progress for slow, silent steps (a cold graph compile sits for a minute without a word)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def report_while_slow(log: logging.Logger, message: str, *, first_after_s: float = 15.0,
                      every_s: float = 15.0) -> Iterator[None]:
    """Logs `message` with the seconds so far (e.g. "still compiling (30 s so far)") every `every_s` seconds
    while the body runs, starting only after `first_after_s`, so a step that finishes quickly (a warm
    start) prints nothing. `message` takes one %d: the whole seconds elapsed."""
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        wait = first_after_s
        while not done.wait(wait):
            log.info(message, round(time.monotonic() - started))
            wait = every_s

    reporter = threading.Thread(target=report, name="mili-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()
