"""The CPU kernels' paths for instruction sets this machine may lack. Their register blocking depends on the
SIMD width and their bf16 paths on vdpbf16ps, so each probe (tests/kernels/mojo/*_isa_probe.mojo) is compiled
for an AVX2 EPYC (znver3), an AVX512_BF16 EPYC (znver4) and an AMX Xeon (sapphirerapids), and run natively on
this CPU, where it checks its results.

The numeric tests (test_linear.py, test_attention.py) run whichever path this machine has; this keeps the
others compiling.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mili.kernels import build_env

ROOT = Path(__file__).resolve().parents[2]
MOJO = Path(sys.executable).with_name("mojo")
PROBES = Path(__file__).parent / "mojo"
KERNELS = ["linear", "attention"]
CPUS = {"znver3": "ymm", "znver4": "zmm", "sapphirerapids": "zmm"}  # target -> the registers its code must use


def mojo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOJO), *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=build_env())


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_path_agrees_on_this_cpu(kernel):
    result = mojo("run", "-I", str(ROOT), str(PROBES / f"{kernel}_isa_probe.mojo"))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    assert f"{kernel} paths agree" in result.stdout


@pytest.mark.parametrize("cpu", CPUS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_paths_compile_for(kernel, cpu, tmp_path):
    asm = tmp_path / f"{kernel}_{cpu}.s"
    result = mojo("build", "-I", str(ROOT), "--target-cpu", cpu, "--emit", "asm",
                  str(PROBES / f"{kernel}_isa_probe.mojo"), "-o", str(asm))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr[-4000:]}"
    code = asm.read_text()
    assert CPUS[cpu] in code, f"no {CPUS[cpu]} registers in the {cpu} build"
    if cpu != "znver3":  # both kernels' bfloat16 paths use vdpbf16ps where the CPU has it
        assert "vdpbf16ps" in code, f"no vdpbf16ps in the {cpu} build: the AVX512_BF16 path was not selected"
    else:
        assert "zmm" not in code and "vdpbf16ps" not in code, "the AVX2 build uses instructions AVX2 lacks"
