"""`python -m benchmarks`: every benchmark suite MILI has, one after another, each with its defaults.

The kernel benchmarks (benchmarks/kernels.py: each op against MAX's and numpy), the linear op
(benchmarks/linear.py: bf16/int8 packed weights against MAX's matmul, torch and numpy), then the whole model
(benchmarks/model.py: prefill and decode speed per dtype), where a decode step's time goes
(benchmarks/step.py), then the engine (benchmarks/throughput.py:
offline throughput by concurrency, TTFT with a cached prefix), then speculative decoding
(benchmarks/speculative.py), then structured output (benchmarks/structured.py: grammar engines' mask cost,
decode with and without a JSON schema). Serving benchmarks join with the server.
Run a suite alone with `python -m benchmarks.kernels`, `.linear`, `.model`, `.step`, `.throughput`,
`.speculative` or `.structured`.
"""

from benchmarks import kernels, linear, model, speculative, step, structured, throughput

if __name__ == "__main__":
    kernels.main([])
    linear.main([])
    model.main([])
    step.main([])
    throughput.main([])
    speculative.main([])
    structured.main([])
