"""`colm serve`'s configuration is refused at once, in one line naming the field, when a value has the wrong type
(YAML's quoted numbers, fractions where a count belongs, a bare ``no``) or the file is not a mapping; a checkpoint
whose weights file is truncated or whose tensors do not match its config is refused before Ray or any worker
starts; a worker that fails at start is reported with the line of its error that says why."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from colm.deploy.actors import _cause
from colm.deploy.config import ClusterConfig, bundled_serve_yaml
from colm.deploy.launcher import Launcher

BASE = yaml.safe_load(open(bundled_serve_yaml()))

BAD = [  # (section, field, value, the message's words)
    ("router", "max_running", "10", "router.max_running='10': must be an integer"),
    ("router", "max_queued", 1.5, "router.max_queued=1.5: must be an integer"),
    ("router", "http_port", True, "router.http_port=True: must be an integer or null"),
    ("router", "replicas", 2.5, "router.replicas=2.5"),
    ("router", "headroom", -5, "router.headroom=-5: must be > 0"),
    ("router", "default_deadline_s", float("nan"), "router.default_deadline_s=nan: must be a number"),
    ("security", "cluster_token", 12345678901234567890, "security.cluster_token=12345678901234567890: must be a string"),
    ("workers", "start_timeout_s", "abc", "workers.start_timeout_s='abc': must be a number"),
    ("workers", "num_cpus_per_worker", "two", "workers.num_cpus_per_worker='two': must be a number"),
    ("workers", "num_cpus_per_worker", -1, "workers.num_cpus_per_worker=-1: must be >= 0"),
    ("workers", "host", "", "workers.host=''"),
    ("model", "score_prompts", "no", "model.score_prompts='no': must be true or false"),
    ("decode", "block_size", "16", "decode.block_size='16': must be an integer"),
    ("decode", "num_blocks", 12.5, "decode.num_blocks=12.5: must be an integer"),
    ("prefill", "chunk_size", [8192], "prefill.chunk_size=[8192]: must be an integer"),
    ("ray", "num_cpus", "4", "ray.num_cpus='4': must be an integer or null"),
]


@pytest.mark.parametrize("section, field, value, words", BAD, ids=[f"{s}.{f}={v!r}" for s, f, v, _ in BAD])
def test_a_value_of_the_wrong_type_is_refused_naming_the_field(section, field, value, words):
    d = copy.deepcopy(BASE)
    d.setdefault(section, {})[field] = value
    with pytest.raises(ValueError) as e:
        ClusterConfig.from_dict(d)
    assert words in str(e.value)


@pytest.mark.parametrize("cfg, words", [
    ([1, 2], "serve config: must be a mapping of sections"),
    ({"router": [1]}, "router: must be a mapping of fields"),
    ({"workers": "x"}, "workers: must be a mapping of fields"),
    ({"transport": 0}, "transport=0: must be a string"),
])
def test_a_section_that_is_not_a_mapping_is_refused(cfg, words):
    with pytest.raises(ValueError, match=words):
        ClusterConfig.from_dict(cfg)


def test_the_bundled_configs_and_yamls_own_spellings_still_load():
    ClusterConfig.from_dict(copy.deepcopy(BASE))
    cfg = ClusterConfig.from_dict(yaml.safe_load("router: {speculative: off, replicas: auto, headroom: 2}\n"
                                                 "decode: {num_blocks: 64}\nworkers: {num_cpus_per_worker: 0.5}"))
    assert cfg.router.speculative == "off" and cfg.router.headroom == 2 and cfg.workers.num_cpus_per_worker == 0.5


def _colm() -> list[str]:
    exe = shutil.which("colm")
    return [exe] if exe else [sys.executable, "-m", "colm.cli"]


@pytest.mark.parametrize("text, words", [
    ("[1, 2]\n", "must be a mapping of sections"),
    ("router:\n  grpc_port: [1\n", "not valid YAML"),
    ("router:\n  max_running: '10'\n", "router.max_running='10': must be an integer"),
    (None, "cannot read it"),
])
def test_colm_serve_says_what_is_wrong_with_its_config_in_one_line(tmp_path, text, words):
    path = tmp_path / "serve.yaml"
    if text is not None:
        path.write_text(text)
    p = subprocess.run(_colm() + ["serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr
    assert str(path) in lines[0] or "must be" in lines[0]


@pytest.fixture()
def demo_copy(tmp_path):
    from colm.assets import demo_model_dir

    d = tmp_path / "model"
    shutil.copytree(demo_model_dir(), d)
    return d


def _prepare(path, **decode):
    return Launcher(ClusterConfig.from_dict({"model": {"path": str(path)},
                                             "decode": {"num_blocks": 64, **decode}})).prepare()


def test_a_truncated_weights_file_is_refused_before_anything_starts(demo_copy):
    _prepare(demo_copy)  # whole: fine
    weights = demo_copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        _prepare(demo_copy)


def test_tensors_that_do_not_match_the_config_are_refused_before_anything_starts(demo_copy):
    import json

    meta = json.loads((demo_copy / "config.json").read_text())
    meta["model"]["vocab_size"] = 100
    (demo_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"tensor embed.weight has shape \(\d+, \d+\), the config needs \(100, "):
        _prepare(demo_copy)


def test_the_default_pool_size_is_refused_on_cpu_as_an_explicit_zero_is(demo_copy, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="decode.num_blocks=0 sizes the KV pool from free GPU memory"):
        Launcher(ClusterConfig.from_dict({"model": {"path": str(demo_copy)}})).prepare()


def test_a_worker_failing_at_start_is_reported_by_the_line_that_says_why():
    text = ("The actor died because of an error raised in its creation task, ray::WorkerActor.__init__() (pid=7, "
            "repr=<colm.deploy.actors.Work\n  File \"/x/actors.py\", line 80, in __init__\n    raise ValueError(...)\n"
            "ValueError: /m/model.safetensors: tensor embed.weight has shape (260, 384), the config needs (100, 384)")
    assert _cause(RuntimeError(text)) == ("ValueError: /m/model.safetensors: tensor embed.weight has shape (260, 384), "
                                          "the config needs (100, 384)")
    assert _cause(RuntimeError("GetTimeoutError: no reply")) == "GetTimeoutError: no reply"
    assert _cause(RuntimeError("plain words")) == "plain words"


@pytest.mark.parametrize("router, words", [
    ({"grpc_port": 9001, "http_port": 9001}, "router.http_port=9001: router.grpc_port has that port too"),
    ({"grpc_port": 9001, "metrics_port": 9001}, "router.metrics_port=9001: router.grpc_port has that port too"),
])
def test_two_router_ports_that_clash_are_refused_before_anything_starts(router, words):
    with pytest.raises(ValueError, match=words):
        ClusterConfig.from_dict({"router": router})


def test_ports_that_cannot_clash_are_accepted():
    ClusterConfig.from_dict({"router": {"grpc_port": 0, "http_port": 0, "metrics_port": 0}})  # each a free port
    # the metrics port on another host than the public ports may share their number
    ClusterConfig.from_dict({"router": {"host": "127.0.0.1", "grpc_port": 9001, "metrics_host": "127.0.0.2",
                                        "metrics_port": 9001}})


def test_no_prefill_workers_only_where_none_are_used():
    assert ClusterConfig.from_dict({"workers": {"mode": "colocated", "num_prefill": 0}}).workers.num_prefill == 0
    for mode in ("disaggregated", "auto"):
        with pytest.raises(ValueError, match=r"workers.num_prefill=0: must be an integer >= 1 \(0 only with"):
            ClusterConfig.from_dict({"workers": {"mode": mode, "num_prefill": 0}})


def test_a_metrics_port_on_the_wildcard_clashes_with_the_same_public_port():
    with pytest.raises(ValueError, match="router.metrics_port=9001"):
        ClusterConfig.from_dict({"router": {"host": "0.0.0.0", "grpc_port": 9001, "metrics_host": "127.0.0.1",
                                            "metrics_port": 9001}})


def test_a_port_that_cannot_be_bound_is_reported_with_the_os_reason():
    import socket

    import grpc

    from colm.proto.rpc import bind_port

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        for address, reason in ((f"127.0.0.1:{port}", "Address already in use"),
                                ("198.51.100.77:5000", "Cannot assign requested address")):  # not this machine's
            server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1),
                                 options=[("grpc.so_reuseport", 0)])
            with pytest.raises(OSError) as e:
                bind_port(server, address, "router gRPC")
            assert f"router gRPC: cannot listen on {address} ({reason})" in str(e.value)
            server.stop(None)
    finally:
        taken.close()
