"""What the router needs from the workers, as one small interface, and the errors it may raise.

``Backend`` hides how workers are reached (in-process engines, gRPC to worker processes, Ray
actors that run those gRPC services). The router only ever:

* lists workers and polls each for a ``WorkerReport`` (a failed poll marks it unhealthy),
* streams one request's tokens through a chosen prefill and decode worker,
* changes a running request's scale, aborts it, or scores a prompt (echo/logprobs).

A stream that breaks because a worker died raises ``WorkerFailed`` naming it; the router then
retries elsewhere with the tokens produced so far appended to the prompt. A backend that knows which worker an
attempt waits on may say so with ``silence(attempt_id, decode_id, idle_s) -> WorkerFailed``: the router asks it when
no token came for ``router.token_timeout_s`` (else it blames the decode worker).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from colm.router.policy import WorkerReport
from colm.sampling import SamplingParams


class WorkerFailed(Exception):
    """A worker died or stopped answering; ``worker_id`` names it."""

    def __init__(self, worker_id: str, message: str = "") -> None:
        super().__init__(f"worker {worker_id} failed: {message}" if message else f"worker {worker_id} failed")
        self.worker_id = worker_id


def cancelled_itself() -> bool:
    """Whether the running task was asked to cancel (its caller, a timeout, the router stopping). A backend's call
    may raise CancelledError without that: grpc.aio does in a task awaiting a call whose channel was closed under it.
    Code that must outlive a failed call (the health poll loop) re-raises only its own cancellation."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def silent_worker(prefills: dict, attempt_id: str, decode_id: str, idle_s: float) -> WorkerFailed:
    """The failure of attempt ``attempt_id`` after ``idle_s`` without a token: its prefill worker's while its prefill,
    in ``prefills`` (attempt id -> (prefill worker, the prefill's future)), has not finished (the decode worker waits
    for the K/V: the prefill worker is the silent one), else its decode worker's. A backend's ``silence``."""
    prefill = prefills.get(attempt_id)
    if prefill is not None and not prefill[1].done():
        return WorkerFailed(prefill[0], f"no token for {idle_s} s: its prefill has not finished")
    return WorkerFailed(decode_id, f"no token for {idle_s} s")


class RequestFailed(Exception):
    """One request failed on a worker that serves on (its step, its transfer): retried, the worker kept."""

    def __init__(self, worker_id: str, message: str = "") -> None:
        super().__init__(f"failed on worker {worker_id}: {message}" if message else f"failed on worker {worker_id}")
        self.worker_id = worker_id


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # "prefill" | "decode"
    address: str = ""
    dead: str = ""  # why the worker is gone for good (its restarts are exhausted); "" while it lives or restarts
    metrics_url: str = ""  # its Prometheus endpoint, which the router's metrics port re-serves


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    scale: int
    timeout_s: float  # time left before the request's deadline
    eos_id: int | None = None
    # the backend reports the request's phases here (seconds by name; colm.router.metrics.decode_phases /
    # prefill_phases) once the workers' timelines arrive; None = nobody listens
    observe_phases: Callable[[dict[str, float]], None] | None = field(default=None, compare=False)
    # the backend hands each worker's raw milestones here: (role "prefill" | "decode", the reference milestone's
    # time.monotonic() on that worker's host, milestone -> ms after it); for tracing and benchmarks, None = unused
    observe_timeline: Callable[[str, float, dict[str, float]], None] | None = field(default=None, compare=False)
    # a backend whose ``watches_tokens`` is true ends the stream itself: WorkerFailed when ``failover`` is set to
    # a worker id (a health poll took it out), WorkerFailed after ``token_timeout_s`` without a token,
    # DeadlineExceeded at ``timeout_s``; the router then reads its tokens without a watchdog per token
    failover: Any = field(default=None, compare=False)  # asyncio.Future[str] | None
    token_timeout_s: float | None = None
    speculative: int = 0  # chain-1 self-speculative decoding: drafts per round (0 = off)
    cache_salt: str = ""  # the namespace of a colocated worker's prefix cache (requests of other salts share no K/V)
    # a retried attempt: how many of ``prompt_ids``' last tokens are the request's earlier output (the penalties
    # count them as output, ``colm.logits_adjust``)
    prior_output: int = 0


@dataclass(frozen=True)
class EngineToken:
    token_id: int
    scale: int
    logprob: float = 0.0
    drafted: bool = False  # an accepted chain-1 draft
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, log-prob) of the most likely tokens, if asked for


class Backend(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def workers(self) -> list[WorkerInfo]: ...

    async def poll(self, worker_id: str) -> WorkerReport: ...

    def generate(self, req: EngineRequest, prefill_id: str, decode_id: str) -> AsyncIterator[EngineToken]: ...

    async def set_scale(self, decode_id: str, request_id: str, scale: int) -> None: ...

    async def abort(self, decode_id: str, request_id: str) -> None: ...

    async def reset_prefix_cache(self, decode_id: str) -> int:
        """Forget the decode worker's cached prefixes; the idle blocks freed (0 where it caches none)."""

    async def prompt_logprobs(self, decode_id: str, prompt_ids: list[int], scale: int) -> list[tuple[float, int, float]]:
        """Per prompt token: (its log-probability, the most likely token, that one's log-probability)."""
