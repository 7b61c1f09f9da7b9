"""The one registry of KV transports, and the one place a transport is chosen.

A ``Transport`` declares what it needs of the (prefill, decode) pair and where its sender half is made;
each lives in its own module (``colm.kv.<module>``), which registers it here on import. ``choose`` turns a
requested name (``transport:`` in serve.yaml, sent by the router as ``PrefillRequest.path``) and the pair's
``PairFacts`` into a transport name: the router asks it (``GrpcBackend``: may Reserve and Prefill go out
together?) and the prefill worker asks it (``PrefillService``: which sink?); no other code decides.

| name | needs | sender (prefill) | receiver (decode) |
| --- | --- | --- | --- |
| grpc | nothing | ``GrpcKVSink`` bytes in ``PushKV`` chunks | ``receivers.BytesReceiver`` |
| shm | same host | ``GrpcKVSink(shm=True)``: POSIX shm segment | ``receivers.BytesReceiver`` (``shm_name``) |
| cuda_ipc | same host, CUDA on both | ``IpcKVSink``: device staging tensor | ``receivers.BytesReceiver`` (``ipc_*``) |
| cuda_pool | same host, CUDA on both | ``PoolKVSink``: writes decode's blocks | ``receivers.GrantReceiver`` |
| nixl | nixl on both | ``NixlKVSink``: NIXL WRITEs into decode's blocks | ``receivers.GrantReceiver`` (``transport`` nixl) |
| fake | same process | ``FakeKVSink``: the engine's target interface | the decode engine itself (tests) |

``auto`` takes the first transport in ``AUTO_ORDER`` whose needs the pair meets.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# auto's preference: in place on one GPU, then one host's memory, then NIXL, then gRPC bytes
AUTO_ORDER = ("cuda_pool", "shm", "nixl", "grpc")
# what a decode worker that does not list its transports (an older one) can receive
LEGACY_RECEIVABLE = ("grpc", "shm", "cuda_ipc", "cuda_pool")
MODULES = ("grpc_bytes", "shm", "cuda_ipc", "cuda_pool", "nixl_transport", "fake")


@dataclass(frozen=True)
class PairFacts:
    """What is known of a (prefill, decode) pair when a transport is chosen."""

    same_host: bool = False
    prefill_cuda: bool = False
    decode_cuda: bool = False
    decode_transports: tuple[str, ...] = ()  # ReserveReply.transports; () = unknown (LEGACY_RECEIVABLE)
    same_process: bool = False


@dataclass(frozen=True)
class SinkContext:
    """What a transport's sender half is made from, in the prefill worker."""

    stub: object                 # colm.prefill_worker.kv_push.decode_stub of the decode worker
    request_id: str
    cluster_token: str
    config: object               # PrefillConfig
    device: object               # the prefill engine's torch.device
    timeout_s: float
    decode_address: str = ""
    on_cancel: Callable | None = None  # registers a callback run when the Prefill call is cancelled (grpc context)
    same_host: bool = False      # the decode worker runs on this host (PairFacts.same_host)


@dataclass(frozen=True)
class Transport:
    name: str
    make_sink: Callable[[SinkContext], object] = field(repr=False)
    same_host: bool = False       # both workers on one host (host_id equal)
    cuda: bool = False            # both workers on CUDA
    same_process: bool = False    # the decode engine in the prefill's process
    needs_import: str = ""        # a module both sides must import (checked here on the prefill side; decode says
                                  # it can receive through ReserveReply.transports)
    reserve_with_prefill: bool = False  # the router sends Reserve and Prefill at once (decode's grant waits)

    def importable(self) -> bool:
        if not self.needs_import:
            return True
        try:
            importlib.import_module(self.needs_import)
        except Exception:  # noqa: BLE001 - missing, hidden (sys.modules[name] = None) or a broken install
            return False
        return True

    def unmet(self, facts: PairFacts) -> str | None:
        """Why the pair cannot use this transport (None: it can)."""
        if self.same_process and not facts.same_process:
            return "needs the decode engine in the prefill's process"
        if self.same_host and not facts.same_host:
            return "needs both workers on one host"
        if self.cuda and not (facts.prefill_cuda and facts.decode_cuda):
            return "needs both workers on CUDA"
        if self.name not in (facts.decode_transports or LEGACY_RECEIVABLE):
            return "the decode worker cannot receive it"
        if not self.importable():
            return f"needs {self.needs_import!r} importable on the prefill worker (pip install 'colm[{self.name}]')"
        return None


_REGISTRY: dict[str, Transport] = {}


def register(t: Transport) -> Transport:
    if t.name in ("", "auto"):
        raise ValueError(f"transport name {t.name!r} is reserved")
    _REGISTRY[t.name] = t
    return t


def _load() -> None:
    if len(_REGISTRY) < len(MODULES):
        for m in MODULES:
            importlib.import_module(f"colm.kv.{m}")


def names() -> tuple[str, ...]:
    _load()
    return tuple(_REGISTRY)


def get(name: str) -> Transport:
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"transport={name!r}: allowed are {('auto',) + tuple(_REGISTRY)}")
    return _REGISTRY[name]


def receivable(decode_cuda: bool) -> list[str]:
    """What a decode worker of this process can receive (``ReserveReply.transports``)."""
    _load()
    return [t.name for t in _REGISTRY.values()
            if not t.same_process and (not t.cuda or decode_cuda) and t.importable()]


def choose(requested: str, facts: PairFacts) -> str:
    """The transport of a request: ``requested`` ("" = legacy: shm on one host, else grpc; "auto"; or a name) for a
    pair with ``facts``. ValueError for an unknown name, or a named transport whose needs this side can see are
    unmet (CUDA on the prefill worker, the module importable, the decode worker listing it)."""
    _load()
    if requested == "":
        return "shm" if facts.same_host else "grpc"
    if requested == "auto":
        for name in AUTO_ORDER:
            if name in _REGISTRY and _REGISTRY[name].unmet(facts) is None:
                return name
        return "grpc"
    t = get(requested)
    if t.cuda and not facts.prefill_cuda:
        raise ValueError(f"path={requested!r} needs the prefill worker on CUDA; this one runs on CPU "
                         "(use path 'shm', 'grpc' or 'auto')")
    if not t.importable():
        raise ValueError(f"transport={requested!r} {t.unmet(facts)}")
    if facts.decode_transports and requested not in facts.decode_transports:
        raise ValueError(f"transport={requested!r}: the decode worker cannot receive it (it lists "
                         f"{list(facts.decode_transports)})")
    return requested


def config_names() -> tuple[str, ...]:
    """Values ``transport:`` may take in serve.yaml."""
    return ("auto",) + tuple(n for n in names() if not get(n).same_process)
