"""Why a worker Ray will not restart is out for good, as health (``detail``) and the log say it.

Ray's ActorDiedError text begins with the same generic line whatever happened ("The actor died unexpectedly before
finishing this task."); the cause is its ``The actor is dead because ...`` line. The pool gave the generic line and
called every such death "max_restarts=3 exhausted", also for an actor killed for good (``ray.kill`` with
``no_restart``: ``WorkerPool.kill(restart=False)``) that had used none of its restarts. No Ray cluster is started."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from colm.deploy.actors import WorkerPool, _cause  # noqa: E402
from colm.deploy.config import ClusterConfig  # noqa: E402

# the text of ray 2.60's ActorDiedError for each death (ids and addresses shortened)
KILLED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: WorkerActor\n\tactor_id: 9c0d\n"
          "\tpid: 3521\n\tnamespace: colm\n\tip: 127.0.0.1\nThe actor is dead because it was killed by `ray.kill`.")
CRASHED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: WorkerActor\n\tactor_id: 15b3\n"
           "\tpid: 3590\n\tnamespace: colm\n\tip: 127.0.0.1\nThe actor is dead because its worker process has died. "
           "Worker exit type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2.")


class _Died(ray.exceptions.ActorDiedError):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def __str__(self) -> str:
        return self.text


def test_the_cause_of_an_actors_death_is_rays_because_line():
    assert _cause(RuntimeError(KILLED)) == "The actor is dead because it was killed by `ray.kill`."
    assert _cause(RuntimeError(CRASHED)).startswith("The actor is dead because its worker process has died.")


@pytest.mark.parametrize("text, why", [(KILLED, "killed by `ray.kill`"), (CRASHED, "its worker process has died")])
def test_a_worker_ray_will_not_restart_is_dead_with_rays_cause(text, why, monkeypatch):
    cfg = ClusterConfig.from_dict({"model": {"path": "demo"}, "workers": {"num_prefill": 1, "num_decode": 1,
                                                                         "max_restarts": 3},
                                   "decode": {"num_blocks": 64}})
    pool = WorkerPool(cfg, "demo", "t" * 20)

    class Actor:
        class endpoints:  # noqa: N801 - stands for the actor method handle
            @staticmethod
            def remote():
                return None

    pool.actors["decode-0"], pool.roles["decode-0"] = Actor(), "decode"

    def died(ref, timeout_s):
        raise _Died(text)

    monkeypatch.setattr(pool, "_endpoints", died)
    [info] = pool.refresh()
    assert info.dead.startswith("died and Ray will not restart it"), info.dead
    assert why in info.dead, info.dead
    assert "exhausted" not in info.dead  # it may not be: a kill for good used none of its restarts
