"""Scale-out with an existing router: MILI replicas (real `mili serve` processes on 127.0.0.1) behind sglang-router.
On a shared-prefix workload its cache_aware policy must give a clearly higher total prefix-cache hit rate and a
lower mean TTFT than its round_robin policy, measured in the same run; a replica killed mid-run loses no request
that had not started on it, and the router keeps serving. A small model and a bounded workload (~2 minutes);
benchmarks/routing.py runs the same phases on Qwen3-0.6B's shape.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

import pytest

from benchmarks.peers.servers import SERVED_NAME, ServerSpec
from benchmarks.routing import run_failover, run_policy, send_all, start_replicas, workload
from benchmarks.serving_client import WordVocabulary
from mili.checkpoints import cached_checkpoint
from tests.servers import free_port

REPLICAS = 3
PREFIXES, PER_PREFIX, PREFIX_TOKENS = 4, 6, 1500
CONCURRENCY = 3


def replica_spec(model: str, index: int) -> ServerSpec:
    port = free_port()
    return ServerSpec(f"routing-test-replica-{index}", None, [
        sys.executable, "-m", "mili.cli", "serve", "--model", model, "--port", str(port),
        "--served-model-name", SERVED_NAME, "--kv-cache-memory", "2e8", "--max-model-len", "2048",
        "--max-num-seqs", "8"], port=port, startup_timeout_s=900)


@pytest.mark.slow
def test_cache_aware_routing_beats_round_robin_and_survives_a_dead_replica():
    seed = int(os.environ.get("MILI_TEST_SEED", random.randrange(1 << 30)))
    print(f"seed {seed} (replay: MILI_TEST_SEED={seed})")
    rng = random.Random(seed)
    model = cached_checkpoint("tiny-tied-gqa4-d128")
    vocab = WordVocabulary(model)
    replicas = start_replicas([replica_spec(str(model), i) for i in range(REPLICAS)])
    try:
        urls = [r.spec.base_url for r in replicas]
        for url in urls:  # the first request of a process pays one-off costs; not the policies' business
            asyncio.run(send_all(url, workload(vocab, 1, 1, 16, rng.randrange(1 << 30)), 1))
        phases = {}
        for policy in ("round_robin", "cache_aware"):
            requests = workload(vocab, PREFIXES, PER_PREFIX, PREFIX_TOKENS, rng.randrange(1 << 30))
            phases[policy] = run_policy(policy, urls, (free_port(), free_port()), requests, CONCURRENCY)
        for phase in phases.values():
            print(phase.describe())
        failover = run_failover(replicas, (free_port(), free_port()),
                                workload(vocab, PREFIXES, PER_PREFIX, PREFIX_TOKENS, rng.randrange(1 << 30)),
                                workload(vocab, 2, 3, PREFIX_TOKENS, rng.randrange(1 << 30)), CONCURRENCY)
        print(failover.describe(), failover.errors)
    finally:
        for replica in replicas:
            replica.stop()
    robin, aware = phases["round_robin"], phases["cache_aware"]
    assert robin.requests == aware.requests == PREFIXES * PER_PREFIX
    assert robin.failed == aware.failed == 0
    assert aware.router_models == [SERVED_NAME]  # the router learnt the served name from the replicas
    assert robin.prompt_tokens == aware.prompt_tokens >= PREFIXES * PER_PREFIX * PREFIX_TOKENS
    assert aware.hit_rate > robin.hit_rate + 0.15, (aware.describe(), robin.describe())
    assert aware.mean_ttft_ms < robin.mean_ttft_ms, (aware.describe(), robin.describe())
    assert failover.requests == PREFIXES * PER_PREFIX
    assert failover.failed_before_kill == 0 and failover.failed_after_kill == 0, failover.errors
    assert failover.failed_in_flight <= CONCURRENCY
    assert failover.served_after == failover.served_after_ok == 6, failover.errors
