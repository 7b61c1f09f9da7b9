"""`colm loadtest`'s report and guards: a rate given twice is two runs with their own rows and wall times, rates
and the timeout must be finite and positive, an unreachable service or an unwritable output is refused before any
load is sent, and a run where no request succeeded exits non-zero."""

import json
import math
import socket
import time

import pytest

from colm.cli import main
from colm.loadtest import LoadSpec, run
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter

SHORT = ["--prompt-len", "4,6", "--output-len", "2,3"]


@pytest.fixture(scope="module")
def served():
    """(router, its BackgroundRouter) serving tiny-air in-process, two requests at a time."""
    cfg = preset("tiny-air")
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05), cfg, ByteTokenizer(),
                    LocalBackend(CoLM(cfg).reset_parameters(seed=0).eval(), max_concurrency=2))
    bg = BackgroundRouter(router)
    yield router, bg
    bg.stop()


def _requests_seen(router) -> float:
    """Requests the router has finished, whatever their outcome."""
    return sum(x.value for m in router.metrics.registry.collect() for x in m.samples
               if x.name == "colm_requests_total")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rate_given_twice_is_two_runs_with_their_own_wall_times(served, tmp_path):
    _, bg = served
    spec = LoadSpec(rates=(20.0, 20.0), num_requests=12, prompt_len=(4, 6), output_len=(2, 3))
    summary = run(bg.grpc_addr, spec, str(tmp_path / "d.json"), str(tmp_path / "d.png"), progress=False)
    rows = summary["rates"]
    assert [(e["rate"], e["run"], e["num_requests"]) for e in rows] == [(20.0, 0, 6), (20.0, 1, 6)]
    t = summary["total"]
    assert t["num_ok"] == 12
    # the runs' wall times add up to no more than the whole run's, so no throughput exceeds what the run allows
    walls = [e["num_ok"] / e["throughput_rps"] for e in rows]
    assert sum(walls) <= summary["wall_s"]
    assert t["throughput_rps"] == pytest.approx(t["num_ok"] / sum(walls))
    data = json.loads((tmp_path / "d.json").read_text())
    assert [row[data["requests"]["fields"].index("run")] for row in data["requests"]["rows"]].count(1) == 6
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("field, value", [("rates", (math.nan,)), ("rates", (math.inf,)), ("rates", (4.0, math.nan)),
                                          ("timeout_s", 0.0), ("timeout_s", -1.0), ("timeout_s", math.nan),
                                          ("slo_ttft_ms", math.nan), ("budgets", (("none", math.nan),))])
def test_rates_and_timeout_must_be_finite_and_positive(field, value):
    with pytest.raises(ValueError, match=field if field != "budgets" else "weight nan"):
        LoadSpec(**{field: value})


@pytest.mark.parametrize("flags, err", [(["--rates", "nan"], "rates=(nan,)"), (["--rates", "inf"], "rates=(inf,)"),
                                        (["--rates", "4,x"], "--rates '4,x'"),
                                        (["--concurrency", "2", "--timeout-s", "-1"], "timeout_s=-1.0"),
                                        (["--concurrency", "2", "--timeout-s", "0"], "timeout_s=0.0")])
def test_the_command_refuses_bad_rates_and_timeouts(tmp_path, capsys, flags, err):
    out = tmp_path / "x"
    assert main(["loadtest", "--addr", f"127.0.0.1:{_closed_port()}", "--num-requests", "4", *flags,
                 "--out", str(out)]) == 2
    assert err in capsys.readouterr().err
    assert not out.with_suffix(".json").exists()


def test_an_unreachable_service_is_refused_before_the_load(tmp_path, capsys):
    addr = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="does not answer a health check"):
        run(addr, LoadSpec(concurrency=2, num_requests=4), str(tmp_path / "u.json"), None, progress=False)
    assert main(["loadtest", "--addr", addr, "--concurrency", "2", "--num-requests", "4",
                 "--out", str(tmp_path / "u")]) == 2
    assert f"addr={addr}" in capsys.readouterr().err
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "u.json").exists()


def test_no_request_succeeding_exits_nonzero_with_a_summary(served, tmp_path, capsys):
    """Every request asks for a scale the model does not have: each fails, and the command says so and fails."""
    _, bg = served
    out = tmp_path / "fail"
    assert main(["loadtest", "--addr", bg.grpc_addr, "--concurrency", "2", "--num-requests", "4", "--budgets",
                 "scale:9", *SHORT, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no request succeeded: 0/4 ok" in err and "INVALID_ARGUMENT" in err
    assert json.loads(out.with_suffix(".json").read_text())["total"]["num_ok"] == 0  # the report is still written


def test_the_output_directory_is_made_or_refused_before_the_load(served, tmp_path, capsys):
    router, bg = served
    out = tmp_path / "new" / "dir" / "lt"
    assert main(["loadtest", "--addr", bg.grpc_addr, "--concurrency", "2", "--num-requests", "2", *SHORT,
                 "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["total"]["num_ok"] == 2
    assert out.with_suffix(".png").is_file()
    (tmp_path / "afile").write_text("")
    before = _requests_seen(router)
    assert before >= 2  # the run above was counted
    assert main(["loadtest", "--addr", bg.grpc_addr, "--concurrency", "2", "--num-requests", "2", *SHORT,
                 "--out", str(tmp_path / "afile" / "lt")]) == 2
    assert "cannot create its directory" in capsys.readouterr().err
    assert _requests_seen(router) == before  # nothing was sent


def test_a_load_longer_than_the_models_context_is_refused_before_it_is_sent(served, tmp_path, capsys):
    """tiny-air's context is 512 tokens: a shared prefix of 500 with prompts up to 6 and outputs up to 10 could not be
    served (every request would be INVALID_ARGUMENT); the command says why and sends nothing."""
    router, bg = served
    before = _requests_seen(router)
    out = tmp_path / "long"
    assert main(["loadtest", "--addr", bg.grpc_addr, "--concurrency", "2", "--num-requests", "4", "--prefix-len",
                 "500", "--prompt-len", "4,6", "--output-len", "2,10", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "= 516 tokens exceeds the served model's context of 512 tokens; no load was sent" in err, err
    assert _requests_seen(router) == before and not out.with_suffix(".json").exists()
    # at the context exactly, the load runs
    assert main(["loadtest", "--addr", bg.grpc_addr, "--concurrency", "2", "--num-requests", "2", "--prefix-len",
                 "496", "--prompt-len", "4,6", "--output-len", "2,10", "--out", str(out)]) == 0
