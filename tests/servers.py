"""Starting and waiting for servers in tests: a free port, a real `mili serve` process, readiness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 20, process: subprocess.Popen | None = None,
                 log_path: Path | None = None) -> bool:
    """Waits for /health to answer 200; returns whether it answered 503 "loading" first."""
    deadline = time.monotonic() + timeout_s
    saw_loading = False
    while True:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"mili serve exited:\n{log_path.read_text()[-3000:] if log_path else ''}")
        try:
            response = httpx.get(f"{url}/health", timeout=5)
            if response.status_code == 200:
                return saw_loading
            saw_loading |= response.status_code == 503 and response.json()["status"] == "loading"
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


@contextmanager
def mili_serve(args: list[str], name: str) -> Iterator[tuple[str, bool]]:
    """A real `mili serve ARGS` on a free port: yields its URL and whether /health said "loading" first.
    On the way out it sends SIGTERM and requires a clean exit (0) within a minute."""
    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"mili-{name}-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mili.cli", "serve", "--port", str(port), *args],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        saw_loading = wait_healthy(url, timeout_s=900, process=process, log_path=log_path)
        yield url, saw_loading
    finally:
        process.terminate()
        code = process.wait(timeout=60)
    assert code == 0, f"mili serve exited {code} on SIGTERM:\n{log_path.read_text()[-3000:]}"
