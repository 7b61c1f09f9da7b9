"""bench/goodput_rescore.py re-scores a load test's per-request records at another SLO."""

import importlib.util
import os

spec = importlib.util.spec_from_file_location(
    "goodput_rescore", os.path.join(os.path.dirname(__file__), "..", "bench", "goodput_rescore.py"))
rescore_mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rescore_mod)


def test_rescore_counts_requests_meeting_both_limits_per_rate():
    fields = ["rate", "budget", "status", "scale", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2e_ms",
              "retries"]
    rows = [[2.0, "none", "OK", 1, 10, 5, 50.0, 3.0, 70.0, 0],     # good at both SLOs
            [2.0, "none", "OK", 1, 10, 5, 80.0, 3.0, 99.0, 0],     # TTFT only under the loose SLO
            [2.0, "none", "UNAVAILABLE", 0, 10, 0, 0.0, 0.0, 5.0, 0],  # failed: never good
            [4.0, "none", "OK", 2, 10, 5, 10.0, 5.0, 40.0, 0]]     # TPOT over both
    run = {"requests": {"fields": fields, "rows": rows},
           "rates": [{"rate": 2.0, "num_requests": 3, "num_ok": 2, "throughput_rps": 1.5},
                     {"rate": 4.0, "num_requests": 1, "num_ok": 1, "throughput_rps": 2.0}]}
    loose = rescore_mod.rescore(run, {"ttft_ms": 90.0, "tpot_ms": 4.0})
    tight = rescore_mod.rescore(run, {"ttft_ms": 60.0, "tpot_ms": 4.0})
    assert (loose[2.0]["good"], loose[2.0]["ok"], tight[2.0]["good"]) == (2, 2, 1)
    # the wall time is num_ok / throughput_rps (2 / 1.5 s): the throughput counts the OK requests only
    assert loose[2.0]["goodput_rps"] == 2 / (2 / 1.5) and tight[2.0]["goodput_rps"] == 1 / (2 / 1.5)
    assert loose[4.0]["good"] == 0 and loose[4.0]["goodput_rps"] == 0.0


def test_a_rate_given_twice_is_scored_as_two_runs():
    fields = ["rate", "budget", "status", "scale", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2e_ms",
              "retries", "run"]
    rows = [[4.0, "none", "OK", 1, 10, 5, 50.0, 3.0, 70.0, 0, 0],
            [4.0, "none", "OK", 1, 10, 5, 50.0, 3.0, 70.0, 0, 1],
            [4.0, "none", "OK", 1, 10, 5, 500.0, 3.0, 70.0, 0, 1]]
    run = {"requests": {"fields": fields, "rows": rows},
           "rates": [{"rate": 4.0, "run": 0, "num_requests": 1, "num_ok": 1, "throughput_rps": 1.0},
                     {"rate": 4.0, "run": 1, "num_requests": 2, "num_ok": 2, "throughput_rps": 2.0}]}
    got = rescore_mod.rescore(run, {"ttft_ms": 100.0, "tpot_ms": 4.0})
    assert got["4 (run 0)"]["good"] == 1 and got["4 (run 0)"]["goodput_rps"] == 1.0
    assert (got["4 (run 1)"]["good"], got["4 (run 1)"]["ok"], got["4 (run 1)"]["goodput_rps"]) == (1, 2, 1.0)
