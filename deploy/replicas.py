"""The launcher's router replicas (``router.replicas`` > 1): Ray actors on its node, watched, and started again when
one dies.

Path: ``start`` creates replicas 1..N-1 (``RouterReplica`` actors, ``deploy/router_replica.py``; ``spawn(index)`` is
the launcher's) and waits until each listens. From then on the launcher's watch calls ``check`` every second. Each
live replica has one liveness call out (``process``, which answers its pid); when that call ends with the actor's
death, the death is logged with the replica's pid and Ray's account of the exit, the live-router gauge drops, and
while the replica has restarts left (``router.replica_max_restarts``) a new actor of the same index (same ports, the
current workers) starts after a backoff that doubles with each of its restarts (``router.replica_restart_backoff_s``,
at most ``MAX_BACKOFF_S``): a replica that dies at start-up does not spin. It counts as live again once it listens.
Its restarts spent, it stays out, and the log says so. A replica that has served ``STABLE_S`` since its last
start has its restarts forgiven, as a process supervisor does: the limit stops a crash loop, not a replica that
dies once a week. Meanwhile the kernel spreads new connections over the routers
that still listen, so the service serves on (health stays serving); the connections the dead one held are gone.

Ray does not pass on an actor process's exit code or signal (a SIGKILL and an ``os._exit(3)`` read the same: "Worker
exit type: SYSTEM_ERROR ... connection error code 2"); the log gives Ray's exit type and detail and the pid, which
the kernel log (an OOM kill) and Ray's worker logs name.
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("colm.serve")

MAX_BACKOFF_S = 60.0  # a restart's wait never grows past this
START_TIMEOUT_S = 300.0  # the first replicas must listen within this (each loads the tokenizer, maybe a scorer)
STABLE_S = 600.0  # a replica live this long since its last start has its restart count set back to 0


@dataclass
class Replica:
    index: int  # 1..N-1: serves its metrics on metrics_port + index
    handle: Any = None  # its RouterReplica actor
    state: str = "starting"  # "starting" | "live" | "dead" (a restart due at ``restart_at``) | "out" (restarts spent)
    call: Any = None  # the call out (a concurrent Future): its addresses while starting, its pid while live
    pid: int = 0
    restarts: int = 0
    restart_at: float = 0.0
    live_since: float = 0.0  # when it last began to listen


class RouterReplicas:
    """Replicas 1..``count``-1, started by ``spawn(index)`` (a new RouterReplica actor handle). Iterating gives the
    handles of those starting or live; ``len`` and ``[i]`` index them all by replica (``[0]`` is replica 1)."""

    def __init__(self, spawn: Callable[[int], Any], count: int, max_restarts: int, backoff_s: float,
                 registry=None, clock: Callable[[], float] = time.monotonic,
                 kill: Callable[[Any], None] | None = None) -> None:
        self.spawn = spawn
        self.kill = kill  # ends an actor (ray.kill unless given)
        self._cancel = threading.Event()
        self.max_restarts = max_restarts
        self.backoff_s = backoff_s
        self.clock = clock
        self.replicas = [Replica(i) for i in range(1, count)]
        self.live = None
        if registry is not None:
            from prometheus_client import Gauge

            self.live = Gauge("colm_router_replicas_live", "Router processes serving the ports: the launcher's own and "
                              f"its live replicas (of router.replicas={count})", registry=registry)
        self._publish()

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, i: int):
        return self.replicas[i].handle

    def __iter__(self):  # the replicas there are to call (a dead actor's calls would fail, each logged by Ray)
        return iter([r.handle for r in self.replicas if r.state in ("starting", "live") and r.handle is not None])

    def num_live(self) -> int:
        """The routers serving the ports now: the launcher's own and the replicas that listen."""
        return 1 + sum(r.state == "live" for r in self.replicas)

    def start(self) -> dict:
        """Start every replica and wait until each listens (``START_TIMEOUT_S``); their addresses by index. A replica
        that fails to start fails the launch with its error (no restart at start: the same config would fail again)."""
        for r in self.replicas:
            r.handle = self.spawn(r.index)
            r.call = r.handle.addresses.remote().future()
        end, late = time.monotonic() + START_TIMEOUT_S, [r.call for r in self.replicas]
        while late and time.monotonic() < end:  # in slices: a stop signal (cancel_start) ends the wait at once
            if self._cancel.is_set():
                self._end_starting()
                from colm.deploy.actors import StartError

                raise StartError("stopped during start-up (router replicas were starting)")
            _, late = concurrent.futures.wait(late, timeout=min(0.25, max(0.0, end - time.monotonic())))
        if late:
            raise TimeoutError(f"router replicas {[r.index for r in self.replicas if r.call in late]} did not listen "
                               f"within {START_TIMEOUT_S:g} s")
        got = {r.index: r.call.result() for r in self.replicas}
        for r in self.replicas:
            self._listening(r)
        self._publish()
        return got

    def cancel_start(self) -> None:
        """Make a ``start`` in progress on another thread end within 0.25 s with ``StartError``, its replicas ended (a
        stop signal while they load: ``colm serve`` stops at once, not after they listen or ``START_TIMEOUT_S``)."""
        self._cancel.set()

    def _end_starting(self) -> None:
        kill = self.kill
        if kill is None:
            import ray

            kill = ray.kill
        for r in self.replicas:
            if r.handle is not None and r.state == "starting":
                try:
                    kill(r.handle)
                except Exception as e:  # noqa: BLE001 - it may be gone already
                    log.debug("router replica %d: kill at a cancelled start failed: %s", r.index, e)
                r.state = "out"
        self._publish()

    def check(self) -> None:
        """One look at every replica (never blocks): a death is logged and its restart planned; a restart due is
        started; a restarted replica that listens is live again."""
        from ray.exceptions import ActorDiedError

        now = self.clock()
        for r in self.replicas:
            if r.state == "dead" and now >= r.restart_at:
                log.warning("router replica %d: starting it again (restart %d of %d)", r.index, r.restarts,
                            self.max_restarts)
                r.handle, r.state = self.spawn(r.index), "starting"
                r.call = r.handle.addresses.remote().future()
                continue
            if r.state not in ("starting", "live") or not r.call.done():
                continue
            e = r.call.exception()
            if isinstance(e, ActorDiedError):
                self._died(r, e, now)
            elif e is not None:  # not a death (the call failed, the actor unreachable for now): ask again
                log.debug("router replica %d: liveness call failed: %s", r.index, e)
                r.call = r.handle.process.remote().future()
            elif r.state == "starting":
                log.warning("router replica %d is back, listening on the service's ports", r.index)
                self._listening(r)
            else:  # it answered: it lives; the next call waits on it
                r.pid = r.call.result().get("pid", r.pid)
                r.call = r.handle.process.remote().future()
                if r.restarts and now - r.live_since >= STABLE_S:
                    log.info("router replica %d has served %g s since its restart: its restarts are forgiven",
                             r.index, now - r.live_since)
                    r.restarts = 0
        self._publish()

    def _listening(self, r: Replica) -> None:
        r.state, r.live_since = "live", self.clock()
        r.call = r.handle.process.remote().future()  # answers the pid at once, then one call per check

    def _died(self, r: Replica, e: BaseException, now: float) -> None:
        was = "while starting" if r.state == "starting" else "while serving"
        pid = r.pid or _pid_of(e)
        r.call, r.pid = None, 0
        live = self.num_live() - (r.state == "live")
        if r.restarts < self.max_restarts:
            wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** r.restarts)
            r.restarts += 1
            r.state, r.restart_at = "dead", now + wait
            log.error("router replica %d (pid %s) died %s: %s; starting it again in %g s (%d of %d routers serve "
                      "meanwhile)", r.index, pid or "?", was, _exit_cause(e), wait, live, len(self.replicas) + 1)
        else:
            r.state = "out"
            log.error("router replica %d (pid %s) died %s: %s; its restarts are spent (router.replica_max_restarts=%d):"
                      " it stays out, %d of %d routers serve", r.index, pid or "?", was, _exit_cause(e),
                      self.max_restarts, live, len(self.replicas) + 1)

    def _publish(self) -> None:
        if self.live is not None:
            self.live.set(self.num_live())


def _exit_cause(e: BaseException) -> str:
    """Ray's account of an actor's death in one line: its worker's exit type and the first sentence of its detail."""
    text = " ".join(str(e).split())
    m = re.search(r"Worker exit type: (\S+) Worker exit detail: (.*?\.)(?: |$)", text)
    if m:
        return f"exit type {m.group(1)}, {m.group(2)} (Ray gives no exit code or signal)"
    from colm.deploy.actors import _cause

    return _cause(e)


def _pid_of(e: BaseException) -> str:
    m = re.search(r"\bpid: (\d+)", str(e))
    return m.group(1) if m else ""
