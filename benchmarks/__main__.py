"""`python -m benchmarks`: every benchmark suite MILI has, one after another, each with its defaults.

The kernel benchmarks (benchmarks/kernels.py: each op against MAX's and numpy), then the whole model
(benchmarks/model.py: prefill and decode speed per dtype). Throughput and serving benchmarks join as the
engine and server land. Run a suite alone with `python -m benchmarks.kernels` or `python -m benchmarks.model`.
"""

from benchmarks import kernels, model

if __name__ == "__main__":
    kernels.main([])
    model.main([])
