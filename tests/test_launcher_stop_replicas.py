"""``Launcher.stop`` with router replicas, one of which has died (killed, crashed) before the launcher's watch noticed:
the other replicas still get their whole drain. ``_stop_replicas`` waited on every replica's ``stop`` with one
``ray.get``, which raised at once with the dead one's ``ActorDiedError``; the ``ray.kill`` that follows then killed the
live replicas mid-drain, and their clients' requests in flight ended with a reset connection instead of finishing.
Found by killing a replica just before a stop during load (3 replicas, on an embedded Ray cluster)."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")


@pytest.mark.timeout(60)
def test_a_dead_replica_does_not_cut_the_other_replicas_drain(tmp_path):
    from types import SimpleNamespace

    from colm.deploy.config import ClusterConfig
    from colm.deploy.launcher import Launcher

    class StandInReplica:  # defined here: Ray's workers cannot import the test module; a local class travels by value
        """A RouterReplica's ``stop``: it drains (``seconds``), then says it finished by writing ``marker``."""

        def stop(self, seconds: float, marker: str) -> None:
            time.sleep(seconds)
            with open(marker, "w") as f:
                f.write("drained")

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        actor = ray.remote(StandInReplica).options(num_cpus=0)
        dead, live = actor.remote(), actor.remote()
        marker = tmp_path / "drained"
        ray.get([dead.__ray_ready__.remote(), live.__ray_ready__.remote()])
        ray.kill(dead)  # died before the stop; the launcher's watch has not noticed yet

        def handle(a):  # a replica handle whose stop() takes the stand-in's arguments
            return SimpleNamespace(stop=SimpleNamespace(remote=lambda: a.stop.remote(2.0, str(marker))), actor=a)

        launcher = Launcher(ClusterConfig.from_dict({"router": {"drain_s": 10.0}}))
        launcher.replicas = [handle(dead), handle(live)]
        killed = []
        real_kill = ray.kill
        ray.kill = lambda h, **kw: (killed.append(h), real_kill(h.actor, **kw))
        try:
            t0 = time.monotonic()
            launcher._stop_replicas()
            took = time.monotonic() - t0
        finally:
            ray.kill = real_kill
        assert marker.exists(), f"the live replica was killed mid-drain ({took:.2f} s after the stop)"
        assert 2.0 <= took < 10.0 + 30
        assert len(killed) == 2 and launcher.replicas == []  # both ended afterwards
    finally:
        if started:
            ray.shutdown()
