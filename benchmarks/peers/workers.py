"""Engine workers as child processes, each in its engine's own interpreter, spoken to over the line protocol of
benchmarks/peers/runners/protocol.py. Keeping every engine loaded in its own process lets a benchmark run
interleaved rounds (A B C A B C) without reloading anything; a worker's own output goes to a log file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.peers.spotlight import signal_group

ROOT = Path(__file__).resolve().parents[2]
RUNNERS = Path(__file__).resolve().parent / "runners"
LOGS = Path(os.environ.get("MILI_BENCH_LOGS", "/tmp/mili-bench-logs"))


class WorkerFailed(RuntimeError):
    pass


@dataclass
class WorkerSpec:
    """How to start one engine worker: the interpreter, the runner script and its arguments, extra environment."""
    name: str  # e.g. "vLLM bf16": a row of the results
    python: Path
    script: str  # a file in benchmarks/peers/runners/
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 900.0


class WorkerProcess:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{spec.name.replace(' ', '_').replace('/', '_')}.log"
        env = {**os.environ, "PYTHONPATH": f"{RUNNERS}:{ROOT}", **spec.env}
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen([str(spec.python), str(RUNNERS / spec.script), *spec.args],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=env, cwd=ROOT, start_new_session=True)  # a group to stop and continue
        self.busy = True  # between a request and its answer: it reads no "quit" then
        started = time.monotonic()
        self.facts = self._read(spec.startup_timeout_s, "start")
        self.facts["startup_s"] = time.monotonic() - started

    def pause(self) -> None:
        """Stops the worker's process group until it is next called (see Spotlight for why)."""
        signal_group(self.process, signal.SIGSTOP)

    def call(self, op: str, timeout_s: float = 1800.0, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        signal_group(self.process, signal.SIGCONT)  # it may be paused
        try:
            self.process.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise WorkerFailed(self._died("before " + op)) from None
        self.busy = True
        reply = self._read(timeout_s, op)
        if not reply.pop("ok", False):
            raise WorkerFailed(f"{self.spec.name}: {op} failed: {reply.get('error')} (log: {self.log_path})")
        return reply

    def _read(self, timeout_s: float, what: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if reader.is_alive():
            self.close()
            raise WorkerFailed(f"{self.spec.name}: no answer to {what} within {timeout_s:.0f} s (log: {self.log_path})")
        if not line[0]:
            raise WorkerFailed(self._died(what))
        self.busy = False
        return json.loads(line[0])

    def _died(self, what: str) -> str:
        self.process.wait(timeout=30)
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])
        return f"{self.spec.name}: exited ({self.process.returncode}) during {what}; log {self.log_path}:\n{tail}"

    def close(self) -> None:
        """Asks the worker to quit; kills its process group (vLLM's engine core too) where it cannot hear that (busy
        with a call the driver gave up on, e.g. when a SIGTERM unwinds the driver mid-round) or does not quit."""
        if self.process.poll() is None:
            signal_group(self.process, signal.SIGCONT)  # a stopped worker could not read "quit"
            if self.busy or not self._quit(timeout_s=60):
                signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def _quit(self, timeout_s: float) -> bool:
        """Whether the worker quit within `timeout_s` of being asked to."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=timeout_s)
            return True
        except (BrokenPipeError, subprocess.TimeoutExpired):
            return False


def start_all(specs: list[WorkerSpec], skipped: dict[str, str]) -> dict[str, WorkerProcess]:
    """Starts each worker in turn (loading two engines at once would skew both start-up times) and pauses it until
    it is called, so it takes no CPU from the next one's start; one that fails to start is recorded in `skipped`
    with the reason and the rest go on."""
    workers: dict[str, WorkerProcess] = {}
    for spec in specs:
        print(f"starting {spec.name} ...", flush=True)
        try:
            workers[spec.name] = WorkerProcess(spec)
        except (WorkerFailed, OSError) as error:
            skipped[spec.name] = str(error).splitlines()[0]
            print(f"  {spec.name}: could not start: {error}", file=sys.stderr, flush=True)
            continue
        print(f"  {spec.name}: ready in {workers[spec.name].facts['startup_s']:.0f} s", flush=True)
        workers[spec.name].pause()
    return workers
