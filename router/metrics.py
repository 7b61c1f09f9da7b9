"""Prometheus metrics of the router (and a helper workers use to serve theirs).

Each ``RouterMetrics`` owns its own registry, so several routers in one process (tests) do not
collide. ``serve_metrics(registry, host, port)`` exposes one on a metrics port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("colm_requests", "Finished requests by status and scale", ["status", "scale"], registry=r)
        self.tokens = Counter("colm_generated_tokens", "Generated tokens by scale", ["scale"], registry=r)
        self.ttft = Histogram("colm_ttft_seconds", "Time to first token", ["scale"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("colm_tpot_seconds", "Mean time per output token after the first", ["scale"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("colm_e2e_seconds", "End-to-end request latency", ["scale"], buckets=LATENCY_BUCKETS_S,
                             registry=r)
        self.queued = Gauge("colm_router_queued", "Requests waiting for admission", registry=r)
        self.running = Gauge("colm_router_running", "Requests admitted and running", registry=r)
        self.retries = Counter("colm_retries", "Attempts retried on another worker", registry=r)
        self.scale_changes = Counter("colm_scale_changes", "Running requests moved to a smaller scale", registry=r)
        self.degraded = Counter("colm_degraded", "Requests served below their budget at the smallest scale", registry=r)
        self.kv_used = Gauge("colm_kv_blocks_used", "KV blocks in use per decode worker", ["worker"], registry=r)
        self.kv_total = Gauge("colm_kv_blocks_total", "KV blocks per decode worker", ["worker"], registry=r)
        self.prefill_queue = Gauge("colm_prefill_queued_tokens", "Queued prompt tokens per prefill worker", ["worker"],
                                   registry=r)
        self.worker_healthy = Gauge("colm_worker_healthy", "1 if the worker is in service", ["worker", "role"], registry=r)
        self.transfer_bytes = Gauge("colm_kv_transfer_bytes", "KV bytes handed from prefill to decode (worker total)",
                                    ["worker"], registry=r)
        self.transfer_seconds = Gauge("colm_kv_transfer_seconds", "Time spent on KV hand-off (worker total)",
                                      ["worker"], registry=r)


class EngineStatsCollector:
    """Exposes a worker engine's ``stats()`` (a dataclass of numbers) as gauges ``colm_<role>_<field>``."""

    def __init__(self, engine, role: str, worker_id: str) -> None:
        self.engine, self.role, self.worker_id = engine, role, worker_id

    def collect(self):
        import dataclasses

        from prometheus_client.core import GaugeMetricFamily

        stats = self.engine.stats()
        for f in dataclasses.fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            g = GaugeMetricFamily(f"colm_{self.role}_{f.name}", f"{self.role} engine {f.name}", labels=["worker"])
            g.add_metric([self.worker_id], float(value))
            yield g


def worker_registry(engine, role: str, worker_id: str) -> CollectorRegistry:
    r = CollectorRegistry()
    r.register(EngineStatsCollector(engine, role, worker_id))
    return r


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Start a metrics HTTP server in a thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)
