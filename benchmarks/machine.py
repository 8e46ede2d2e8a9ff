"""This machine's limits, measured in the same run as the benchmarks that are judged against them.

- read bandwidth: benchmarks/mojo/read_bandwidth.mojo, every core streaming its share of a 1 GiB buffer with SIMD
  loads on the thread pool MILI's kernels use (numpy's reductions top out below DRAM speed: they are
  compute-bound on one element at a time);
- float32 multiply-add rate: OpenBLAS sgemm (numpy) on 2048^3, the best-tuned float32 kernel on the machine,
  as the practical FMA peak for a kernel that multiplies in float32.
Benchmarks measure before and after their timed rounds and keep the better of each (MachineLimits.best_of).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mili.kernels import build_env

ROOT = Path(__file__).resolve().parents[1]
READ_PROBE = ROOT / "benchmarks" / "mojo" / "read_bandwidth.mojo"


@dataclass(frozen=True)
class MachineLimits:
    cpu: str
    cores: int
    read_gb_s: float
    sgemm_gflop_s: float
    cpu_flags: str  # the SIMD features the kernels can use

    def best_of(self, other: MachineLimits) -> MachineLimits:
        """The higher of two measurements of each limit: a limit is what the machine can do, and on a shared
        machine a neighbour's burst during one probe only ever lowers it (seen here: 21 GB/s and 91 GFLOP/s at
        the start of a run whose later rounds ran at 34 GB/s-class speeds)."""
        return MachineLimits(self.cpu, self.cores, max(self.read_gb_s, other.read_gb_s),
                             max(self.sgemm_gflop_s, other.sgemm_gflop_s), self.cpu_flags)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.cpu}, {self.cores} cores ({self.cpu_flags}): read bandwidth {self.read_gb_s:.1f} GB/s, "
                f"float32 FMA rate {self.sgemm_gflop_s:.0f} GFLOP/s (OpenBLAS sgemm)")


def cpuinfo_field(name: str) -> str | None:
    """The first `name : value` line of /proc/cpuinfo (None where there is none)."""
    path = Path("/proc/cpuinfo")
    found = re.search(rf"^{name}\s*:\s*(.*)$", path.read_text() if path.exists() else "", re.MULTILINE)
    return found.group(1).strip() if found else None


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    return set((cpuinfo_field("flags") or "").split())


def simd_flags() -> str:
    flags = cpu_flags()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "no AVX2"


def read_bandwidth_gb_s(mib: int = 1024, passes: int = 7) -> float:
    mojo = Path(sys.executable).with_name("mojo")
    result = subprocess.run([str(mojo), "run", "-I", str(ROOT), str(READ_PROBE), str(mib), str(passes)],
                            capture_output=True, text=True, cwd=ROOT, env=build_env(), timeout=600)
    found = re.search(r"read_bandwidth_gb_s ([0-9.]+)", result.stdout)
    if result.returncode != 0 or not found:
        raise RuntimeError(f"the read-bandwidth probe failed:\n{result.stdout}\n{result.stderr[-2000:]}")
    return float(found.group(1))


def sgemm_gflop_s(size: int = 2048, repeats: int = 5) -> float:
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    a @ a
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        seconds.append(time.perf_counter() - start)
    return 2 * size ** 3 / float(np.median(seconds)) / 1e9


def measure() -> MachineLimits:
    print("measuring the machine: read bandwidth (1 GiB, all cores), float32 FMA rate (sgemm)...", flush=True)
    limits = MachineLimits(cpu_model(), os.cpu_count() or 1, read_bandwidth_gb_s(), sgemm_gflop_s(), simd_flags())
    print(f"  {limits.describe()}", flush=True)
    return limits
