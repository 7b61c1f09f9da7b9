"""A request as the router holds it: its validated spec, the events of its response, and the errors it may end with.

``Router.validate`` (``router/validation.py``) builds a ``RequestSpec``; ``Router.generate`` streams ``Event``s for it
and raises the errors below, which the gRPC and HTTP fronts map to status codes (DeadlineExceeded ->
DEADLINE_EXCEEDED, Unavailable -> UNAVAILABLE, UnknownRequest -> NOT_FOUND, RequestError -> INTERNAL).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from colm.router.policy import Budget, Decision
from colm.sampling import SamplingParams


class DeadlineExceeded(Exception):
    pass


class Unavailable(Exception):
    pass


class UnknownRequest(LookupError):
    """No running request has the id (NOT_FOUND)."""


class RequestError(Exception):
    """The request failed on the workers, twice, while they serve on (INTERNAL): a bug, not an outage."""


@dataclass
class RequestSpec:
    """A validated request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    budget: Budget = field(default_factory=Budget)
    scale: int | None = None  # pinned
    prompt_logprobs: bool = False
    speculative: int = 0  # chain-1 self-speculative decoding: drafts per round (0 = off)
    cache_salt: str = ""  # the prefix cache's namespace: K/V are shared only among requests of one salt
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # absolute monotonic
    # the router's own id for the request, unique whatever ids clients send: workers, the registry and the
    # failover map key on it, so a client reusing a running request's id can never touch that request
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Event:
    """One step of a response: the decision first, then tokens, then the finish."""

    kind: str  # "decision" | "token" | "finish"
    decision: Decision | None = None
    token_id: int = 0
    text: str = ""
    scale: int = 0
    time_ms: float = 0.0
    logprob: float = 0.0
    drafted: bool = False  # an accepted chain-1 draft (speculative requests)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, log-prob) of the most likely tokens, if asked for
    finish_reason: str = ""
    prompt_logprobs: list[tuple[float, int, float]] | None = None  # (logprob, top id, top logprob)
    usage: dict | None = None
