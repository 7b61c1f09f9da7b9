"""The deploy manifests parse and validate; the launcher's config accepts serve.yaml and refuses bad ones."""

from pathlib import Path

import pytest
import yaml

from colm.commands.serve import load_config
from colm.deploy.config import ClusterConfig, bundled_serve_yaml
from colm.deploy.launcher import demo_model_dir, ensure_model

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_serve_yaml_is_accepted_with_safe_defaults():
    cfg = ClusterConfig.from_yaml(DEPLOY / "serve.yaml")
    assert bundled_serve_yaml() == (DEPLOY / "serve.yaml").resolve()
    # nothing on 0.0.0.0 by default: workers bind their node IP, which is 127.0.0.1 on the embedded cluster
    assert cfg.router.host == "127.0.0.1" and cfg.workers.host == "auto"
    assert cfg.workers.mode == "auto"  # colocated on one GPU (measured faster there), disaggregated otherwise
    assert cfg.workers.num_prefill >= 1 and cfg.workers.num_decode >= 1
    assert cfg.decode["block_size"] == 16 and cfg.model.path is None
    assert len(cfg.token()) >= 16 and cfg.token() != cfg.token()  # random per launch when unset
    from colm.router.config import auto_replicas

    assert cfg.router.replicas == auto_replicas() >= 1  # "auto": resolved to this machine's count


def test_auto_router_replicas_follow_the_cores():
    from colm.router.config import RouterConfig, auto_replicas

    assert [auto_replicas(c) for c in (1, 2, 4, 7, 8, 12, 16, 64)] == [1, 1, 1, 1, 2, 3, 4, 4]
    assert isinstance(RouterConfig(replicas="auto").replicas, int)
    for bad in ("two", 0, True):
        with pytest.raises(ValueError, match="router.replicas"):
            RouterConfig(replicas=bad)


def test_serve_yaml_errors_name_the_field(monkeypatch):
    base = yaml.safe_load((DEPLOY / "serve.yaml").read_text())
    cases = [({"router": {"grpc_port": 70000}}, "router.grpc_port=70000"),
             ({"router": {"bogus": 1}}, "router: unknown fields ['bogus']"),
             ({"workers": {"num_decode": 0}}, "workers.num_decode=0"),
             ({"workers": {"decode_resources": {"decode": -1}}}, "workers.decode_resources"),
             ({"model": {"dtype": "int8"}}, "model.dtype='int8'"),
             ({"security": {"cluster_token": "short"}}, "security.cluster_token"),
             ({"nonsense": {}}, "unknown sections ['nonsense']"),
             ({"router": {"tls_cert": "a.pem"}}, "tls_cert and router.tls_key")]
    for patch, msg in cases:
        d = {k: dict(v or {}) if isinstance(v, dict) else v for k, v in base.items()}
        for section, values in patch.items():
            d[section] = {**(d.get(section) or {}), **values}
        with pytest.raises(ValueError) as e:
            ClusterConfig.from_dict(d)
        assert msg in str(e.value)
    monkeypatch.setenv("COLM_TEST_TOKEN", "t" * 20)
    cfg = ClusterConfig.from_dict({"security": {"cluster_token": "env:COLM_TEST_TOKEN"}})
    assert cfg.token() == "t" * 20


def test_decode_section_is_checked_by_the_engine_config():
    pytest.importorskip("colm.decode_worker.config")
    with pytest.raises(ValueError, match="block_size=3"):
        ClusterConfig.from_dict({"decode": {"block_size": 3}})
    with pytest.raises(ValueError, match="unknown fields"):
        ClusterConfig.from_dict({"decode": {"no_such_field": 1}})


def test_serve_cli_overrides(tmp_path):
    import argparse

    args = argparse.Namespace(config=None, model=None, address="auto", host="10.1.2.3", grpc_port=1234,
                              http_port=None, num_prefill=2, num_decode=3, baseline=False, mode="colocated")
    cfg = load_config(args)
    assert (cfg.ray.address, cfg.router.host, cfg.router.grpc_port) == ("auto", "10.1.2.3", 1234)
    assert (cfg.workers.num_prefill, cfg.workers.num_decode, cfg.workers.mode) == (2, 3, "colocated")


def test_workers_mode_picks_colocated_where_workers_would_share_gpus():
    from colm.deploy.actors import gpus_per_worker
    from colm.deploy.config import WorkersSection, resolve_mode

    assert WorkersSection().mode == "disaggregated"  # the dataclass's default; deploy/serve.yaml sets auto
    one = WorkersSection(mode="auto")  # 1 prefill + 1 decode
    assert [resolve_mode(one, g) for g in (0, 1, 2, 8)] == ["disaggregated", "colocated", "disaggregated",
                                                            "disaggregated"]
    assert gpus_per_worker(one, 1) == 1.0  # colocated: the decode worker has the GPU to itself
    assert gpus_per_worker(one, 2) == 1.0 and gpus_per_worker(one, 0) == 0.0
    split = WorkersSection(mode="disaggregated")
    assert resolve_mode(split, 1) == "disaggregated" and gpus_per_worker(split, 1) == 0.5
    assert resolve_mode(WorkersSection(mode="colocated"), 0) == "colocated"
    with pytest.raises(ValueError, match=r"workers.mode='both': allowed are \['auto', 'disaggregated', 'colocated'\]"):
        WorkersSection(mode="both")


