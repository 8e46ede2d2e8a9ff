"""The line protocol between the benchmark driver (benchmarks/peers/workers.py) and an engine worker, a process
running in the engine's own interpreter. Standard library only: it is imported in every peer's venv.

The worker loads its model, then writes one JSON line `{"ready": true, ...facts}` and answers each JSON command
line on stdin (`{"op": "latency", ...}`) with one JSON line (`{"ok": true, ...}` or `{"ok": false, "error": ...}`)
until `{"op": "quit"}` or end of input. Everything the engine itself prints goes to stderr, so stdout carries
only the protocol.

Measurements every worker makes the same way:
- latency(prompt, decode): batch 1, greedy, EOS ignored, no prefix cache. prefill_s is the time to produce the
  first token of the prompt; decode_s the time per token of `decode` more tokens, i.e.
  (time for decode + 1 tokens - prefill_s) / decode, measured back to back.
- offline(requests): every request {"prompt": [ids], "max_tokens": n} submitted at once, greedy, EOS ignored;
  seconds from submission to the last completion, and the output tokens produced.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol


class Worker(Protocol):
    def facts(self) -> dict[str, Any]: ...  # load time, weight bytes, versions: sent with the ready line

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> int: ...  # output tokens produced


def latency(worker: Worker, prompt: list[int], decode: int) -> dict[str, float]:
    start = time.perf_counter()
    worker.generate([prompt], [1])
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    worker.generate([prompt], [decode + 1])
    total_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_s": max(total_s - prefill_s, 0.0) / decode}


def offline(worker: Worker, requests: list[dict[str, Any]]) -> dict[str, float]:
    start = time.perf_counter()
    produced = worker.generate([r["prompt"] for r in requests], [r["max_tokens"] for r in requests])
    return {"seconds": time.perf_counter() - start, "output_tokens": produced}


def serve(load: Callable[[], Worker]) -> None:
    """Loads the worker and answers commands until told to quit."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the engine's own prints go to stderr
    sys.stdout = sys.stderr
    started = time.perf_counter()
    worker = load()
    facts = {"load_s": time.perf_counter() - started, **worker.facts()}
    channel.write(json.dumps({"ready": True, **facts}) + "\n")
    ops: dict[str, Callable[..., dict[str, Any]]] = {
        "latency": lambda **kw: latency(worker, **kw), "offline": lambda **kw: offline(worker, **kw)}
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            break
        try:
            reply = {"ok": True, **ops[op](**command)}
        except Exception as error:  # the driver reports it and goes on with the other engines
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        channel.write(json.dumps(reply) + "\n")
