# Set-up without pixi: every target creates .venv with pip when it is missing, installs what it needs
# (once; again only when pyproject.toml changes), builds the Mojo kernels when their sources change,
# then runs. `make test` and `make serve` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
PYTEST_ARGS ?=
SERVE_ARGS ?=
BENCH_ARGS ?=

.PHONY: install install-test build test serve bench-kernels bench-linear bench-model bench-step bench-throughput bench-speculative bench-structured bench bench-peers-setup bench-latency bench-gguf bench-gguf-accuracy bench-offline bench-serving bench-prefix bench-routing bench-startup bench-client-check bench-plots checkpoint-0.6b clean

$(BIN)/python:
	@echo "make: creating the virtual environment $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

# Runtime dependencies (modular, numpy, tokenizers, fastapi, the Qwen3 tokenizer files, ...) and the package
# itself, editable. pip runs --quiet (its full output is hundreds of lines); the echo says what the silent
# minute or two is spent on.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "make: installing MILI and its dependencies (MAX, numpy, tokenizers, fastapi, ...) into $(VENV)," \
	      "quietly; the first time takes a minute or two"
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -e .
	touch $@

# Test references on top: pytest, torch 2.13.0, transformers, the openai client, httpx, schemathesis.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	@echo "make: installing the test references (pytest, torch, transformers, openai, httpx, schemathesis)," \
	      "quietly; the first time takes a few minutes (torch is a large download)"
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

build/mili_kernels.mojoc: $(VENV)/.installed build.sh $(wildcard mojo_kernels/*.mojo)
	./build.sh

build: build/mili_kernels.mojoc

test: install-test build
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: install build
	$(BIN)/mili serve $(SERVE_ARGS)

bench-kernels: install build
	$(BIN)/python -m benchmarks.kernels $(BENCH_ARGS)

# The linear-op benchmark compares with torch's F.linear: test extras.
bench-linear: install-test build
	$(BIN)/python -m benchmarks.linear $(BENCH_ARGS)

# The model benchmark writes its random-weight checkpoint with transformers on first use: test extras.
bench-model: install-test build
	$(BIN)/python -m benchmarks.model $(BENCH_ARGS)

# Where a decode step's time goes (linear layers, attention, the rest); same checkpoint as bench-model.
bench-step: install-test build
	$(BIN)/python -m benchmarks.step $(BENCH_ARGS)

bench-throughput: install-test build
	$(BIN)/python -m benchmarks.throughput $(BENCH_ARGS)

# Speculative decoding: verify-step cost and decode speed off / ngram / 2-layer draft (writes the draft on first use).
bench-speculative: install-test build
	$(BIN)/python -m benchmarks.speculative $(BENCH_ARGS)

# Structured output: llguidance against xgrammar (vLLM peer's) per-token mask cost; decode tok/s with and without a
# JSON schema at batch 1 and 16.
bench-structured: install-test build
	$(BIN)/python -m benchmarks.structured $(BENCH_ARGS)

bench: install-test build
	$(BIN)/python -m benchmarks

# The peer engines (vLLM CPU, llama.cpp, transformers, MAX's own pipeline), each in a folder of its own under
# ~/.cache/mili/peers, never in .venv; cached (a ready peer is skipped). ~15 min the first time.
bench-peers-setup: install
	$(BIN)/python -m benchmarks.peers.setup $(BENCH_ARGS)

# MILI against its peers on one checkpoint, in one run each (see benchmarks/<name>.py): batch-1 latency,
# offline throughput, serving at fixed concurrency and Poisson rates, prefix-cache TTFT, cold/warm start-up
# against MAX; then the plots.
bench-latency: install-test build
	$(BIN)/python -m benchmarks.latency $(BENCH_ARGS)

# The same GGUF files (llama.cpp's converter and llama-quantize) in MILI and llama.cpp: load, memory, latency.
bench-gguf: install-test build
	$(BIN)/python -m benchmarks.gguf $(BENCH_ARGS)

# KL of MILI's and llama.cpp's next-token distributions against transformers on one GGUF file.
bench-gguf-accuracy: install-test build
	$(BIN)/python -m benchmarks.gguf_accuracy $(BENCH_ARGS)

bench-offline: install-test build
	$(BIN)/python -m benchmarks.offline $(BENCH_ARGS)

bench-serving: install-test build
	$(BIN)/python -m benchmarks.serving $(BENCH_ARGS)

bench-prefix: install-test build
	$(BIN)/python -m benchmarks.prefix $(BENCH_ARGS)

# N MILI replicas behind sglang-router: cache-aware against round-robin routing, then a replica killed mid-run.
bench-routing: install-test build
	$(BIN)/python -m benchmarks.routing $(BENCH_ARGS)

bench-startup: install-test build
	$(BIN)/python -m benchmarks.startup $(BENCH_ARGS)

# Our serving client against `vllm bench serve` on one load point of one `vllm serve`.
bench-client-check: install-test build
	$(BIN)/python -m benchmarks.client_check $(BENCH_ARGS)

bench-plots: install-test
	$(BIN)/python -m benchmarks.plots $(BENCH_ARGS)

# A random-weight checkpoint of Qwen3-0.6B's shape (bf16, ~1.2 GB) in the shared cache, for benchmarks.
checkpoint-0.6b: install-test
	$(BIN)/mili checkpoint --preset qwen3-0.6b

clean:
	rm -rf build