def test_cluster_yaml_for_ray_up():
    d = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    assert d["provider"]["type"] == "local" and d["provider"]["head_ip"]
    assert len(d["provider"]["worker_ips"]) >= 1
    assert {"cluster_name", "head_start_ray_commands", "worker_start_ray_commands", "setup_commands"} <= set(d)
    assert any("--head" in c for c in d["head_start_ray_commands"])
    text = (DEPLOY / "cluster.yaml").read_text()
    assert "prefill_gpu" in text and "decode_gpu" in text  # the commented cloud example


def test_kuberay_manifest():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay.yaml").read_text()))
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"].startswith("ray.io/")
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for g in groups.values():
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "colm serve --address auto" in " ".join(head["args"])
    assert {p["containerPort"] for p in head["ports"]} == {50051, 8000, 9400}


def test_demo_model_default_and_random_preset_built_once(tmp_path, monkeypatch):
    from colm.assets import demo_model_dir as bundled

    assert ensure_model(ClusterConfig()) == str(bundled())
    assert ensure_model(ClusterConfig.from_dict({"model": {"path": "demo"}})) == str(bundled())
    monkeypatch.setenv("COLM_CACHE", str(tmp_path))
    cfg = ClusterConfig.from_dict({"model": {"preset": "tiny-air"}})
    path = ensure_model(cfg)
    assert Path(path) == demo_model_dir("tiny-air") and (Path(path) / "config.json").is_file()
    mtime = (Path(path) / "model.safetensors").stat().st_mtime
    assert ensure_model(cfg) == path and (Path(path) / "model.safetensors").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="not a colm checkpoint"):
        ensure_model(ClusterConfig.from_dict({"model": {"path": str(tmp_path / "nope")}}))


def test_worker_hosts_bind_and_advertise():
    from colm.deploy.addresses import worker_hosts

    node = lambda: "198.51.100.7"  # noqa: E731
    assert worker_hosts("auto", node) == ("198.51.100.7", "198.51.100.7")
    assert worker_hosts("0.0.0.0", node) == ("0.0.0.0", "198.51.100.7")  # never advertise a wildcard
    assert worker_hosts("10.1.2.3", node) == ("10.1.2.3", "10.1.2.3")
    with pytest.raises(ValueError, match="workers.host"):
        worker_hosts("", node)


def test_auto_gpus_place_every_worker_and_a_shortfall_fails_at_once():
    from colm.deploy.actors import WorkerPool, gpus_per_worker
    from colm.deploy.config import ClusterConfig

    cfg = ClusterConfig.from_dict({"workers": {"num_prefill": 1, "num_decode": 1, "mode": "disaggregated"}})
    assert gpus_per_worker(cfg.workers, 0) == 0.0
    assert gpus_per_worker(cfg.workers, 1) == 0.5  # one GPU: both roles share it
    assert gpus_per_worker(cfg.workers, 2) == 1.0
    three = ClusterConfig.from_dict({"workers": {"num_prefill": 2, "num_decode": 2, "mode": "disaggregated"}}).workers
    assert gpus_per_worker(three, 3) == 0.5  # 4 workers on 3 GPUs: two per GPU, never 0.75 (3 would not pack)
    whole = ClusterConfig.from_dict({"workers": {"num_gpus_per_worker": 1}})
    pool = WorkerPool(whole, "unused", "t" * 16)
    pool._num_gpus = lambda: 1.0
    pool._mode = "disaggregated"
    with pytest.raises(RuntimeError, match="GPU: workers need 2, the cluster has 1.*num_gpus_per_worker"):
        pool.check_fits({"CPU": 8.0, "GPU": 1.0}, embedded=True)
    pool.check_fits({"CPU": 8.0, "GPU": 1.0}, embedded=False)  # a joined cluster may grow: a warning only


def test_an_actor_started_at_rays_worker_niceness_lowers_it_where_it_may():
    """``serving_priority`` in a process started at nice 15 (what Ray gives its workers by default): 0 where the
    process may lower it (root, as in CI), else it stays and a warning names RAY_worker_niceness."""
    import os
    import subprocess
    import sys

    code = ("import logging, os; logging.basicConfig(); from colm.deploy.actors import serving_priority; "
            "print(os.getpriority(os.PRIO_PROCESS, 0), serving_priority(), os.getpriority(os.PRIO_PROCESS, 0))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: os.nice(15 - os.nice(0)))
    assert r.returncode == 0, r.stderr
    before, said, after = map(int, r.stdout.split())
    assert before == 15 and said == after
    if os.geteuid() == 0:
        assert after == 0
    else:
        assert after == 15 and "RAY_worker_niceness" in r.stderr
