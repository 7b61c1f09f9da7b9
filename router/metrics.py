"""Prometheus metrics of the router (and a helper workers use to serve theirs).

Each ``RouterMetrics`` owns its own registry, so several routers in one process (tests) do not
collide. ``serve_metrics(registry, host, port)`` exposes one on a metrics port; ``metrics_endpoint(registry)``
serves the same registry as ``GET /metrics`` on the OpenAI HTTP port (as vLLM and SGLang do). Both also carry
every worker's metrics (``colm.router.worker_metrics``).

Where a metric means what a vLLM metric means, it has vLLM's name with ``colm:`` for ``vllm:``, and its
``model_name`` label (``router.served_model_name``), so a vLLM dashboard or alert works after replacing the
prefix. Request-level metrics add ``scale`` (the chains a request ran at); ``worker`` names a worker.

| colm | vLLM | type | labels beyond model_name |
|---|---|---|---|
| ``colm:num_requests_running`` | ``vllm:num_requests_running`` | gauge | (requests the router admitted) |
| ``colm:num_requests_waiting`` | ``vllm:num_requests_waiting`` | gauge | (requests queued for admission) |
| ``colm:kv_cache_usage_perc`` | ``vllm:kv_cache_usage_perc`` (0..1) | gauge | worker (a decode worker) |
| ``colm:prompt_tokens_total`` | ``vllm:prompt_tokens_total`` | counter | (counted at a request's first token) |
| ``colm:generation_tokens_total`` | ``vllm:generation_tokens_total`` | counter | scale |
| ``colm:request_success_total`` | ``vllm:request_success_total`` | counter | finished_reason (stop, length), scale |
| ``colm:time_to_first_token_seconds`` | ``vllm:time_to_first_token_seconds`` | histogram | scale |
| ``colm:inter_token_latency_seconds`` | ``vllm:inter_token_latency_seconds`` (was ``..._time_per_output_token_...``) | histogram | scale |
| ``colm:request_time_per_output_token_seconds`` | ``vllm:request_time_per_output_token_seconds`` | histogram | scale |
| ``colm:e2e_request_latency_seconds`` | ``vllm:e2e_request_latency_seconds`` | histogram | scale |
| ``colm:prefix_cache_queries_total`` | ``vllm:prefix_cache_queries_total`` (tokens) | counter | worker (colocated) |
| ``colm:prefix_cache_hits_total`` | ``vllm:prefix_cache_hits_total`` (tokens) | counter | worker (colocated) |

colm's own (no vLLM equivalent: disaggregated prefill/decode, scales, worker health):

| name | type | labels | what |
|---|---|---|---|
| ``colm_requests_total`` | counter | model_name, status, scale | requests by outcome (ok, deadline, overloaded, rejected, ...) |
| ``colm_retries_total`` | counter | model_name | attempts retried on another worker |
| ``colm_scale_changes_total`` | counter | model_name | running requests moved to a smaller scale |
| ``colm_degraded_total`` | counter | model_name | requests served below their budget at the smallest scale |
| ``colm_request_phase_seconds`` | histogram | model_name, phase | where TTFT goes (phases: see ``decode_phases``, ``prefill_phases``) |
| ``colm_kv_blocks_used`` | gauge | worker | KV blocks in use on a decode worker |
| ``colm_kv_blocks_capacity`` | gauge | worker | KV blocks of a decode worker |
| ``colm_prefill_queued_tokens`` | gauge | worker | prompt tokens queued on a prefill worker (or a colocated decode worker) |
| ``colm_kv_transfer_bytes_total`` | counter | worker (a prefill worker) | KV bytes handed from prefill to decode |
| ``colm_kv_transfer_seconds_total`` | counter | worker | time spent on those hand-offs |
| ``colm_worker_healthy`` | gauge | worker, role | 1 while the worker answers its health polls |
| ``colm_worker_dead`` | gauge | worker, role | 1 once it is gone for good (Ray's restarts exhausted) |
| ``colm_serving`` | gauge | | 1 while a request can be served |
| ``colm_router_replicas_live`` | gauge | | the launcher's router only (``deploy/replicas.py``): routers serving the ports |
| ``colm_worker_scrape_errors`` | gauge | worker | 1 if its metrics did not answer the router's last scrape |
| ``colm_requests_waiting_for_kv`` | gauge | | admitted requests waiting in line for KV blocks (``router.kv_wait_s``) |
| ``colm_http_connections`` | gauge | | open connections of the HTTP front |
| ``colm_http_connections_refused_total`` | counter | cap | connections answered 503 at a cap (``router.http_max_connections*``) |
| ``colm_http_requests_timed_out_total`` | counter | | connections closed: a request head or body late (``router.http_head_timeout_s``) |
| ``colm_prefill_<field>``, ``colm_decode_<field>`` | gauge, counter | worker | engine ``stats()`` |
| ``colm_router_gc_pause_seconds``, ``colm_{prefill,decode}_gc_pause_seconds`` | histogram | generation (workers: worker) | the process's garbage-collector pauses (``colm.gc_pauses``) |

On the HTTP port, with ``router.api_key`` set, ``/metrics`` needs the key like every path but ``/health``
(Prometheus: ``authorization: {credentials: KEY}`` in the scrape config); the metrics port needs none and binds
``router.metrics_host`` (loopback by default). deploy/grafana/colm-dashboard.json charts these series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PHASE_BUCKETS_S = (0.0005, 0.001, 0.0025) + LATENCY_BUCKETS_S  # a decode step is ~1 ms


def _span(t: dict, start: str, end: str) -> float | None:
    return max(0.0, (t[end] - t[start]) / 1000.0) if start in t and end in t else None


def decode_phases(timeline_ms: dict) -> dict[str, float]:
    """Seconds of a request's phases on its decode worker, from the first TokenEvent's milestones (ms):
    kv_wait (generation asked -> KV complete), admission (both -> joined the batch), first_step (-> token); on a
    worker that computes its prompts' K/V itself (colocated), kv_wait splits further into prefill_queue (-> its first
    prompt chunk ran) and prefill_compute (-> its last chunk ran)."""
    t = timeline_ms
    out = {"kv_wait": _span(t, "started", "kv_done"), "first_step": _span(t, "admitted", "first_token"),
           "prefill_queue": _span(t, "started", "prefill_first_chunk"),
           "prefill_compute": _span(t, "prefill_first_chunk", "prefill_last_chunk")}
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


class _ForModel:
    """A labelled metric whose first label, model_name, is fixed: ``labels(*rest)`` gives the child."""

    def __init__(self, metric, model_name: str) -> None:
        self.metric, self.model_name = metric, model_name
        self._children: dict = {}  # the label lookup (a lock and a dict of tuples) runs per token otherwise

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(self.model_name, *values)
        return child

    def remove(self, *values: str) -> None:
        """Drop the child of these labels (none: nothing to drop)."""
        if self._children.pop(values, None) is not None:
            self.metric.remove(self.model_name, *values)


class RouterMetrics:
    def __init__(self, model_name: str = "colm") -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        m = ["model_name"]

        def per_model(metric):
            return _ForModel(metric, model_name)

        # vLLM's names (colm: for vllm:), see the module docstring
        self.running = Gauge("colm:num_requests_running", "Requests admitted by the router and running", m,
                             registry=r).labels(model_name)
        self.queued = Gauge("colm:num_requests_waiting", "Requests waiting for admission", m,
                            registry=r).labels(model_name)
        self.kv_waiting = Gauge("colm_requests_waiting_for_kv", "Admitted requests waiting for KV blocks (every "
                                "decode pool full for now; router.kv_wait_s)", registry=r)
        self.kv_usage = per_model(Gauge("colm:kv_cache_usage_perc", "KV-cache usage of a decode worker; 1 means 100 "
                                        "percent", m + ["worker"], registry=r))
        self.prompt_tokens = Counter("colm:prompt_tokens", "Prompt tokens of requests that reached their first token",
                                     m, registry=r).labels(model_name)
        self.tokens = per_model(Counter("colm:generation_tokens", "Generated tokens by scale", m + ["scale"],
                                        registry=r))
        self.success = per_model(Counter("colm:request_success", "Requests finished by finished_reason (stop, length) "
                                         "and scale", m + ["finished_reason", "scale"], registry=r))
        self.ttft = per_model(Histogram("colm:time_to_first_token_seconds", "Time to first token", m + ["scale"],
                                        buckets=LATENCY_BUCKETS_S, registry=r))
        self.itl = per_model(Histogram("colm:inter_token_latency_seconds", "Time between consecutive output tokens",
                                       m + ["scale"], buckets=PHASE_BUCKETS_S, registry=r))
        self.tpot = per_model(Histogram("colm:request_time_per_output_token_seconds", "A request's mean time per "
                                        "output token after the first", m + ["scale"], buckets=PHASE_BUCKETS_S,
                                        registry=r))
        self.draft_accepted = Counter("colm:spec_decode_num_accepted_tokens", "Generated tokens that were accepted "
                                      "chain-1 drafts (speculative requests)", m, registry=r).labels(model_name)
        self.e2e = per_model(Histogram("colm:e2e_request_latency_seconds", "End-to-end request latency", m + ["scale"],
                                       buckets=LATENCY_BUCKETS_S, registry=r))
        self.prefix_queries = per_model(Counter("colm:prefix_cache_queries", "Prompt tokens looked up in a decode "
                                                "worker's prefix cache", m + ["worker"], registry=r))
        self.prefix_hits = per_model(Counter("colm:prefix_cache_hits", "Prompt tokens found in a decode worker's prefix "
                                             "cache (not prefilled)", m + ["worker"], registry=r))
        # colm's own
        self.requests = per_model(Counter("colm_requests", "Finished requests by status and scale",
                                          m + ["status", "scale"], registry=r))
        self.retries = Counter("colm_retries", "Attempts retried on another worker", m, registry=r).labels(model_name)
        self.scale_changes = Counter("colm_scale_changes", "Running requests moved to a smaller scale", m,
                                     registry=r).labels(model_name)
        self.degraded = Counter("colm_degraded", "Requests served below their budget at the smallest scale", m,
                                registry=r).labels(model_name)
        self.phases = per_model(Histogram("colm_request_phase_seconds", "Where a request's time to first token goes, "
                                          "from the workers' timelines: prefill_queue, prefill_compute, kv_delivery, "
                                          "kv_wait, admission, first_step", m + ["phase"], buckets=PHASE_BUCKETS_S,
                                          registry=r))
        self.kv_used = Gauge("colm_kv_blocks_used", "KV blocks in use per decode worker", ["worker"], registry=r)
        self.kv_total = Gauge("colm_kv_blocks_capacity", "KV blocks per decode worker", ["worker"], registry=r)
        self.prefill_queue = Gauge("colm_prefill_queued_tokens", "Queued prompt tokens per prefill worker", ["worker"],
                                   registry=r)
        self.worker_healthy = Gauge("colm_worker_healthy", "1 if the worker is in service", ["worker", "role"], registry=r)
        self.worker_dead = Gauge("colm_worker_dead", "1 if the worker is gone for good (Ray's restarts exhausted)",
                                 ["worker", "role"], registry=r)
        self.serving = Gauge("colm_serving", "1 if a request can be served now (a healthy prefill and decode worker)",
                             registry=r)
        self.transfer_bytes = Counter("colm_kv_transfer_bytes", "KV bytes handed from prefill to decode", ["worker"],
                                      registry=r)
        self.transfer_seconds = Counter("colm_kv_transfer_seconds", "Time spent on KV hand-offs", ["worker"],
                                        registry=r)
        # the HTTP front's connection limits (router/http_guard.py)
        self.http_connections = Gauge("colm_http_connections", "Open connections of the HTTP front", registry=r)
        self.http_refused = Counter("colm_http_connections_refused", "HTTP connections answered 503 and closed at a "
                                    "cap (cap: http_max_connections, http_max_connections_per_client)", ["cap"],
                                    registry=r)
        self.http_timed_out = Counter("colm_http_requests_timed_out", "HTTP connections closed because a request head "
                                      "or body did not arrive within http_head_timeout_s", registry=r)
        from colm.gc_pauses import GcPausesCollector

        r.register(GcPausesCollector("router"))  # colm_router_gc_pause_seconds{generation}
        self._seen: dict[tuple[str, str], float] = {}  # (worker, total) -> the worker's total its last report gave

    def observe_phases(self, phases: dict[str, float]) -> None:
        for phase, seconds in phases.items():
            self.phases.labels(phase).observe(seconds)

    def observe_token_times(self, scale: str, times_ms: list[float]) -> None:
        """Each gap between a request's consecutive tokens (ms since its arrival) as an inter-token latency."""
        child = self.itl.labels(scale)
        for a, b in zip(times_ms, times_ms[1:]):
            child.observe(max(0.0, b - a) / 1e3)

    def observe_report(self, r) -> None:
        """One worker's ``WorkerReport``: its gauges, and the growth of its KV hand-off totals into the counters."""
        wid = r.worker_id
        if r.role == "decode":
            self.kv_used.labels(wid).set(r.total_blocks - r.free_blocks)
            self.kv_total.labels(wid).set(r.total_blocks)
            self.kv_usage.labels(wid).set((r.total_blocks - r.free_blocks) / r.total_blocks if r.total_blocks else 0.0)
        if r.role == "prefill" or r.prefills:  # a colocated decode worker queues its own prompts
            self.prefill_queue.labels(wid).set(r.queued_tokens)
        self._grow(self.transfer_bytes.labels(wid), wid, "transfer_bytes", r.transfer_bytes)
        self._grow(self.transfer_seconds.labels(wid), wid, "transfer_s", r.transfer_s)
        if r.role == "decode" and r.prefills:
            self._grow(self.prefix_queries.labels(wid), wid, "prefix_query_tokens", r.prefix_query_tokens)
            self._grow(self.prefix_hits.labels(wid), wid, "prefix_hit_tokens", r.prefix_hit_tokens)

    def forget_load(self, wid: str) -> None:
        """A worker out for good: its KV and queue gauges go (a dead worker holds no blocks and queues nothing); its
        counters stay, as counters do."""
        self.kv_usage.remove(wid)
        for gauge in (self.kv_used, self.kv_total, self.prefill_queue):
            try:
                gauge.remove(wid)
            except KeyError:  # it never reported that gauge
                pass

    def _grow(self, counter, wid: str, name: str, total) -> None:
        """Add the growth of a worker's running ``total`` since its last report to ``counter``."""
        total = float(total)
        seen = self._seen.get((wid, name), 0.0)
        # a total that went down was restarted from zero (a new backend or worker): all of the new total is growth
        counter.inc(total - seen if total >= seen else total)
        self._seen[(wid, name)] = total


