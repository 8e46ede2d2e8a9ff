"""The engines MILI is measured against, each installed in a folder of its own (never in MILI's environment):
vLLM's CPU build, llama.cpp's tools, transformers on torch CPU, and MAX 26.7's built-in Qwen3 pipeline.

`python -m benchmarks.peers.setup` (make bench-peers-setup) installs them; benchmarks/peers/engines.py knows how to
run each one; benchmarks/peers/runners/ holds the scripts that run inside a peer's own interpreter.
"""
