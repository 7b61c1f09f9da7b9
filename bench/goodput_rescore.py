"""Goodput of two load-test runs at one SLO: re-scores each run's per-request records.

``colm loadtest`` keeps every request's TTFT and TPOT, so runs made at different SLOs (or on
different occasions) can be compared at the same SLO afterwards. For each SLO given (by default
each run's own), prints and writes per-rate goodput = requests meeting it / the rate's wall time.

    python bench/goodput_rescore.py A.json B.json --out bench/results/NAME.json
"""

from __future__ import annotations

import argparse
import json


def rescore(run: dict, slo: dict) -> dict[float, dict]:
    fields = run["requests"]["fields"]
    col = {k: i for i, k in enumerate(fields)}
    rows = run["requests"]["rows"]
    out = {}
    by_run = "run" in col and all("run" in r for r in run["rates"])  # a rate given twice is two runs (newer files)
    repeated = len({r["rate"] for r in run["rates"]}) < len(run["rates"])
    for r in run["rates"]:
        ok = [x for x in rows if (x[col["run"]] == r["run"] if by_run else x[col["rate"]] == r["rate"])
              and x[col["status"]] == "OK"]
        good = sum(1 for x in ok if x[col["ttft_ms"]] <= slo["ttft_ms"] and x[col["tpot_ms"]] <= slo["tpot_ms"])
        # throughput_rps is the OK requests over the run's wall time (colm.loadtest.summarize), so the wall time is
        # num_ok / throughput_rps; num_requests (failed ones included) overstated it whenever a request failed
        wall_s = r["num_ok"] / r["throughput_rps"] if r["throughput_rps"] else None
        key = f"{r['rate']:g} (run {r['run']})" if by_run and repeated else r["rate"]
        out[key] = {"good": good, "ok": len(ok), "num_requests": r["num_requests"],
                    "goodput_rps": good / wall_s if wall_s else 0.0}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="load-test JSONs (colm loadtest / serve_goodput PREFIX_MODE.json)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = {p: json.load(open(p)) for p in args.runs}
    slos = {f"slo_of:{p}": r["slo"] for p, r in runs.items() if "slo" in r}
    result = {"slos": slos, "goodput": {}}
    for name, slo in slos.items():
        result["goodput"][name] = {p: rescore(r, slo) for p, r in runs.items()}
        print(f"SLO TTFT {slo['ttft_ms']:.1f} ms, TPOT {slo['tpot_ms']:.2f} ms ({name})")
        for p, per_rate in result["goodput"][name].items():
            best = max(v["goodput_rps"] for v in per_rate.values())
            cells = "  ".join(f"{rate if isinstance(rate, str) else format(rate, 'g')}: {v['goodput_rps']:.2f}"
                          for rate, v in per_rate.items())
            print(f"  {p}: {cells}  (max {best:.2f} req/s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
