"""The kernel graphs and the whole int8 Qwen3 graph compile for a virtual NVIDIA sm_90 GPU (the GPU code paths are
generated and type-checked), and the dense model graph builds for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")


def test_kernel_and_model_graphs_compile_for_virtual_sm90():
    result = subprocess.run([sys.executable, str(SCRIPT), "sm_90"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"GPU compile failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    # the elementwise graph, the attention graph (every case), the linear-op graph and the int8 model, compiled
    assert result.stdout.count("CompileOnlyModel") == 4, result.stdout
    assert "built qwen3_gpu (dense bfloat16)" in result.stdout and "compiled qwen3_gpu_int8 " in result.stdout
