"""Router replicas that die (deploy/replicas.py), over stand-in actor handles and a stand-in clock: the death is
logged with the replica's pid and Ray's account of the exit, the live-router gauge says how many routers serve, and
the replica is started again after a backoff that doubles with each restart, up to ``router.replica_max_restarts``
(a replica dying at start-up does not spin). Nothing watched them before: a killed replica stayed dead, unlogged.
The real thing, a replica actor killed on Ray: tests/test_service_ray_colocated.py."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("ray")
from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402

from colm.deploy.replicas import RouterReplicas  # noqa: E402

# what Ray says of an actor whose process was SIGKILLed (an os._exit(3) reads the same)
KILLED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: RouterReplica\n\tpid: {pid}\n"
          "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
          "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) "
          "the process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called.")


def _died(pid: int) -> ActorDiedError:
    e = ActorDiedError()
    e.error_msg = KILLED.format(pid=pid)
    return e


class Actor:
    """A RouterReplica actor handle: each ``<method>.remote().future()`` is a Future the test settles."""

    def __init__(self, index: int, pid: int, starts: bool = True) -> None:
        self.index, self.pid = index, pid
        self.calls: dict[str, list[Future]] = {"addresses": [], "process": []}
        self.starts = starts  # False: its constructor fails (it dies before it listens)
        self.addresses = self._method("addresses")
        self.process = self._method("process")

    def _method(self, name: str):
        def remote():
            fut: Future = Future()
            if name == "addresses":
                fut.set_result({"grpc": "127.0.0.1:1"}) if self.starts else fut.set_exception(_died(self.pid))
            self.calls[name].append(fut)
            return SimpleNamespace(future=lambda: fut)

        return SimpleNamespace(remote=remote)

    def answer(self) -> None:
        """Its liveness call out answers (its pid)."""
        self.calls["process"][-1].set_result({"pid": self.pid})

    def die(self, e: BaseException | None = None) -> None:
        self.calls["process"][-1].set_exception(e or _died(self.pid))


class Spawner:
    def __init__(self) -> None:
        self.made: list[Actor] = []
        self.fail_next_start = False

    def __call__(self, index: int) -> Actor:
        actor = Actor(index, pid=1000 + len(self.made), starts=not self.fail_next_start)
        self.fail_next_start = False
        self.made.append(actor)
        return actor


def _replicas(max_restarts: int = 2, count: int = 3):
    now = [0.0]
    registry = CollectorRegistry()
    spawn = Spawner()
    replicas = RouterReplicas(spawn, count, max_restarts=max_restarts, backoff_s=1.0, registry=registry,
                              clock=lambda: now[0])
    return replicas, spawn, now, lambda: registry.get_sample_value("colm_router_replicas_live")


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_killed_replica_is_logged_and_started_again_after_a_doubling_backoff(caplog):
    replicas, spawn, now, live = _replicas(max_restarts=2)
    assert replicas.start() == {1: {"grpc": "127.0.0.1:1"}, 2: {"grpc": "127.0.0.1:1"}}
    assert live() == 3 and len(replicas) == 2 and list(replicas) == spawn.made
    first = replicas[0]
    first.answer()
    replicas.check()
    assert replicas.replicas[0].pid == 1000 and live() == 3
    first.die(ActorUnavailableError("unreachable for now", None))  # not a death: asked again
    replicas.check()
    assert live() == 3 and len(first.calls["process"]) == 3 and not _errors(caplog)

    with caplog.at_level(logging.INFO, logger="colm.serve"):
        first.die()
        replicas.check()
        (line,) = _errors(caplog)
        assert "router replica 1 (pid 1000) died while serving" in line, line
        assert "exit type SYSTEM_ERROR, Worker unexpectedly exits with a connection error code 2." in line, line
        assert "starting it again in 1 s" in line and "2 of 3 routers serve" in line, line
        assert live() == 2 and list(replicas) == [spawn.made[1]]  # no calls go to the dead actor
        now[0] = 0.9
        replicas.check()
        assert len(spawn.made) == 2  # the backoff is not over
        now[0] = 1.0
        replicas.check()  # started again: same index, a new actor; live once it listens
        assert len(spawn.made) == 3 and replicas[0] is spawn.made[2] and spawn.made[2].index == 1 and live() == 2
        replicas.check()
        assert live() == 3 and any("router replica 1 is back" in r.getMessage() for r in caplog.records)

        caplog.clear()
        now[0] = 5.0
        spawn.fail_next_start = True  # its next start fails: a crash loop
        replicas[0].die()
        replicas.check()
        assert "starting it again in 2 s" in _errors(caplog)[-1]  # the second restart waits twice as long
        now[0] = 6.9
        replicas.check()
        assert len(spawn.made) == 3
        now[0] = 7.0
        replicas.check()
        replicas.check()
        line = _errors(caplog)[-1]
        assert len(spawn.made) == 4 and "router replica 1 (pid 1003) died while starting" in line, line
        assert "restarts are spent (router.replica_max_restarts=2): it stays out, 2 of 3 routers serve" in line, line
        now[0] = 1000.0
        replicas.check()
        assert len(spawn.made) == 4 and live() == 2 and list(replicas) == [spawn.made[1]]


def test_no_restarts_means_a_dead_replica_stays_out_at_once(caplog):
    replicas, spawn, now, live = _replicas(max_restarts=0, count=2)
    replicas.start()
    with caplog.at_level(logging.ERROR, logger="colm.serve"):
        replicas[0].die()
        replicas.check()
    assert "restarts are spent (router.replica_max_restarts=0)" in _errors(caplog)[0] and live() == 1
    now[0] = 1000.0
    replicas.check()
    assert len(spawn.made) == 1 and list(replicas) == []


def test_a_replica_that_does_not_start_fails_the_launch():
    replicas, spawn, _, _ = _replicas()
    spawn.fail_next_start = True
    with pytest.raises(ActorDiedError, match="pid: 1000"):
        replicas.start()


def test_a_replica_that_served_long_enough_since_its_restart_has_its_restarts_forgiven(caplog):
    """The limit stops a crash loop, not a replica that dies now and then: after STABLE_S live since its restart, its
    next death waits the first backoff again and counts as its first restart."""
    from colm.deploy.replicas import STABLE_S

    replicas, spawn, now, live = _replicas(max_restarts=1, count=2)
    replicas.start()
    replicas[0].die()
    replicas.check()
    now[0] = 1.0
    replicas.check()
    replicas.check()  # back, listening
    assert live() == 2 and replicas.replicas[0].restarts == 1
    now[0] = 1.0 + STABLE_S - 1
    replicas[0].answer()
    replicas.check()
    assert replicas.replicas[0].restarts == 1  # not long enough yet
    now[0] = 1.0 + STABLE_S
    replicas[0].answer()
    replicas.check()
    assert replicas.replicas[0].restarts == 0
    with caplog.at_level(logging.ERROR, logger="colm.serve"):
        replicas[0].die()
        replicas.check()
    assert "starting it again in 1 s" in _errors(caplog)[-1]  # not "restarts are spent"


def test_a_stop_signal_while_replicas_start_ends_the_start_at_once_and_ends_them():
    """``cancel_start`` (``colm serve``'s stop signal during start-up) ends a ``start`` still waiting for its replicas
    to listen within a fraction of a second, with StartError, and ends the replicas it started. It waited until every
    replica listened or ``START_TIMEOUT_S`` (300 s) passed."""
    import threading
    import time

    from colm.deploy.actors import StartError

    class Loading:  # a replica whose constructor has not finished: its addresses never come
        def __init__(self) -> None:
            self.fut: Future = Future()
            self.addresses = SimpleNamespace(remote=lambda: SimpleNamespace(future=lambda: self.fut))

    spawned, killed, out = [], [], {}

    def spawn(index):
        spawned.append(Loading())
        return spawned[-1]

    reps = RouterReplicas(spawn, 3, 3, 1.0, CollectorRegistry(), kill=killed.append)

    def start():
        try:
            reps.start()
        except StartError as e:
            out["error"], out["at"] = e, time.monotonic()

    t = threading.Thread(target=start, daemon=True)
    t.start()
    time.sleep(0.3)
    asked = time.monotonic()
    reps.cancel_start()
    t.join(5)
    assert not t.is_alive() and "stopped during start-up" in str(out["error"])
    assert out["at"] - asked < 1.0
    assert killed == spawned and len(killed) == 2
    assert list(reps) == [] and reps.num_live() == 1
