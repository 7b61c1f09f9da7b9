"""Placement: which prefill and which decode worker serve a request, and who is healthy.

The registry keeps each worker's latest report plus what the router itself has sent it since (so
two requests arriving between reports do not both land on the same "least loaded" worker).
Prefill: least queued tokens. Decode: enough free KV blocks (counted in each worker's own block size; a request
larger than every worker's whole pool is ``NeverFits``, the request's fault), then most free blocks per running
sequence; among colocated workers within ``affinity_balance`` sequences of the least loaded, the one the
router sent most of the prompt's leading blocks (``prefix_affinity``: its prefix cache likely holds them).
A worker that fails a call or a health check is taken out until it reports again. A worker whose engine loop makes
no progress while it holds requests (its report's ``stall_s``: a step that never returns, as a hung device sync looks,
while its Stats still answer) is out while the stall lasts beyond ``stall_s``; one taken out for a failure comes back
only with a report that shows progress since (or no work), so a stuck worker does not flap in and out at each report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from colm.router.policy import WorkerReport
from colm.router.prefix_affinity import PrefixAffinity


class NoWorker(Exception):
    """No healthy worker of a role can take the request (UNAVAILABLE, or RESOURCE_EXHAUSTED if all are full)."""

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


class NeverFits(ValueError):
    """The request needs more KV blocks than any decode worker's whole pool holds: no wait or retry can serve it
    (INVALID_ARGUMENT / HTTP 400, not the RESOURCE_EXHAUSTED of a pool that is full for now)."""


@dataclass
class WorkerState:
    worker_id: str
    role: str
    address: str = ""
    healthy: bool = True
    report: WorkerReport | None = None
    reported_at: float = 0.0
    pending_tokens: int = 0  # prefill: tokens sent since the last report
    pending_blocks: int = 0  # decode: blocks of requests placed since the last report
    pending_seqs: int = 0
    inflight: set = field(default_factory=set)  # request ids placed here and not finished
    failures: int = 0
    dead: str = ""  # why the worker is gone for good; a dead worker is never healthy
    stalled: str = ""  # why the worker is out while its engine makes no progress (its reports' stall_s)
    out_since: float = 0.0  # when it was last taken out (monotonic)


class WorkerRegistry:
    def __init__(self, block_size: int = 16, stale_after_s: float = 10.0, affinity_balance: int | None = None,
                 stall_s: float = 30.0) -> None:
        self.block_size = block_size
        self.stale_after_s = stale_after_s
        self.stall_s = stall_s  # a worker whose engine made no progress this long while holding requests is out
        self.workers: dict[str, WorkerState] = {}
        # prefix affinity (None: off): the prompt blocks placed per colocated worker, and how many sequences more
        # than the least loaded worker's a worker may run and still be chosen for its cached prefix
        self.affinity = PrefixAffinity() if affinity_balance is not None else None
        self.affinity_balance = affinity_balance or 0

    def add(self, worker_id: str, role: str, address: str = "", dead: str = "") -> WorkerState:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role={role!r}: must be 'prefill' or 'decode'")
        w = self.workers.get(worker_id) or WorkerState(worker_id, role, address)
        w.address = address or w.address
        if dead:
            w.dead, w.healthy = dead, False
        self.workers[worker_id] = w
        return w

    def remove(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def update(self, report: WorkerReport, now: float | None = None) -> None:
        """A worker's new report: it is back in service (or stays in) unless it is dead or stalled
        (``stall_reason``)."""
        w = self.workers.get(report.worker_id) or self.add(report.worker_id, report.role)
        now = time.monotonic() if now is None else now
        w.report, w.reported_at = report, now
        w.pending_tokens = w.pending_blocks = w.pending_seqs = 0
        w.stalled = self.stall_reason(w, report, now)
        if w.stalled and w.healthy:
            w.out_since = now
        w.healthy = not w.dead and not w.stalled
        if w.healthy:
            w.failures = 0

    def stall_reason(self, w: WorkerState, report: WorkerReport, now: float) -> str:
        """Why ``report`` keeps ``w`` out of service, or "": its engine made no progress for ``stall_s`` while holding
        requests, or (``w`` out already, after a failed call or poll) none since it was taken out."""
        if not report.stall_s:
            return ""
        n = report.stall_requests
        why = f"engine made no progress for {report.stall_s:.1f} s with {n} request{'s' if n != 1 else ''}"
        if report.stall_s >= self.stall_s:
            return f"{why} (router.worker_stall_s={self.stall_s:g})"
        if not w.healthy and report.stall_s >= now - w.out_since:
            return f"{why}, none since it was taken out"
        return ""

    def mark_unhealthy(self, worker_id: str) -> list[str]:
        """Take a worker out; returns the request ids that were in flight there."""
        w = self.workers.get(worker_id)
        if w is None:
            return []
        w.healthy = False
        w.out_since = time.monotonic()
        w.failures += 1
        if self.affinity is not None:  # it may come back restarted, its cache empty
            self.affinity.forget(worker_id)
        return sorted(w.inflight)

    def state(self, w: WorkerState, now: float | None = None) -> str:
        """'healthy' | 'unhealthy' (failed a call or poll, silent too long, or stalled; may come back) | 'dead'."""
        if w.dead:
            return "dead"
        now = time.monotonic() if now is None else now
        stale = w.report is not None and now - w.reported_at > self.stale_after_s
        return "healthy" if w.healthy and not stale else "unhealthy"

    def detail(self, w: WorkerState) -> str:
        """Why ``w`` is out, where the registry knows: dead (its pool's reason) or stalled; else ""."""
        return w.dead or w.stalled

    def healthy(self, role: str, now: float | None = None) -> list[WorkerState]:
        now = time.monotonic() if now is None else now
        out = []
        for w in self.workers.values():
            if w.role != role or not w.healthy:
                continue
            if w.report is not None and now - w.reported_at > self.stale_after_s:
                continue  # silent for too long: treat as failed until it reports again
            out.append(w)
        return out

    # ---- choices -------------------------------------------------------------------------------
    def prefills_itself(self, w: WorkerState) -> bool:
        """A decode worker that computes its prompts' K/V itself (colocated; its last report says so)."""
        return w.role == "decode" and w.report is not None and w.report.prefills

    def can_prefill(self, now: float | None = None) -> list[WorkerState]:
        """Healthy workers that can prefill a prompt: prefill workers, and colocated decode workers."""
        return self.healthy("prefill", now) + [w for w in self.healthy("decode", now) if self.prefills_itself(w)]

    def pick_prefill(self, prompt_tokens: int, exclude: set[str] = frozenset()) -> WorkerState:
        cands = [w for w in self.healthy("prefill") if w.worker_id not in exclude]
        if not cands:
            raise NoWorker("no healthy prefill worker")

        def queued(w: WorkerState) -> int:
            return (w.report.queued_tokens if w.report else 0) + w.pending_tokens

        w = min(cands, key=lambda w: (queued(w), w.worker_id))
        w.pending_tokens += prompt_tokens
        return w

    def affinity_block_size(self, exclude: set[str] = frozenset()) -> int:
        """The block size to hash prompts with for prefix affinity: that of the colocated decode workers, when
        affinity is on and more than one of them could take a request; else 0 (nothing to choose)."""
        if self.affinity is None:
            return 0
        colocated = [w for w in self.healthy("decode") if self.prefills_itself(w) and w.worker_id not in exclude]
        if len(colocated) < 2:
            return 0
        return colocated[0].report.block_size or self.block_size

    def pick_decode(self, total_tokens: int, exclude: set[str] = frozenset(),
                    digests: list[bytes] | None = None) -> WorkerState:
        """``digests``: the prompt's block digests (``prefix_cache.block_hashes``) for prefix affinity, or None."""
        self._check_fits(total_tokens)
        cands = [w for w in self.healthy("decode") if w.worker_id not in exclude]
        if not cands:
            raise NoWorker("no healthy decode worker")

        need = {w.worker_id: self.blocks_at(w, total_tokens) for w in cands}  # in each worker's own blocks

        def free(w: WorkerState) -> float:
            # No report yet: assume room, ranked after reported workers with room.
            return (w.report.free_blocks if w.report else float(need[w.worker_id])) - w.pending_blocks

        def batch(w: WorkerState) -> int:
            return (w.report.num_running + w.report.num_waiting if w.report else 0) + w.pending_seqs

        fit = [w for w in cands if free(w) >= need[w.worker_id]]
        if not fit:
            raise NoWorker(f"no decode worker has free KV blocks for {total_tokens} tokens", full=True)
        w = max(fit, key=lambda w: (free(w) / (1 + batch(w)), -batch(w), w.worker_id))
        if digests and self.affinity is not None:
            least = min(batch(c) for c in fit)
            near = [c for c in fit if self.prefills_itself(c) and batch(c) <= least + self.affinity_balance]
            hits = {c.worker_id: self.affinity.matched(c.worker_id, digests) for c in near}
            if hits and max(hits.values()) > 0:
                w = max(near, key=lambda c: (hits[c.worker_id], free(c) / (1 + batch(c)), -batch(c), c.worker_id))
            if self.prefills_itself(w):
                self.affinity.record(w.worker_id, digests)
        w.pending_blocks += need[w.worker_id]
        w.pending_seqs += 1
        return w

    def worker_block_size(self, w: WorkerState) -> int:
        """Tokens per KV block of a decode worker's pool: its report's, else this registry's (the configured one)."""
        return (w.report.block_size if w.report else 0) or self.block_size

    def blocks_at(self, w: WorkerState, num_tokens: int) -> int:
        """Blocks of ``w``'s pool that ``num_tokens`` tokens take."""
        return -(-num_tokens // self.worker_block_size(w))

    def _check_fits(self, total_tokens: int) -> None:
        """NeverFits when every decode worker has reported its pool and none could hold the request even empty (the
        K/V of the prompt and of all but the last new token, in that worker's own blocks)."""
        reported = [w for w in self.workers.values() if w.role == "decode" and w.report]
        if not reported or not all(w.report.total_blocks for w in reported):
            return
        if all(self.blocks_at(w, total_tokens - 1) > w.report.total_blocks for w in reported):
            most = max(w.report.total_blocks * self.worker_block_size(w) for w in reported)
            raise NeverFits(f"the prompt and max_tokens take {total_tokens} tokens of KV cache; the largest decode "
                            f"worker's pool holds {most} tokens: shorten the prompt or lower max_tokens")

    def unpick_decode(self, w: WorkerState, total_tokens: int) -> None:
        """Undo ``pick_decode``'s count for a request that will not go to ``w`` after all (no prefill worker for it):
        left counted, the blocks of every retried pick would pile up until the worker's next report and turn an
        outage into a false "no free KV blocks"."""
        w.pending_blocks = max(0, w.pending_blocks - self.blocks_at(w, total_tokens))
        w.pending_seqs = max(0, w.pending_seqs - 1)

    def start(self, worker_id: str, request_id: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].inflight.add(request_id)

    def finish(self, worker_id: str, request_id: str) -> None:
        if worker_id in self.workers:
            self.workers[worker_id].inflight.discard(request_id)
