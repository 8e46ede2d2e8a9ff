"""Progress lines for slow silent steps: after a delay, then regularly; nothing for a quick step."""

from __future__ import annotations

import logging
import time

from mili.progress import report_while_slow

log = logging.getLogger("mili.test_progress")


def test_a_slow_step_reports_the_seconds_so_far(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    with report_while_slow(log, "still compiling (%d s so far)", first_after_s=0.1, every_s=0.1):
        time.sleep(0.45)
    lines = [r.getMessage() for r in caplog.records]
    assert 3 <= len(lines) <= 5 and all(line.startswith("still compiling (") for line in lines)


def test_a_quick_step_reports_nothing_and_leaves_no_thread(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    with report_while_slow(log, "still compiling (%d s so far)", first_after_s=0.2, every_s=0.1):
        time.sleep(0.01)
    time.sleep(0.3)
    assert caplog.records == []
