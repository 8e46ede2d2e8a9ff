"""Finds the compiled Mojo kernel package that MAX graphs load as a custom extension.

The package is `build/mili_kernels.mojoc`, made by `build.sh` from `mojo_kernels/`. When a kernel
source is newer than the package (or the package is missing) it is rebuilt here, so an edited kernel
is never run stale.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = PROJECT_ROOT / "mojo_kernels"
KERNEL_PACKAGE = PROJECT_ROOT / "build" / "mili_kernels.mojoc"
BUILD_SCRIPT = PROJECT_ROOT / "build.sh"

_build_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """The Mojo kernels could not be compiled; the message carries the compiler output."""


def _newest_source_mtime(sources: Path) -> float:
    return max((p.stat().st_mtime for p in sources.rglob("*.mojo")), default=0.0)


def needs_rebuild(package: Path = KERNEL_PACKAGE, sources: Path = KERNEL_SOURCES) -> bool:
    """True when the package is missing or older than any kernel source."""
    if not package.exists():
        return True
    return _newest_source_mtime(sources) > package.stat().st_mtime


def build_env() -> dict[str, str]:
    """The environment for build.sh, taken from os.environ rather than inherited from the C environment:
    importing max.nn.kernels setenv()s PYTHONEXECUTABLE to the base interpreter (os.environ does not see
    it), and the venv's `mojo` launcher, a Python script, then starts outside the venv and fails with
    "No module named 'mojo'"."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONEXECUTABLE"}


def kernel_package() -> Path:
    """Path of the compiled kernel package, rebuilding it first if it is missing or stale.

    `MILI_KERNEL_PACKAGE` points at a prebuilt package instead (it is then used as it is).
    """
    override = os.environ.get("MILI_KERNEL_PACKAGE")
    if override:
        path = Path(override)
        if not path.exists():
            raise KernelBuildError(f"MILI_KERNEL_PACKAGE={override} does not exist")
        return path
    with _build_lock:
        if needs_rebuild(KERNEL_PACKAGE, KERNEL_SOURCES):
            if not KERNEL_SOURCES.is_dir():
                raise KernelBuildError(
                    f"no compiled kernels at {KERNEL_PACKAGE} and no sources at {KERNEL_SOURCES}; "
                    "install MILI from a source checkout (pip install -e .) or set MILI_KERNEL_PACKAGE"
                )
            log.info("Mojo kernel sources changed: rebuilding %s", KERNEL_PACKAGE)
            result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, env=build_env())
            if result.returncode != 0:
                raise KernelBuildError(f"build.sh failed:\n{result.stdout}{result.stderr}")
    return KERNEL_PACKAGE
