"""mili.kernels: the compiled package is rebuilt when a kernel source is newer, used as is otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mili import kernels


def test_needs_rebuild_follows_source_times(tmp_path):
    sources = tmp_path / "mojo_kernels"
    sources.mkdir()
    source = sources / "norm.mojo"
    source.write_text("# kernel")
    package = tmp_path / "mili_kernels.mojoc"
    assert kernels.needs_rebuild(package, sources)  # missing package
    package.write_bytes(b"pkg")
    os.utime(source, (1000, 1000))
    os.utime(package, (2000, 2000))
    assert not kernels.needs_rebuild(package, sources)
    os.utime(source, (3000, 3000))
    assert kernels.needs_rebuild(package, sources)


def test_kernel_package_is_built_and_current():
    path = kernels.kernel_package()
    assert path.exists() and not kernels.needs_rebuild()


def test_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("MILI_KERNEL_PACKAGE", str(tmp_path / "missing.mojoc"))
    with pytest.raises(kernels.KernelBuildError, match="does not exist"):
        kernels.kernel_package()


def test_failed_build_reports_compiler_output(monkeypatch, tmp_path):
    sources = tmp_path / "mojo_kernels"
    sources.mkdir()
    (sources / "broken.mojo").write_text("def oops(:\n")
    script = tmp_path / "build.sh"
    script.write_text("echo 'error: expected argument name' >&2; exit 1\n")
    monkeypatch.setattr(kernels, "KERNEL_SOURCES", sources)
    monkeypatch.setattr(kernels, "KERNEL_PACKAGE", tmp_path / "mili_kernels.mojoc")
    monkeypatch.setattr(kernels, "BUILD_SCRIPT", script)
    with pytest.raises(kernels.KernelBuildError, match="expected argument name"):
        kernels.kernel_package()


def test_a_rebuild_after_max_nn_kernels_runs_the_venv_mojo():
    """Importing max.nn.kernels points PYTHONEXECUTABLE (in the C environment) at the base interpreter;
    build.sh must still run the venv's `mojo` launcher (it failed with "No module named 'mojo'" when the
    environment was inherited). The import runs in a child process: its setenv() would otherwise stay in
    this one and break every later test that starts the venv's python or mojo."""
    mojo = Path(sys.executable).with_name("mojo")
    child = (
        "import subprocess, max.nn.kernels\n"
        "from mili.kernels import build_env\n"
        f"result = subprocess.run([{str(mojo)!r}, '--version'], capture_output=True, text=True, env=build_env())\n"
        "print(result.stdout, result.stderr)\n"
        "raise SystemExit(result.returncode)\n"
    )
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Mojo" in result.stdout
