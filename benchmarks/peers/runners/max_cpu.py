"""MAX 26.7's own pipelines CLI (`max serve`, `max generate`, ...) on a machine without a GPU.

MAX's Qwen3 layers build an Allreduce even for one device, and Allreduce's constructor creates Accelerator
objects unconditionally (max/nn/comm/allreduce.py), which fails with no GPU. Where there is none, this hands it the
CPU device instead; nothing else changes. Usage: `python max_cpu.py serve --model-path DIR --devices cpu
--quantization-encoding float32 ...` in the MAX peer's venv (benchmarks/peers/setup.py)."""

import sys

from max.driver import CPU, accelerator_count
from max.nn.comm import allreduce

if accelerator_count() == 0:
    allreduce.Accelerator = lambda id=0: CPU()

# MAX starts its model worker with multiprocessing's spawn, which imports this file again as __mp_main__: the
# patch above applies there too (the worker builds the graph), and only the real main starts the CLI.
if __name__ == "__main__":
    from max._entrypoints.pipelines import main  # after the patch: this imports the models

    sys.exit(main())
