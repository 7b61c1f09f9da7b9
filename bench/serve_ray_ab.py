"""Services of ``bench/serve_ray.py`` started one after another with two settings (A B A B ...): one table, one JSON.

Each input is one pass's JSON (``serve_ray.py --passes none --out .../serve_ray_ab_<i>_<a|b>``); the setting is the
last letter of its name. Per service: throughput, goodput, TTFT and TPOT percentiles, GPU busy, and the decode
options that differ between the two settings; per setting: the mean and range of each figure and how many services
met every part of the target (req/s, TTFT p99, TPOT p99, GPU busy).

    python bench/serve_ray_ab.py OUT/serve_ray_ab_*.json --out OUT/serve_ray_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

FIGURES = ("rps", "goodput", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "gpu_busy")


def service_row(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    m = re.search(r"_(\d+)_([ab])\.json$", os.path.basename(path))
    if not m:
        raise SystemExit(f"{path}: expected a name ending in _<n>_<a|b>.json")
    t, meta = d["total"], d.get("meta", {})
    return {"service": int(m.group(1)), "setting": m.group(2), "file": os.path.basename(path),
            "rps": t["throughput_rps"], "goodput": t["goodput_rps"], "ok": t["num_ok"], "requests": t["num_requests"],
            "ttft_p50": t["ttft_ms"]["p50"], "ttft_p99": t["ttft_ms"]["p99"],
            "tpot_p50": t["tpot_ms"]["p50"], "tpot_p99": t["tpot_ms"]["p99"],
            "gpu_busy": meta.get("gpu_busy_percent_mean"), "ready_s": meta.get("ready_s"),
            "decode": (meta.get("serve_config") or {}).get("decode", {}), "device": meta.get("device")}


def meets(r: dict, rps: float, ttft: float, tpot: float, busy: float) -> bool:
    return (r["rps"] >= rps and r["ttft_p99"] <= ttft and r["tpot_p99"] <= tpot
            and r["gpu_busy"] is not None and r["gpu_busy"] >= busy)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="250,200,10,85", help="req/s, TTFT p99 ms, TPOT p99 ms, GPU busy %%")
    args = ap.parse_args()
    rps, ttft, tpot, busy = (float(x) for x in args.target.split(","))
    rows = sorted((service_row(p) for p in args.files), key=lambda r: r["service"])
    if not rows:
        raise SystemExit("no service JSONs")
    keys = set().union(*(r["decode"] for r in rows))
    differ = sorted(k for k in keys if len({json.dumps(r["decode"].get(k)) for r in rows}) > 1)
    settings = {}
    for s in ("a", "b"):
        mine = [r for r in rows if r["setting"] == s]
        if not mine:
            continue
        settings[s] = {"services": len(mine), "decode": {k: mine[0]["decode"].get(k) for k in differ},
                       "meeting_every_target": sum(meets(r, rps, ttft, tpot, busy) for r in mine)}
        for f in FIGURES:
            vals = [r[f] for r in mine if r[f] is not None]
            if vals:
                settings[s][f] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals)}
    out = {"benchmark": "serve_ray_ab", "device": rows[0]["device"], "target": {"rps": rps, "ttft_p99_ms": ttft,
           "tpot_p99_ms": tpot, "gpu_busy_pct": busy}, "differing_decode_options": differ, "services": rows,
           "settings": settings}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("| service | setting | " + " | ".join(differ) + " | req/s | goodput | TTFT p50/p99 ms | TPOT p50/p99 ms "
          "| GPU % | meets |")
    for r in rows:
        print(f"| {r['service']} | {r['setting']} | " + " | ".join(str(r["decode"].get(k)) for k in differ)
              + f" | {r['rps']:.1f} | {r['goodput']:.1f} | {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | "
              f"{r['tpot_p50']:.2f} / {r['tpot_p99']:.2f} | {r['gpu_busy'] if r['gpu_busy'] is None else round(r['gpu_busy'])}"
              f" | {'yes' if meets(r, rps, ttft, tpot, busy) else 'no'} |")
    for s, v in settings.items():
        print(f"setting {s} {v['decode']}: {v['meeting_every_target']}/{v['services']} meet every target; "
              + ", ".join(f"{f} {v[f]['mean']:.2f} ({v[f]['min']:.2f}-{v[f]['max']:.2f})" for f in FIGURES if f in v))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
