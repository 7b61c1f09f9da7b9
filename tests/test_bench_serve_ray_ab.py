"""bench/serve_ray_ab.py: services from two runs (A B A B with A = on, then with A = off) merge by the decode options
that differ, whatever letter each run gave them; each setting counts the services that met every target."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "serve_ray_ab.py"


def _service(path: Path, decode: dict, rps: float, tpot_p99: float, ttft_p99: float = 80.0, busy: float = 92.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "total": {"throughput_rps": rps, "goodput_rps": rps - 5, "num_ok": 100, "num_requests": 100,
                  "ttft_ms": {"p50": 30.0, "p99": ttft_p99}, "tpot_ms": {"p50": 8.0, "p99": tpot_p99}},
        "meta": {"gpu_busy_percent_mean": busy, "ready_s": 60.0, "device": "test GPU",
                 "serve_config": {"decode": {"block_size": 16, **decode}}}}))


def test_runs_in_either_order_merge_by_their_differing_options(tmp_path):
    on, off = {"tpot_target_ms": 9}, {}
    r1, r2 = tmp_path / "run1", tmp_path / "run2"
    _service(r1 / "serve_ray_ab_1_a.json", on, 260.0, 9.5)             # meets every target
    _service(r1 / "serve_ray_ab_2_b.json", off, 255.0, 10.4)           # TPOT p99 over 10
    _service(r2 / "serve_ray_ab_1_a.json", off, 252.0, 9.9)            # meets
    _service(r2 / "serve_ray_ab_2_b.json", on, 240.0, 9.4)             # req/s under 250
    out = tmp_path / "ab.json"
    files = sorted(map(str, r1.glob("*.json"))) + sorted(map(str, r2.glob("*.json")))
    proc = subprocess.run([sys.executable, str(SCRIPT), *files, "--out", str(out)], capture_output=True, text=True,
                          check=True)
    d = json.loads(out.read_text())
    assert d["differing_decode_options"] == ["tpot_target_ms"]
    assert [(s["run"], s["service"], s["setting"]) for s in d["services"]] == [
        (1, 1, "tpot_target_ms=9"), (1, 2, "tpot_target_ms=None"), (2, 1, "tpot_target_ms=None"),
        (2, 2, "tpot_target_ms=9")]
    on_s, off_s = d["settings"]["tpot_target_ms=9"], d["settings"]["tpot_target_ms=None"]
    assert on_s["services"] == off_s["services"] == 2
    assert on_s["meeting_every_target"] == 1 and off_s["meeting_every_target"] == 1
    assert on_s["tpot_p99"] == pytest.approx({"mean": 9.45, "min": 9.4, "max": 9.5})
    assert off_s["rps"]["min"] == 252.0
    assert (tmp_path / "ab.png").stat().st_size > 0
    assert "| 2 | 2 | 9 | 240.0 |" in proc.stdout


def test_a_name_without_its_place_and_letter_is_refused(tmp_path):
    _service(tmp_path / "serve_ray_x.json", {}, 250.0, 9.0)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "serve_ray_x.json"), "--out",
                           str(tmp_path / "o.json")], capture_output=True, text=True)
    assert proc.returncode != 0 and "_<n>_<a|b>.json" in proc.stderr
