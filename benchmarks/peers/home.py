"""Where the peers live: one folder each under ~/.cache/mili/peers (MILI_PEERS_DIR overrides), holding a venv or a
build, its set-up log, and a marker saying set-up finished (or why it failed)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PEERS = ("vllm", "llama.cpp", "transformers", "max")


def peers_home() -> Path:
    return Path(os.environ.get("MILI_PEERS_DIR", Path.home() / ".cache" / "mili" / "peers"))


@dataclass(frozen=True)
class PeerHome:
    name: str

    @property
    def root(self) -> Path:
        return peers_home() / self.name

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, program: str) -> Path:
        return self.venv / "bin" / program

    @property
    def log(self) -> Path:
        return self.root / "setup.log"

    @property
    def ready_marker(self) -> Path:
        return self.root / "READY"

    @property
    def failed_marker(self) -> Path:
        return self.root / "FAILED"

    def unavailable_reason(self) -> str | None:
        """None when the peer is set up; otherwise why it cannot run, in words."""
        if self.ready_marker.exists():
            return None
        if self.failed_marker.exists():
            return f"set-up failed: {self.failed_marker.read_text().strip()} (log: {self.log})"
        return "not set up: run `make bench-peers-setup`"
