"""Prometheus metrics (`GET /metrics`), one registry per app (several apps may share a process).

Gauges and the engine's cumulative counters are read from the loop's `Snapshot` when scraped;
histograms and per-request counters are fed as requests finish.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from spanjax.engine.scheduler import Request

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _SnapshotCollector:
    def __init__(self, get_snapshot, get_step_errors):
        self.get_snapshot = get_snapshot
        self.get_step_errors = get_step_errors

    def collect(self):
        s = self.get_snapshot()
        for name, doc, v in (
            ("spanjax_requests_running", "Engine requests admitted and running.", s.running),
            ("spanjax_requests_waiting", "Engine requests waiting for admission.", s.waiting),
            ("spanjax_http_jobs_in_engine", "HTTP requests (jobs) the stepping loop is serving.", s.jobs),
            ("spanjax_kv_pages_total", "KV pages in the pool (the null page excluded).", s.pages_total),
            ("spanjax_kv_pages_used", "KV pages held by running requests.", s.pages_used),
            ("spanjax_kv_pages_cached", "KV pages published in the prefix cache.", s.pages_cached),
        ):
            yield GaugeMetricFamily(name, doc, value=v)
        for name, doc, v in (
            ("spanjax_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.", s.hit_tokens),
            ("spanjax_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
             s.hit_tokens + s.miss_tokens),
            ("spanjax_compilations", "Jitted step compilations.", s.compilations),
            ("spanjax_engine_steps", "Engine steps run.", s.steps),
            ("spanjax_engine_step_errors", "Engine steps that raised.", self.get_step_errors()),
        ):  # fmt: skip
            yield CounterMetricFamily(name, doc, value=v)


class Metrics:
    def __init__(self, get_snapshot, get_step_errors):
        self.registry = CollectorRegistry()
        self.registry.register(_SnapshotCollector(get_snapshot, get_step_errors))
        r = self.registry
        self.ttft = Histogram("spanjax_time_to_first_token_seconds", "Engine TTFT per generation.",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("spanjax_e2e_request_latency_seconds", "HTTP request latency, arrival to last byte.",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.generated = Counter("spanjax_generation_tokens", "Tokens generated.", registry=r)
        self.prompt = Counter("spanjax_prompt_tokens", "Prompt tokens of finished generations.", registry=r)
        self.preemptions = Counter("spanjax_preemptions", "Preemptions of finished generations.", registry=r)
        self.finished = Counter("spanjax_generations_finished", "Generations finished, by reason.", ["reason"],
                                registry=r)  # fmt: skip
        self.http = Counter("spanjax_http_requests", "HTTP requests answered, by endpoint and status.",
                            ["endpoint", "status"], registry=r)  # fmt: skip
        self.rejected = Counter("spanjax_rejected_requests", "Requests refused because the queue was full.",
                                registry=r)  # fmt: skip

    def request_finished(self, r: Request) -> None:
        """Called on the loop thread for every finished engine request (prometheus_client is thread-safe)."""
        if r.metrics.ttft_s is not None:
            self.ttft.observe(r.metrics.ttft_s)
        self.generated.inc(len(r.generated))
        self.prompt.inc(r.metrics.prompt_tokens)
        self.preemptions.inc(r.metrics.preemptions)
        self.finished.labels(r.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
