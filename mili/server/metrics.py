"""Prometheus metrics of the server, in a registry of its own (one per app, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mili.engine.engine import Engine
from mili.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("mili_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("mili_inter_token_latency_seconds", "Mean time between a request's tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mili_e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue = Histogram("mili_request_queue_time_seconds", "Arrival to first scheduled",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mili_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("mili_generation_tokens", "Generated tokens of finished requests",
                                        registry=r)
        self.cached_tokens = Counter("mili_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.finished = Counter("mili_requests_finished", "Finished requests by finish reason", ["reason"],
                                registry=r)
        self.aborted = Counter("mili_requests_aborted", "Requests aborted (client gone, or failed)", registry=r)
        self.rejected = Counter("mili_requests_rejected", "Requests refused because the queue was full",
                                registry=r)

    def watch(self, engine: Engine) -> None:
        """Gauges read from the engine when scraped."""
        r = self.registry
        Gauge("mili_requests_running", "Sequences running", registry=r).set_function(lambda: engine.num_running)
        Gauge("mili_requests_waiting", "Sequences waiting", registry=r).set_function(lambda: engine.num_waiting)
        Gauge("mili_kv_blocks_used", "KV blocks in use or cached", registry=r).set_function(
            lambda: engine.pool.num_used)
        Gauge("mili_kv_cache_usage_ratio", "Share of KV blocks in use or cached", registry=r).set_function(
            lambda: engine.pool.num_used / engine.pool.num_blocks)
        Gauge("mili_preemptions_total", "Sequences preempted since start", registry=r).set_function(
            lambda: engine.scheduler.num_preemptions)
        if engine.proposer is not None:
            spec = engine.speculation
            for name, doc, read in (
                    ("mili_spec_decode_num_drafts_total", "Sequence-steps that verified guessed tokens",
                     lambda: spec.verify_steps),
                    ("mili_spec_decode_num_draft_tokens_total", "Guessed tokens verified", lambda: spec.proposed),
                    ("mili_spec_decode_num_accepted_tokens_total", "Guessed tokens accepted", lambda: spec.accepted),
                    ("mili_spec_decode_acceptance_rate", "Accepted / verified guessed tokens since start",
                     lambda: spec.acceptance_rate),
                    ("mili_spec_decode_mean_accepted_length",
                     "Tokens per verify step since start (accepted guesses + 1)", lambda: spec.mean_accepted_length)):
                Gauge(name, doc, registry=r).set_function(read)

    def observe(self, out: RequestOutput) -> None:
        """Records a finished request."""
        m = out.metrics
        for value, histogram in ((m.ttft_s, self.ttft), (m.time_per_output_token_s, self.inter_token),
                                 (m.queue_s, self.queue), (m.e2e_s, self.e2e)):
            if value is not None:
                histogram.observe(value)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generated_tokens.inc(sum(c.num_tokens for c in out.outputs))
        self.cached_tokens.inc(m.cached_tokens)
        for completion in out.outputs:
            self.finished.labels(completion.finish_reason or "abort").inc()
