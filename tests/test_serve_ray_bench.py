"""``bench/serve_ray.py``: the README's ``colm serve`` started for real (embedded Ray, the bundled demo), loaded once
health says serving, one pass per budget mix, stopped by SIGTERM with exit code 0; each pass's JSON holds every
request's outcome and the run's meta (device, configuration, seconds to ready)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
from colm.deploy.actors import engines_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engines_available(), reason="engine gRPC servers not installed")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve_ray.py"


@pytest.mark.timeout(420)
def test_serve_ray_bench_serves_every_pass_and_stops_the_service(tmp_path):
    out = tmp_path / "sray"
    cmd = [sys.executable, str(BENCH), "--set", "decode.num_blocks=256", "--set", "router.grpc_port=0",
           "--set", "router.http_port=null", "--set", "router.metrics_port=null", "--concurrency", "4",
           "--num-requests", "16", "--output-len", "4,8", "--passes", "none;none=1,scale:1=1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "colm serve exited with 0" in p.stdout
    full, mix = (json.loads(Path(f"{out}{s}.json").read_text()) for s in ("", "_mix"))
    for summary, budgets in ((full, "none"), (mix, "none=1,scale:1=1")):
        t = summary["total"]
        assert t["num_requests"] == t["num_ok"] == 16 and not t["errors"]
        meta = summary["meta"]
        assert meta["budgets"] == budgets and meta["ready_s"] > 0 and meta["serve_config"]["decode"]["num_blocks"] == 256
        assert "device" in meta and "gpu_busy_percent_mean" in meta
        workers = [v for k, v in meta["process_cpu"].items() if k.startswith("WorkerActor")]
        assert "launcher" in meta["process_cpu"] and len(workers) == 2  # the prefill and decode actors
        assert all(v["cores"] >= 0 and v["involuntary_switches_per_s"] >= 0 for v in meta["process_cpu"].values())
        assert sum(v["cores"] for v in workers) > 0  # the workers computed the requests
        in_window = meta["process_cores_in_load_window"]  # the same processes over the load alone
        assert set(in_window) <= set(meta["process_cpu"]) and "launcher" in in_window
        assert sum(v for k, v in in_window.items() if k.startswith("WorkerActor")) > 0
        assert Path(f"{out}{'' if budgets == 'none' else '_mix'}.png").stat().st_size > 0
    assert set(full["rates"][0]["scale_mix"]) == {"2"}  # full scale unless a budget says otherwise
    assert "1" in mix["rates"][0]["scale_mix"]  # scale:1 requests ran at scale 1


def test_serve_ray_bench_refuses_a_bad_override():
    p = subprocess.run([sys.executable, str(BENCH), "--set", "decode.num_blocks"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "--set 'decode.num_blocks': expected KEY=VALUE" in p.stderr
