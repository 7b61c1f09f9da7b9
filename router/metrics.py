"""Prometheus metrics of the router (and a helper workers use to serve theirs).

Each ``RouterMetrics`` owns its own registry, so several routers in one process (tests) do not
collide. ``serve_metrics(registry, host, port)`` exposes one on a metrics port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASE_BUCKETS_S = (0.0005, 0.001, 0.0025) + LATENCY_BUCKETS_S  # a decode step is ~1 ms


def _span(t: dict, start: str, end: str) -> float | None:
    return max(0.0, (t[end] - t[start]) / 1000.0) if start in t and end in t else None


def decode_phases(timeline_ms: dict) -> dict[str, float]:
    """Seconds of a request's phases on its decode worker, from the first TokenEvent's milestones (ms):
    kv_wait (generation asked -> KV complete), admission (both -> joined the batch), first_step (-> token)."""
    t = timeline_ms
    out = {"kv_wait": _span(t, "started", "kv_done"), "first_step": _span(t, "admitted", "first_token")}
    if "admitted" in t and "started" in t:
        out["admission"] = max(0.0, (t["admitted"] - max(t["started"], t.get("kv_done", t["started"]))) / 1000.0)
    return {k: v for k, v in out.items() if v is not None}


def prefill_phases(timeline_ms: dict) -> dict[str, float]:
    """Seconds of a request's phases on its prefill worker, from PrefillReply / PrefillResult milestones (ms):
    prefill_queue (submitted -> its batch started), prefill_compute (-> forward done on the device),
    kv_delivery (-> decode acknowledged the last K/V)."""
    t = timeline_ms
    out = {"prefill_queue": _span(t, "submitted", "batch_start"), "prefill_compute": _span(t, "batch_start", "computed"),
           "kv_delivery": _span(t, "computed", "delivered")}
    return {k: v for k, v in out.items() if v is not None}


def report_timeline(req, role: str, monotonic_s: float, timeline_ms) -> None:
    """Hand one worker's milestones of ``req`` (an ``EngineRequest``; ``role`` "prefill" | "decode"; ms after
    ``monotonic_s``) to whoever listens on it: its phases to ``observe_phases``, the raw timeline to
    ``observe_timeline``."""
    if not timeline_ms:
        return
    if req.observe_phases is not None:
        req.observe_phases((prefill_phases if role == "prefill" else decode_phases)(timeline_ms))
    if req.observe_timeline is not None:
        req.observe_timeline(role, monotonic_s, dict(timeline_ms))


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
        self.worker_dead = Gauge("colm_worker_dead", "1 if the worker is gone for good (Ray's restarts exhausted)",
                                 ["worker", "role"], registry=r)
        self.serving = Gauge("colm_serving", "1 if a request can be served now (a healthy prefill and decode worker)",
                             registry=r)
        self.transfer_bytes = Gauge("colm_kv_transfer_bytes", "KV bytes handed from prefill to decode (worker total)",
                                    ["worker"], registry=r)
        self.transfer_seconds = Gauge("colm_kv_transfer_seconds", "Time spent on KV hand-off (worker total)",
                                      ["worker"], registry=r)
        self.phases = Histogram("colm_request_phase_seconds", "Where a request's time to first token goes, from the "
                                "workers' timelines: prefill_queue, prefill_compute, kv_delivery, kv_wait, admission, "
                                "first_step", ["phase"], buckets=PHASE_BUCKETS_S, registry=r)

    def observe_phases(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.phases.labels(phase).observe(seconds)


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
