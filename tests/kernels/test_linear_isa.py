"""The linear op's CPU paths for instruction sets this machine may lack: compiled for an AVX512_BF16 EPYC
(znver4) and an AMX Xeon (sapphirerapids), with vdpbf16ps in the code, and run natively on this CPU.

The numeric tests (test_linear.py) run whichever path this machine has; this keeps the others compiling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mili.kernels import build_env

ROOT = Path(__file__).resolve().parents[2]
MOJO = Path(sys.executable).with_name("mojo")
PROBE = Path(__file__).parent / "mojo" / "linear_isa_probe.mojo"


def test_every_linear_path_agrees_on_this_cpu():
    result = subprocess.run([str(MOJO), "run", "-I", str(ROOT), str(PROBE)], capture_output=True, text=True,
                            cwd=ROOT, timeout=600, env=build_env())
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert "linear paths agree" in result.stdout


@pytest.mark.parametrize("cpu", ["znver4", "sapphirerapids"])
def test_linear_paths_compile_with_vdpbf16ps_for(cpu, tmp_path):
    asm = tmp_path / f"linear_{cpu}.s"
    result = subprocess.run([str(MOJO), "build", "-I", str(ROOT), "--target-cpu", cpu, "--emit", "asm", str(PROBE),
                             "-o", str(asm)], capture_output=True, text=True, cwd=ROOT, timeout=600, env=build_env())
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    code = asm.read_text()
    assert "vdpbf16ps" in code, f"no vdpbf16ps in the {cpu} build: the AVX512_BF16 tiles were not selected"
    assert "zmm" in code, f"no 512-bit registers in the {cpu} build"
