"""Scale-out: N MILI replicas behind an existing router (sglang-router, PyPI `sglang-router`), its cache-aware
policy against its round-robin policy on a shared-prefix workload, and a replica killed mid-run.

    python -m benchmarks.routing [--model DIR] [--replicas 3] [--prefixes 4] [--requests-per-prefix 8]
        [--prefix-tokens 1024] [--concurrency 3] [--rounds 2] [--out routing]
    make bench-routing

Every policy is measured with a router process of its own over the same replicas, on system prompts of its own
(fresh random words, never seen by any replica), so no policy inherits another's cached prefixes; policies
alternate over the rounds. Per phase: the total prefix-cache hit rate is the replicas' own counters
(mili_cached_prompt_tokens_total over mili_prompt_tokens_total, the phase's increase), TTFT is measured by the
client through the router (streamed, benchmarks/serving_client.py). Then the failover phase: cache-aware routing,
one replica SIGKILLed after a third of the requests; every request sent after the kill must succeed (the router
retries a refused connection on another replica and its health checks drop the dead one), and a request may fail
only if it was in flight when the replica died.

Why sglang-router and not vllm-router (0.1.17, a fork of it): measured here with the CI test's workload, vllm-router's
cache_aware policy spread each new system prompt over all three replicas when requests for it arrived together
(hit rate 48.8% against round-robin's 52.9%), while sglang-router's kept each on one replica (73.2% against 48.8%).

All replicas share this machine's cores: a prompt that two replicas both prefill costs the machine twice, which is
what cache-aware routing saves. tests/integration/test_routing.py runs the same phases on a tiny model in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.machine import measure
from benchmarks.peers import arguments
from benchmarks.peers.servers import SERVED_NAME, RunningServer, ServerSpec, server_spec, unwind_on_sigterm
from benchmarks.report import RunRecord, markdown_table
from benchmarks.serving_client import Outcome, Request, WordVocabulary, send, shared_prefix_dataset

ROUTER_VERSION = "0.3.2"  # sglang-router, PyPI
POLICIES = ("round_robin", "cache_aware")
ROUTER_PORTS = (8160, 8161)  # the router and its metrics; the replicas take 8170 and up
QUESTION_TOKENS = 24
OUTPUT_TOKENS = 8


def router_command() -> list[str]:
    """sglang-router's launcher, run by this interpreter (it is in MILI's test extras)."""
    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError(f"sglang-router is not installed: pip install 'sglang-router=={ROUTER_VERSION}' (in "
                           f"MILI's test extras)")
    return [sys.executable, "-m", "sglang_router.launch_router"]


def router_spec(policy: str, worker_urls: list[str], ports: tuple[int, int]) -> ServerSpec:
    """sglang-router over `worker_urls`, serving on ports[0], its own metrics on ports[1]. Health checks every
    second, a worker dropped after one failed check, a circuit opened after two failed requests: a dead replica
    leaves the rotation within about a second, and the requests sent to it meanwhile are retried on another
    (refused connections, 5xx)."""
    return ServerSpec(f"sglang-router {policy}", None, [
        *router_command(), "--host", "127.0.0.1", "--port", str(ports[0]), "--policy", policy,
        "--worker-urls", *worker_urls, "--health-check-endpoint", "/health", "--health-check-interval-secs", "1",
        "--health-failure-threshold", "1", "--cb-failure-threshold", "2", "--log-level", "warn",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(ports[1])],
        port=ports[0], startup_timeout_s=120)


def start_replicas(specs: list[ServerSpec]) -> list[RunningServer]:
    """The first replica alone (a cold start compiles the model graph into MAX's cache), then the others (warm)."""
    replicas: list[RunningServer] = []
    try:
        for spec in specs:
            print(f"starting {spec.name} on port {spec.port} ...", flush=True)
            replicas.append(RunningServer(spec))
            print(f"  ready in {replicas[-1].startup_s:.0f} s", flush=True)
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def prompt_token_counters(urls: list[str]) -> tuple[float, float]:
    """(prompt tokens, prompt tokens served from the prefix cache) summed over the replicas that answer."""
    prompt = cached = 0.0
    for url in urls:
        try:
            text = httpx.get(f"{url}/metrics", timeout=5).text
        except httpx.HTTPError:
            continue  # a replica killed on purpose
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "mili_prompt_tokens_total":
                    prompt += sample.value
                elif sample.name == "mili_cached_prompt_tokens_total":
                    cached += sample.value
    return prompt, cached


@dataclass
class Sent:
    """One request through the router: when it left and came back (seconds on the client's clock) and how."""
    started_s: float
    finished_s: float
    outcome: Outcome


async def send_all(url: str, requests: list[Request], concurrency: int,
                   on_finished: Callable[[int], None] | None = None) -> list[Sent]:
    """`concurrency` users, each sending its next request when the last one finished; `on_finished(count)` is
    called after each (the failover phase kills a replica from it)."""
    queue = list(reversed(requests))
    done: list[Sent] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        async def user() -> None:
            while queue:
                request = queue.pop()
                started = time.perf_counter()
                outcome = await send(client, url, SERVED_NAME, request)
                done.append(Sent(started, time.perf_counter(), outcome))
                if on_finished is not None:
                    on_finished(len(done))
        await asyncio.gather(*(user() for _ in range(concurrency)))
    return done


@dataclass
class PhaseResult:
    policy: str
    requests: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    mean_ttft_ms: float
    median_ttft_ms: float
    wall_s: float
    router_models: list[str]  # what the router's own /v1/models lists (it asks the replicas' /server_info)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def describe(self) -> str:
        return (f"{self.policy}: hit rate {self.hit_rate:.1%} ({self.cached_tokens:.0f} of {self.prompt_tokens:.0f} "
                f"prompt tokens cached), TTFT mean {self.mean_ttft_ms:.0f} ms / median {self.median_ttft_ms:.0f} ms, "
                f"{self.failed} of {self.requests} failed, {self.wall_s:.1f} s")


def workload(vocab: WordVocabulary, prefixes: int, per_prefix: int, prefix_tokens: int, seed: int) -> list[Request]:
    return shared_prefix_dataset(vocab, prefixes * per_prefix, prefixes, prefix_tokens, QUESTION_TOKENS,
                                 OUTPUT_TOKENS, seed)


def run_policy(policy: str, replica_urls: list[str], router_ports: tuple[int, int], requests: list[Request],
               concurrency: int) -> PhaseResult:
    """One phase: a fresh router with `policy` over the replicas, every request sent through it."""
    router = RunningServer(router_spec(policy, replica_urls, router_ports))
    try:
        models = httpx.get(f"{router.spec.base_url}/v1/models", timeout=10).json().get("data", [])
        before = prompt_token_counters(replica_urls)
        started = time.perf_counter()
        sent = asyncio.run(send_all(router.spec.base_url, requests, concurrency))
        wall_s = time.perf_counter() - started
        after = prompt_token_counters(replica_urls)
    finally:
        router.stop()
    ttfts = [s.outcome.ttft_s * 1e3 for s in sent if s.outcome.ok]
    return PhaseResult(policy, len(sent), sum(not s.outcome.ok for s in sent), round(after[0] - before[0]),
                       round(after[1] - before[1]), statistics.fmean(ttfts) if ttfts else float("nan"),
                       statistics.median(ttfts) if ttfts else float("nan"), wall_s, [m["id"] for m in models])


@dataclass
class FailoverResult:
    requests: int
    killed_at_request: int
    failed_before_kill: int  # finished before the kill: must be 0
    failed_in_flight: int  # in flight when the replica died: allowed (they may have been on it)
    failed_after_kill: int  # sent after the kill: must be 0
    served_after: int  # a further batch once the run ended, all through the router
    served_after_ok: int
    errors: list[str]

    def describe(self) -> str:
        return (f"failover: replica killed after request {self.killed_at_request} of {self.requests}; failed: "
                f"{self.failed_before_kill} before the kill, {self.failed_in_flight} in flight at it, "
                f"{self.failed_after_kill} sent after it; then {self.served_after_ok} of {self.served_after} served")


def run_failover(replicas: list[RunningServer], router_ports: tuple[int, int], requests: list[Request],
                 after: list[Request],
                 concurrency: int) -> FailoverResult:
    """Cache-aware routing; the last replica is SIGKILLed once a third of the requests have finished."""
    urls = [r.spec.base_url for r in replicas]
    victim = replicas[-1]
    kill_after = max(1, len(requests) // 3)
    killed_at: list[float] = []

    def maybe_kill(finished: int) -> None:
        if finished == kill_after and not killed_at:
            os.killpg(victim.process.pid, signal.SIGKILL)
            killed_at.append(time.perf_counter())
            print(f"  killed {victim.spec.name} after {finished} requests", flush=True)

    router = RunningServer(router_spec("cache_aware", urls, router_ports))
    try:
        sent = asyncio.run(send_all(router.spec.base_url, requests, concurrency, maybe_kill))
        later = asyncio.run(send_all(router.spec.base_url, after, concurrency))
    finally:
        router.stop()
        victim.process.wait()
    kill = killed_at[0]
    failed = [s for s in sent if not s.outcome.ok]
    return FailoverResult(
        requests=len(sent), killed_at_request=kill_after,
        failed_before_kill=sum(s.finished_s < kill for s in failed),
        failed_in_flight=sum(s.started_s <= kill <= s.finished_s for s in failed),
        failed_after_kill=sum(s.started_s > kill for s in failed),
        served_after=len(later), served_after_ok=sum(s.outcome.ok for s in later),
        errors=[s.outcome.error for s in failed + [s for s in later if not s.outcome.ok]][:5])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments.add_common(parser, (), "routing")
    parser.add_argument("--replicas", type=int, default=3, help="MILI processes (default 3)")
    parser.add_argument("--prefixes", type=int, default=4, help="system prompts per phase (default 4)")
    parser.add_argument("--requests-per-prefix", type=int, default=8, help="requests sharing each (default 8)")
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="tokens of each system prompt (default 1024)")
    parser.add_argument("--concurrency", type=int, default=3, help="requests in flight (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="phases per policy, alternating (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    arguments.at_least_one(parser, args, "prefixes", "requests_per_prefix", "prefix_tokens", "concurrency", "rounds")
    if args.replicas < 2:
        parser.error("--replicas must be at least 2 (routing needs a choice)")
    router_command()
    unwind_on_sigterm()
    model = arguments.checkpoint(args)
    record = RunRecord("cache-aware routing", str(model), measure(), method=(
        f"{args.replicas} MILI bf16 replicas behind sglang-router; per phase {args.prefixes} fresh system prompts of "
        f"{args.prefix_tokens} tokens x {args.requests_per_prefix} requests ({QUESTION_TOKENS}-token question, "
        f"{OUTPUT_TOKENS} output tokens), concurrency {args.concurrency}; {args.rounds} rounds of each policy, "
        f"alternating; then a failover phase with one replica SIGKILLed"))
    vocab = WordVocabulary(model)
    seeds = random.Random(args.seed)
    kv_gib = 1
    specs = [server_spec("mili", model, 8170 + i, 16, kv_gib) for i in range(args.replicas)]
    specs = [ServerSpec(f"MILI replica {i}", None, s.command, port=s.port) for i, s in enumerate(specs)]
    results: list[PhaseResult] = []
    replicas = start_replicas(specs)
    try:
        urls = [r.spec.base_url for r in replicas]
        for round_index in range(args.rounds):
            for policy in POLICIES if round_index % 2 == 0 else reversed(POLICIES):
                requests = workload(vocab, args.prefixes, args.requests_per_prefix, args.prefix_tokens,
                                    seeds.randrange(1 << 30))
                results.append(run_policy(policy, urls, ROUTER_PORTS, requests, args.concurrency))
                print(f"  round {round_index + 1}: {results[-1].describe()}", flush=True)
        failover = run_failover(replicas, ROUTER_PORTS, workload(vocab, args.prefixes, args.requests_per_prefix,
                                                         args.prefix_tokens, seeds.randrange(1 << 30)),
                                workload(vocab, 2, 2, args.prefix_tokens, seeds.randrange(1 << 30)), args.concurrency)
        print(f"  {failover.describe()}", flush=True)
    finally:
        for replica in replicas:
            replica.stop()
    record.finish()
    rows = []
    for policy in POLICIES:
        mine = [r for r in results if r.policy == policy]
        rows.append({"policy": policy, "hit_rate": statistics.median(r.hit_rate for r in mine),
                     "mean_ttft_ms": statistics.median(r.mean_ttft_ms for r in mine),
                     "median_ttft_ms": statistics.median(r.median_ttft_ms for r in mine),
                     "failed": sum(r.failed for r in mine), "phases": [asdict(r) for r in mine]})
    print("\n" + record.header() + "\n")
    print(markdown_table(["policy", "prefix-cache hit rate", "mean TTFT ms", "median TTFT ms", "failed"],
                         [[r["policy"], f"{r['hit_rate']:.1%}", f"{r['mean_ttft_ms']:.0f}",
                           f"{r['median_ttft_ms']:.0f}", str(r["failed"])] for r in rows]))
    print(f"\n{failover.describe()}")
    print(f"\nwrote {record.write(rows, args.out, {'failover': asdict(failover)})}")


if __name__ == "__main__":
    main()
