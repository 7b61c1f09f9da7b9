"""Services of ``bench/serve_ray.py`` started one after another with two settings (A B A B ...): one table, one JSON.

Each input is one pass's JSON (``serve_ray.py --passes none --out DIR/serve_ray_ab_<i>_<a|b>``); files from several
directories are several runs (each a machine's sequence of services, in the order given). Services are grouped by
the decode options that differ between them (the setting), whatever letter a run gave it, so runs in the order
A B A B and B A B A merge. Per service: its run and place in it, throughput, goodput, TTFT and TPOT percentiles,
GPU busy; per setting: the mean and range of each figure and how many services met every part of the target
(req/s, TTFT p99, TPOT p99, GPU busy).

    python bench/serve_ray_ab.py RUN1/serve_ray_ab_*.json RUN2/serve_ray_ab_*.json --out serve_ray_ab.json
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
    return {"run_dir": os.path.dirname(os.path.abspath(path)), "service": int(m.group(1)), "letter": m.group(2),
            "file": os.path.basename(path),
            "rps": t["throughput_rps"], "goodput": t["goodput_rps"], "ok": t["num_ok"], "requests": t["num_requests"],
            "ttft_p50": t["ttft_ms"]["p50"], "ttft_p99": t["ttft_ms"]["p99"],
            "tpot_p50": t["tpot_ms"]["p50"], "tpot_p99": t["tpot_ms"]["p99"],
            "gpu_busy": meta.get("gpu_busy_percent_mean"), "ready_s": meta.get("ready_s"),
            "decode": (meta.get("serve_config") or {}).get("decode", {}), "device": meta.get("device")}


def meets(r: dict, rps: float, ttft: float, tpot: float, busy: float) -> bool:
    return (r["rps"] >= rps and r["ttft_p99"] <= ttft and r["tpot_p99"] <= tpot
            and r["gpu_busy"] is not None and r["gpu_busy"] >= busy)


def plot(rows: list[dict], settings: dict, targets: tuple, path: str) -> None:
    """req/s, TTFT p99 and TPOT p99 of each service in start order, one marker per setting, the targets dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    order = {id(r): i for i, r in enumerate(rows)}
    for (name, _), marker in zip(settings.items(), "os^D"):
        mine = [r for r in rows if r["setting"] == name]
        for ax, key in zip(axes, ("rps", "ttft_p99", "tpot_p99")):
            ax.plot([order[id(r)] + 1 for r in mine], [r[key] for r in mine], marker, ls="", ms=8, label=name)
    for ax, title, target in zip(axes, ("req/s (higher is better)", "TTFT p99 ms", "TPOT p99 ms"), targets):
        ax.axhline(target, ls="--", c="grey", lw=1)
        ax.set_title(title)
        ax.set_xlabel("service, in start order (runs one after another)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"colm serve on Ray, {rows[0]['device']}: services alternating two settings", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True, help="the JSON; a PNG of the services' figures beside it")
    ap.add_argument("--target", default="250,200,10,85", help="req/s, TTFT p99 ms, TPOT p99 ms, GPU busy %%")
    args = ap.parse_args()
    rps, ttft, tpot, busy = (float(x) for x in args.target.split(","))
    rows = [service_row(p) for p in args.files]
    if not rows:
        raise SystemExit("no service JSONs")
    runs = list(dict.fromkeys(r["run_dir"] for r in rows))  # in the order given
    for r in rows:
        r["run"] = runs.index(r.pop("run_dir")) + 1
    rows.sort(key=lambda r: (r["run"], r["service"]))
    keys = set().union(*(r["decode"] for r in rows))
    differ = sorted(k for k in keys if len({json.dumps(r["decode"].get(k)) for r in rows}) > 1)
    for r in rows:
        r["setting"] = ", ".join(f"{k}={r['decode'].get(k)}" for k in differ) or "-"
    settings = {}
    for s in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == s]
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
    print("| run | service | " + " | ".join(differ) + " | req/s | goodput | TTFT p50/p99 ms | TPOT p50/p99 ms "
          "| GPU % | meets |")
    for r in rows:
        print(f"| {r['run']} | {r['service']} | " + " | ".join(str(r["decode"].get(k)) for k in differ)
              + f" | {r['rps']:.1f} | {r['goodput']:.1f} | {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | "
              f"{r['tpot_p50']:.2f} / {r['tpot_p99']:.2f} | {r['gpu_busy'] if r['gpu_busy'] is None else round(r['gpu_busy'])}"
              f" | {'yes' if meets(r, rps, ttft, tpot, busy) else 'no'} |")
    for s, v in settings.items():
        print(f"{s}: {v['meeting_every_target']}/{v['services']} meet every target; "
              + ", ".join(f"{f} {v[f]['mean']:.2f} ({v[f]['min']:.2f}-{v[f]['max']:.2f})" for f in FIGURES if f in v))
    plot(rows, settings, (rps, ttft, tpot), os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and its .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
