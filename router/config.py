"""RouterConfig: ports, limits, security and policy knobs of the router (one frozen dataclass)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

from colm.config_types import check_types
from colm.decode_worker.config import MAX_GAMMA

TOKEN_STREAMS = ("batched", "per_request")  # router.token_stream: how decode workers send tokens
WORKER_CALLS = ("stream", "unary")  # router.worker_calls: how the router's short calls reach a worker


def auto_replicas(cores: int | None = None) -> int:
    """``router.replicas: auto``: one router process per 4 cores this process may use, at most 4; one below 8 cores
    (a router at full load uses about a core, and the workers and clients need the rest)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores < 8 else min(4, cores // 4)


def _check_seconds(name: str, value, positive: bool, what: str) -> None:
    """ValueError naming ``router.<name>`` unless ``value`` is a finite number of seconds, > 0 (``positive``) or >= 0;
    ``what`` says what it sets."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value <= 0 if positive else value < 0):
        raise ValueError(f"router.{name}={value!r}: must be a finite number of seconds {'> 0' if positive else '>= 0'} "
                         f"({what})")


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"  # nothing listens on 0.0.0.0 unless configured
    grpc_port: int = 50051  # 0 = pick a free port
    http_port: int | None = 8000  # OpenAI-compatible HTTP; None = off
    metrics_port: int | None = None  # Prometheus; None = off
    metrics_host: str = "127.0.0.1"  # the metrics port needs no API key: loopback unless set (not ``host``)
    api_key: str | None = None  # public endpoints require it when set
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_running: int = 64
    max_queued: int = 256
    default_deadline_s: float = 120.0
    max_message_bytes: int = 4 << 20
    # HTTP connections (router/http_guard.py): a request head must be complete this long after the connection opens
    # or its last response ends, and its body this long after the head (408); at most this many open connections
    # (0: the open-file limit less 1024), and from one client address; past them a connection gets 503 and is closed
    http_head_timeout_s: float = 30.0
    http_max_connections: int = 0
    http_max_connections_per_client: int = 4096
    default_max_new_tokens: int = 16  # gRPC sampling.max_new_tokens = 0 (unset) means this many
    max_retries: int = 2
    token_timeout_s: float = 30.0  # no token for this long: the worker is treated as failed
    worker_wait_s: float = 30.0  # no healthy worker of a role, one restarting: wait this long (within the deadline)
    # every decode worker's KV pool full for now: wait this long for blocks (first come first served, within the
    # deadline; router/kv_wait.py) before RESOURCE_EXHAUSTED; 0 refuses at once
    kv_wait_s: float = 30.0
    # shutdown (SIGTERM, Ctrl-C): health says not serving and both fronts refuse new requests at once; the requests
    # in flight on gRPC and HTTP get this long, together, to finish, and those left are then cancelled with an error
    # saying so (router/drain.py); 0 cancels them at once
    drain_s: float = 30.0
    poll_interval_s: float = 0.2
    poll_timeout_s: float = 2.0  # a worker whose Stats takes longer is taken out until it answers again
    rebalance: bool = True
    ewma_alpha: float = 0.3
    headroom: float = 1.0
    served_model_name: str = "colm"
    fixed_scale: int | None = None  # serve every request at this scale (the colocated baseline: no scale choice)
    # how decode workers send tokens: "batched" (one stream per worker, a message per decode step for all its
    # requests) or "per_request" (a stream per request, a message per token)
    token_stream: str = "batched"
    # how the router's short calls to a worker (Reserve, Prefill, Start, SetScale, Abort) travel: "stream" (messages
    # of one long-lived Calls stream per worker: no per-call set-up, about half a unary call's latency) or "unary"
    # (a gRPC call each); a worker without the stream gets unary calls either way
    worker_calls: str = "stream"
    # router processes (``colm serve`` on Ray): each a router of its own over the same workers, all listening on the
    # same gRPC and HTTP ports (SO_REUSEPORT: the kernel spreads client connections over them); replica i > 0 serves
    # its metrics on metrics_port + i. One Python process parses and sends every token of its requests: past about
    # a core of that work, more replicas serve more requests. "auto": one per 4 cores of this machine, 1 to 4 (one
    # router below 8 cores), resolved when the config is made (on the node that starts the routers).
    replicas: int | str = 1
    # a replica (router i > 0) that dies is started again, on the same ports, after replica_restart_backoff_s doubled
    # with each of its earlier restarts (at most 60 s), at most replica_max_restarts times (deploy/replicas.py)
    replica_max_restarts: int = 3
    replica_restart_backoff_s: float = 1.0
    # chain-1 self-speculative decoding chosen by the router (CoLM-Air): "off", or "auto": a request that does not
    # ask for drafts (speculative 0) gets the drafts per round, among speculative_gammas, whose predicted time per
    # token beats plain steps by 10 %, while decode workers run at most speculative_max_batch sequences
    # (router/policy.py: ScalePolicy.speculation)
    speculative: str = "off"
    speculative_gammas: tuple[int, ...] = (2, 4)
    speculative_max_batch: int = 8
    # prefix affinity (several colocated decode workers): a request goes to the worker the router sent most of its
    # prompt's leading blocks (that worker's prefix cache likely holds their K/V), among the workers with room that
    # run at most prefix_affinity_balance sequences more than the least loaded one (router/prefix_affinity.py)
    prefix_affinity: bool = True
    prefix_affinity_balance: int = 16
    # a worker whose engine loop has made no progress for this long while holding requests (a step that never
    # returns, as a hung device sync looks, while its Stats still answer) is taken out of service until it makes
    # progress again (router/placement.py); well above any step, chunk or graph capture (captures count as progress)
    worker_stall_s: float = 30.0

    def __post_init__(self) -> None:
        if self.replicas == "auto":
            object.__setattr__(self, "replicas", auto_replicas())
        elif isinstance(self.replicas, str) or isinstance(self.replicas, bool):
            raise ValueError(f"router.replicas={self.replicas!r}: must be an integer >= 1 or 'auto'")
        for name in ("grpc_port", "http_port", "metrics_port"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= 65535):
                raise ValueError(f"router.{name}={v!r}: must be a port number 0..65535 (0 = any free port)")
        ports = [(name, getattr(self, name)) for name in ("grpc_port", "http_port", "metrics_port")]
        taken = {}
        for name, port in ports:  # 0 picks a free port each: never a clash
            apart = (name == "metrics_port" and self.metrics_host != self.host  # two addresses, neither a wildcard
                     and not {self.host, self.metrics_host} & {"", "0.0.0.0", "::", "[::]"})
            if port and port in taken and not apart:
                raise ValueError(f"router.{name}={port}: router.{taken[port]} has that port too; give each its own")
            if port:
                taken.setdefault(port, name)
        for name in ("max_running", "max_message_bytes", "default_max_new_tokens", "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"router.{name}={getattr(self, name)}: must be >= 1")
        for name in ("http_max_connections_per_client",):
            if getattr(self, name) < 1:
                raise ValueError(f"router.{name}={getattr(self, name)}: must be >= 1")
        if self.http_max_connections < 0:
            raise ValueError(f"router.http_max_connections={self.http_max_connections}: must be >= 1, or 0 (the "
                             "open-file limit less 1024)")
        for name in ("max_queued", "max_retries", "kv_wait_s", "replica_max_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"router.{name}={getattr(self, name)}: must be >= 0")
        for name in ("default_deadline_s", "token_timeout_s", "poll_interval_s", "poll_timeout_s",
                     "worker_wait_s", "http_head_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"router.{name}={getattr(self, name)}: must be > 0")
        _check_seconds("drain_s", self.drain_s, False,
                       "how long the requests in flight get to finish at shutdown; 0 cancels them at once")
        _check_seconds("replica_restart_backoff_s", self.replica_restart_backoff_s, True,
                       "the wait before a dead router replica's first restart; it doubles with each restart")
        if (self.tls_cert is None) != (self.tls_key is None):
            given, missing = ("tls_cert", "tls_key") if self.tls_key is None else ("tls_key", "tls_cert")
            raise ValueError(f"router.tls_cert and router.tls_key: give both or neither (router.{given} is set, "
                             f"router.{missing} is not)")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                raise ValueError(f"router.{name}={path!r}: no such readable file")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            # a secret never turns into "off": an empty key would let every caller in
            raise ValueError(f"router.api_key={self.api_key!r}: an API key must be a non-empty string (leave it unset, "
                             "null, to serve without one)")
        if self.fixed_scale is not None and (not isinstance(self.fixed_scale, int) or self.fixed_scale < 1):
            raise ValueError(f"router.fixed_scale={self.fixed_scale!r}: must be a scale >= 1 or null")
        if self.worker_calls not in WORKER_CALLS:
            raise ValueError(f"router.worker_calls={self.worker_calls!r}: must be one of {', '.join(WORKER_CALLS)}")
        if self.token_stream not in TOKEN_STREAMS:
            raise ValueError(f"router.token_stream={self.token_stream!r}: must be one of {', '.join(TOKEN_STREAMS)}")
        if not self.headroom > 0:
            raise ValueError(f"router.headroom={self.headroom}: must be > 0 (a factor on the predicted latencies)")
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError(f"router.ewma_alpha={self.ewma_alpha}: must be in (0, 1]")
        if self.speculative is False:  # YAML reads an unquoted off as false
            object.__setattr__(self, "speculative", "off")
        if self.speculative not in ("off", "auto"):
            raise ValueError(f"router.speculative={self.speculative!r}: must be 'off' or 'auto'")
        if isinstance(self.prefix_affinity_balance, bool) or not isinstance(self.prefix_affinity_balance, int) \
                or self.prefix_affinity_balance < 0:
            raise ValueError(f"router.prefix_affinity_balance={self.prefix_affinity_balance!r}: must be an integer >= 0 "
                             "(sequences more than the least loaded worker's)")
        gammas = self.speculative_gammas
        if (not isinstance(gammas, (list, tuple)) or not gammas
                or any(isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= MAX_GAMMA for g in gammas)):
            raise ValueError(f"router.speculative_gammas={gammas!r}: must be a non-empty list of drafts per round, "
                             f"each 1..{MAX_GAMMA}")
        object.__setattr__(self, "speculative_gammas", tuple(gammas))
        if isinstance(self.speculative_max_batch, bool) or not isinstance(self.speculative_max_batch, int) \
                or self.speculative_max_batch < 1:
            raise ValueError(f"router.speculative_max_batch={self.speculative_max_batch!r}: must be an integer >= 1")
        _check_seconds("worker_stall_s", self.worker_stall_s, True,
                       "how long a worker's engine may hold requests without progress before it is taken out")

    @classmethod
    def from_dict(cls, d: dict) -> "RouterConfig":
        if not isinstance(d, dict):
            raise ValueError(f"router: must be a mapping of fields, got {type(d).__name__} {d!r:.80}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"router: unknown fields {unknown}; allowed: {sorted(known)}")
        if d.get("speculative") is False:  # YAML reads an unquoted off as false
            d = {**d, "speculative": "off"}
        check_types(cls, d, "router")
        return cls(**d)