# Fields of the engines' stats() that only ever grow: served as counters (``..._total``), the rest as gauges.
CUMULATIVE_STATS = frozenset({"num_done", "num_failed", "num_finished", "num_steps", "num_steps_launched_ahead",
                              "num_steps_dropped", "num_drafted", "num_draft_accepted", "num_prefill_chunks",
                              "num_prefix_query_tokens", "num_prefix_hit_tokens"})


class EngineStatsCollector:
    """Exposes a worker engine's ``stats()`` (a dataclass of numbers) as ``colm_<role>_<field>``: counters for the
    running counts of ``CUMULATIVE_STATS``, gauges for the rest."""

    def __init__(self, engine, role: str, worker_id: str) -> None:
        self.engine, self.role, self.worker_id = engine, role, worker_id

    def collect(self):
        import dataclasses

        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        for f in dataclasses.fields(stats):
            value = getattr(stats, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            kind = CounterMetricFamily if f.name in CUMULATIVE_STATS else GaugeMetricFamily
            g = kind(f"colm_{self.role}_{f.name}", f"{self.role} engine {f.name}", labels=["worker"])
            g.add_metric([self.worker_id], float(value))
            yield g


def worker_registry(engine, role: str, worker_id: str) -> CollectorRegistry:
    from colm.gc_pauses import GcPausesCollector

    r = CollectorRegistry()
    r.register(EngineStatsCollector(engine, role, worker_id))
    r.register(GcPausesCollector(role, {"worker": worker_id}))
    return r


METRICS_MAX_CONNECTIONS = 32  # scrapes served at once on a metrics port; more are closed as they open
METRICS_SOCKET_TIMEOUT_S = 10.0  # a connection silent this long is closed (it held a thread forever before)


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Start a metrics HTTP server in a thread; returns (server, thread).

    prometheus_client's server gives every connection a thread with no timeout: idle connections to a metrics port
    each held a thread of the router or worker process for good. This one (the same WSGI app) closes a connection
    silent for ``METRICS_SOCKET_TIMEOUT_S`` and serves at most ``METRICS_MAX_CONNECTIONS`` at once."""
    import socket
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    class Handler(WSGIRequestHandler):
        timeout = METRICS_SOCKET_TIMEOUT_S

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)

        def process_request(self, request, client_address):
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=Handler)
    thread = threading.Thread(target=httpd.serve_forever, name="colm-metrics", daemon=True)
    thread.start()
    return httpd, thread


def metrics_endpoint(registry: CollectorRegistry):
    """An aiohttp handler serving ``registry`` in Prometheus' text format (``GET /metrics`` on the HTTP port).
    Collecting scrapes the workers (blocking, up to their timeout), so it runs off the event loop."""
    import asyncio

    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def handler(request):
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
