"""`python -m benchmarks`: every benchmark suite MILI has, one after another.

So far: the kernel benchmarks (benchmarks/kernels.py). Model, throughput and serving benchmarks join
as the engine and server land.
"""

from benchmarks import kernels

if __name__ == "__main__":
    kernels.main()
