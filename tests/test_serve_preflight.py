"""`colm serve` refuses, at once and in one line, what it cannot serve safely: an ``env:`` secret whose
variable is unset, TLS files that are missing, half given or not a PEM pair, a checkpoint the engines
cannot serve (not CoLM-Air). The metrics port binds loopback unless ``router.metrics_host`` says otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from colm.deploy.config import ClusterConfig, bundled_serve_yaml
from colm.deploy.actors import engines_available
from colm.deploy.launcher import Launcher

UNSET = "COLM_TEST_SURELY_UNSET_VAR"


def _colm() -> list[str]:
    exe = shutil.which("colm")
    return [exe] if exe else [sys.executable, "-m", "colm.cli"]


def _serve(tmp_path: Path, cfg: dict, timeout_s: float = 60.0) -> tuple[int, str, float]:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    t0 = time.monotonic()
    p = subprocess.run(_colm() + ["serve", "--config", str(path)], capture_output=True, text=True, env=env,
                       timeout=timeout_s)
    return p.returncode, p.stderr, time.monotonic() - t0


@pytest.mark.parametrize("section, field", [("router", "api_key"), ("router", "tls_cert"), ("router", "tls_key"),
                                            ("security", "cluster_token")])
def test_an_unset_env_secret_is_an_error_naming_field_and_variable(monkeypatch, section, field):
    monkeypatch.delenv(UNSET, raising=False)
    d = {section: {field: f"env:{UNSET}"}}
    if field.startswith("tls_"):  # the other half is there: only the unset variable is wrong
        other = "tls_key" if field == "tls_cert" else "tls_cert"
        d[section][other] = str(bundled_serve_yaml())
    with pytest.raises(ValueError) as e:
        ClusterConfig.from_dict(d)
    assert f"{section}.{field}" in str(e.value) and UNSET in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(UNSET, "")  # empty is no key either
    with pytest.raises(ValueError, match=UNSET):
        ClusterConfig.from_dict(d)


def test_a_set_env_secret_is_read(monkeypatch):
    monkeypatch.setenv(UNSET, "k" * 20)
    cfg = ClusterConfig.from_dict({"router": {"api_key": f"env:{UNSET}"}, "security": {"cluster_token": f"env:{UNSET}"}})
    assert cfg.router.api_key == "k" * 20 and cfg.token() == "k" * 20


def test_colm_serve_with_an_unset_api_key_exits_before_starting_anything(tmp_path):
    rc, err, seconds = _serve(tmp_path, {"model": {"path": "demo"},
                                         "router": {"grpc_port": 0, "http_port": 0, "api_key": f"env:{UNSET}"}})
    assert rc != 0 and seconds < 45
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "router.api_key" in lines[0] and UNSET in lines[0], err
    assert "Traceback" not in err and "Ray" not in err


def test_tls_files_must_exist_and_come_in_pairs(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    with pytest.raises(ValueError, match=r"router\.tls_key is not"):
        ClusterConfig.from_dict({"router": {"tls_cert": str(cert)}})
    with pytest.raises(ValueError, match=r"router\.tls_cert is not"):
        ClusterConfig.from_dict({"router": {"tls_key": str(cert)}})
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError) as e:
        ClusterConfig.from_dict({"router": {"tls_cert": str(cert), "tls_key": missing}})
    assert "router.tls_key" in str(e.value) and missing in str(e.value)
    # both exist but are no PEM pair: refused by the launcher's check, before Ray starts
    launcher = Launcher(ClusterConfig.from_dict({"model": {"path": "demo"},
                                                "router": {"tls_cert": str(cert), "tls_key": str(cert)}}))
    with pytest.raises(ValueError, match="router.tls_cert"):
        launcher.prepare()


def test_metrics_bind_loopback_unless_metrics_host_is_set(monkeypatch):
    import colm.router.metrics as metrics
    from colm.model import CoLM
    from colm.presets import preset
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.local_backend import LocalBackend
    from colm.router.server import ThreadedRouterServer
    from colm.tokenizer import ByteTokenizer

    assert yaml.safe_load(bundled_serve_yaml().read_text())["router"]["metrics_host"] == "127.0.0.1"
    assert ClusterConfig.from_dict({"router": {"host": "0.0.0.0"}}).router.metrics_host == "127.0.0.1"
    hosts = []
    real = metrics.serve_metrics
    monkeypatch.setattr(metrics, "serve_metrics", lambda reg, host, port: hosts.append(host) or real(reg, host, port))
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    # router.host is not loopback's literal address: the metrics port must not follow it
    for rcfg, want in ((RouterConfig(host="localhost", grpc_port=0, http_port=None, metrics_port=0), "127.0.0.1"),
                       (RouterConfig(grpc_port=0, http_port=None, metrics_port=0, metrics_host="localhost"), "localhost")):
        bg = ThreadedRouterServer(Router(rcfg, cfg, ByteTokenizer(), LocalBackend(model)))
        try:
            assert hosts[-1] == want and bg.addresses["metrics"].startswith(f"http://{want}:")
        finally:
            bg.stop()


@pytest.mark.skipif(not engines_available(), reason="without the engines the router serves any model in-process")
def test_colm_serve_refuses_a_model_the_engines_cannot_serve_at_once(tmp_path):
    from colm import checkpoint
    from colm.model import CoLM
    from colm.presets import preset

    assert not preset("tiny").kv_sharing
    ckpt = tmp_path / "tiny"
    checkpoint.save(CoLM(preset("tiny")).reset_parameters(std=0.02, seed=0), ckpt)
    rc, err, seconds = _serve(tmp_path, {"model": {"path": str(ckpt)},
                                         "router": {"grpc_port": 0, "http_port": 0, "metrics_port": None}})
    assert rc != 0 and seconds < 45, (rc, seconds, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "not a CoLM-Air model" in lines[0] and str(ckpt) in lines[0], err
    assert "Traceback" not in err and "Ray" not in err
    # and a random-weight preset that is not Air is refused before any weight is built
    with pytest.raises(ValueError, match=r"model.preset='tiny': not a CoLM-Air model"):
        Launcher(ClusterConfig.from_dict({"model": {"preset": "tiny"}})).prepare()


def test_a_missing_or_broken_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        Launcher(ClusterConfig.from_dict({"model": {"path": str(tmp_path / "nope")}})).prepare()
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        Launcher(ClusterConfig.from_dict({"model": {"path": str(tmp_path)}})).prepare()


def test_the_start_hints_say_where_the_key_goes_and_never_print_it(capsys):
    import types

    from colm.commands.serve import announce
    from colm.router.config import RouterConfig

    secret = "s3cret-key-value-0123456789"
    for cfg in (RouterConfig(), RouterConfig(api_key=secret)):
        launcher = types.SimpleNamespace(pool=None, model_path="demo", server=types.SimpleNamespace(
            router=types.SimpleNamespace(backend=types.SimpleNamespace(workers=lambda: []), cfg=cfg)))
        announce(launcher, {"grpc": "127.0.0.1:50051", "http": "http://127.0.0.1:8000"})
        err = capsys.readouterr().err
        assert secret not in err
        assert ("--api-key KEY" in err and "Authorization: Bearer KEY" in err) == bool(cfg.api_key), err


def test_a_fixed_scale_the_model_does_not_have_is_refused_at_start():
    """router.fixed_scale above the model's chains: every request would be refused, blaming its scale, while health
    said serving and /v1/models listed the missing scale. It is a config error, before anything starts."""
    with pytest.raises(ValueError, match=r"router.fixed_scale=3: .* has scales 1..2"):
        Launcher(ClusterConfig.from_dict({"router": {"fixed_scale": 3}})).prepare()
    assert Launcher(ClusterConfig.from_dict({"router": {"fixed_scale": 2}, "decode": {"num_blocks": 64}})).prepare()
