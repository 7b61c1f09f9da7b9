"""The workers' Prometheus metrics, re-served on the router's metrics port.

Workers listen on ephemeral ports on their own nodes, which no Prometheus config knows in advance; the
router knows every worker. At each scrape this collector fetches every worker's ``/metrics`` (in parallel,
with a short timeout: a dead worker costs the scrape at most that) and yields the families merged by name,
samples keeping each worker's own ``worker`` label. A worker that does not answer is counted in
``colm_worker_scrape_errors`` instead.
"""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families


def fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode("utf-8", errors="replace")


class WorkerMetricsCollector:
    """``targets()`` gives (worker id, metrics URL) pairs, read anew at each scrape."""

    def __init__(self, targets: Callable[[], Iterable[tuple[str, str]]], timeout_s: float = 1.0) -> None:
        self.targets = targets
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="colm-scrape")

    def collect(self):
        pairs = [(wid, url) for wid, url in self.targets() if url]
        futures = {wid: self._pool.submit(fetch, url, self.timeout_s) for wid, url in pairs}
        merged: dict[str, Metric] = {}
        errors = GaugeMetricFamily("colm_worker_scrape_errors", "1 if the worker's metrics did not answer the last "
                                   "scrape", labels=["worker"])
        for wid, fut in futures.items():
            try:
                text = fut.result(timeout=self.timeout_s + 1.0)
            except Exception:  # noqa: BLE001 - a dead or slow worker: reported, never fails the scrape
                errors.add_metric([wid], 1.0)
                continue
            errors.add_metric([wid], 0.0)
            for fam in text_string_to_metric_families(text):
                into = merged.get(fam.name)
                if into is None:
                    into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                into.samples.extend(fam.samples)
        yield from merged.values()
        yield errors
