"""build.sh says what it does and how long it took, and drops mojo's one harmless Crashpad line (only it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CRASHPAD = ("Failed to initialize Crashpad.  Crash reporting will not be available.  Cause: while locating "
            "crashpad handler: unable to locate crashpad handler executable")


def run_build(tmp_path: Path, fake_mojo_body: str) -> subprocess.CompletedProcess[str]:
    """build.sh in a scratch project whose `mojo` is a shell script (the real compile is tested elsewhere)."""
    shutil.copy(ROOT / "build.sh", tmp_path / "build.sh")
    (tmp_path / "mojo_kernels").mkdir()
    mojo = tmp_path / "mojo"
    mojo.write_text(f"#!/usr/bin/env bash\n{fake_mojo_body}\n")
    mojo.chmod(0o755)
    return subprocess.run(["bash", str(tmp_path / "build.sh")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MOJO": str(mojo)})


def test_a_build_prints_a_line_before_and_a_done_line_without_the_crashpad_noise(tmp_path):
    result = run_build(tmp_path, f'echo "{CRASHPAD}" >&2; echo "warning: something real" >&2; touch "$4"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("build.sh: compiling the Mojo kernels")
    assert "build.sh: done in " in result.stdout
    assert "Crashpad" not in result.stderr and "warning: something real" in result.stderr
    assert (tmp_path / "build" / "mili_kernels.mojoc").exists()


def test_a_failed_build_shows_the_errors_and_fails(tmp_path):
    result = run_build(tmp_path, f'echo "{CRASHPAD}" >&2; echo "error: expected argument name" >&2; exit 1')
    assert result.returncode == 1
    assert "error: expected argument name" in result.stderr and "failed to compile" in result.stderr
    assert "Crashpad" not in result.stderr and not (tmp_path / "build" / "mili_kernels.mojoc").exists()
