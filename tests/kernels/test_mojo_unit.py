"""Runs the Mojo unit tests (tests/kernels/mojo/test_*.mojo) with the venv's `mojo run`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mili.kernels import build_env

ROOT = Path(__file__).resolve().parents[2]
MOJO = Path(sys.executable).with_name("mojo")
MOJO_TESTS = sorted((Path(__file__).parent / "mojo").glob("test_*.mojo"))


@pytest.mark.parametrize("test_file", MOJO_TESTS, ids=lambda p: p.name)
def test_mojo_unit_tests(test_file):
    result = subprocess.run([str(MOJO), "run", "-I", str(ROOT), str(test_file)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env=build_env())
    assert result.returncode == 0, f"{test_file.name} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "PASS" in result.stdout
