"""Garbage-collector pauses of ``colm serve``'s processes under load, with the start-up heap unfrozen and frozen.

Each run starts the README's ``colm serve --config`` (embedded Ray) with ``COLM_GC_FREEZE`` 0 or 1, waits until it
serves, runs one closed-loop ``colm loadtest`` pass against it, then reads every process's
``colm_<role>_gc_pause_seconds`` / ``colm_<role>_gc_pause_max_seconds`` (colm/gc_pauses.py) from the routers'
metrics ports (the launcher's router re-serves the workers') and stops it. Runs alternate (off, on, on, off, ... with
``--repeats``), so a drift of the machine falls on both. Writes ``--out`` JSON (every run: the load's summary, per
process and generation the collections, their seconds and the longest) and prints the side by side, with the
ratios frozen / unfrozen of the total and the longest pause per process and of TPOT p99.

    python bench/gc_pauses.py --concurrency 8 --num-requests 200 --out bench/results/gc_pauses_cpu.json   # demo model
    python bench/gc_pauses.py --set model.preset=llama-3.2-1b-16-16-air --set model.dtype=bfloat16 \\
        --set decode.num_blocks=0 --set decode.warmup_context=2200 --set decode.max_batch_size=160 \\
        --set router.replicas=auto --concurrency 160 --ramp-s 2 --num-requests 6000 --processes 8 --connections 8 \\
        --prompt-len 512,2048 --output-len 32,96 --out $OUT/gc_pauses_h200.json                        # one GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import urllib.request

import yaml
from prometheus_client.parser import text_string_to_metric_families

from _service import ColmServe
from serve_ray import device_name, serve_config
from colm.commands.loadtest import add_load_options, load_spec
from colm.loadtest import run as run_load, table


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 free now (the routers' metrics ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            held = []
            for i in range(n):
                t = socket.socket()
                held.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError(f"no block of {n} free ports found")


def scrape(port: int, replicas: int) -> dict:
    """{process label: {generation: {"count", "sum_s", "max_s", "buckets": {le: cumulative count}}}} from every
    router's metrics port (``max_s``: the longest pause in the process's life so far)."""
    out: dict[str, dict] = {}
    for i in range(replicas):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port + i}/metrics", timeout=30) as r:
                text = r.read().decode()
        except OSError as e:
            out[f"router{i}"] = {"error": str(e)}
            continue
        for fam in text_string_to_metric_families(text):
            if not fam.name.endswith("_gc_pause_seconds") and not fam.name.endswith("_gc_pause_max_seconds"):
                continue
            role = fam.name.removeprefix("colm_").split("_gc_pause")[0]
            for s in fam.samples:
                labels = dict(s.labels)
                who = f"router{i}" if role == "router" else f"{role} {labels.get('worker', '?')}"
                gen = out.setdefault(who, {}).setdefault(labels["generation"], {})
                if s.name.endswith("_bucket"):
                    gen.setdefault("buckets", {})[labels["le"]] = int(s.value)
                elif s.name.endswith("_count"):
                    gen["count"] = int(s.value)
                elif s.name.endswith("_sum"):
                    gen["sum_s"] = s.value
                elif s.name.endswith("_max_seconds"):
                    gen["max_s"] = s.value
    return out


def during(before: dict, after: dict) -> dict:
    """The pass's own pauses: ``after`` less ``before`` per process and generation (counts, seconds, buckets); the
    longest pause of the pass is bounded by its highest non-empty bucket (``max_le_s``)."""
    out = {}
    for who, gens in after.items():
        if "error" in gens:
            out[who] = gens
            continue
        for g, a in gens.items():
            b = before.get(who, {}).get(g, {})
            buckets = {le: n - b.get("buckets", {}).get(le, 0) for le, n in a.get("buckets", {}).items()}
            lowest_full = min((float(le) for le, n in buckets.items() if n == buckets.get("+Inf", 0) and n > 0),
                              default=0.0)
            out.setdefault(who, {})[g] = {"count": a.get("count", 0) - b.get("count", 0),
                                          "sum_s": a.get("sum_s", 0.0) - b.get("sum_s", 0.0),
                                          "max_le_s": lowest_full}
    return out


def totals(gc: dict) -> dict:
    """Per process: collections, seconds paused and the bound on the longest pause over all generations."""
    out = {}
    for who, gens in gc.items():
        if "error" in gens:
            continue
        out[who] = {"count": sum(g.get("count", 0) for g in gens.values()),
                    "sum_s": sum(g.get("sum_s", 0.0) for g in gens.values()),
                    "max_s": max((g.get("max_le_s", 0.0) for g in gens.values()), default=0.0),
                    "full_collections": gens.get("2", {}).get("count", 0)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="base serve.yaml (default: the bundled deploy/serve.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, dotted")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs (off/on, then on/off, ...)")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    add_load_options(ap)
    ap.set_defaults(concurrency=8, timeout_s=120.0)
    ap.add_argument("--out", default="gc_pauses.json")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: at least 1")

    cfg = serve_config(args.config, args.set)
    from colm.deploy.config import ClusterConfig

    replicas = ClusterConfig.from_dict(cfg).router.replicas
    order = []
    for r in range(args.repeats):
        order += [False, True] if r % 2 == 0 else [True, False]
    runs = []
    for freeze in order:
        port = free_port_block(replicas)
        run_cfg = json.loads(json.dumps(cfg))
        run_cfg.setdefault("router", {})["metrics_port"] = port
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(run_cfg, f)
        service = ColmServe(f.name, env={"COLM_GC_FREEZE": "1" if freeze else "0"})
        try:
            try:
                service.wait_ready(args.ready_timeout_s)
            except (RuntimeError, TimeoutError) as e:
                raise SystemExit(str(e)) from None
            spec = load_spec(args, "none", warmup_requests=args.warmup_requests)
            before = scrape(port, replicas)
            summary = run_load(service.addr, spec, None, None, progress=False)
            life = scrape(port, replicas)
            gc = during(before, life)
        finally:
            service.stop()
            os.unlink(f.name)
        agg = summary["total"]
        runs.append({"gc_freeze": freeze, "ready_s": round(service.ready_s or 0.0, 1), "gc": gc, "gc_life": life,
                     "gc_totals": totals(gc), "load": {k: agg[k] for k in (
                         "num_requests", "num_ok", "throughput_rps", "goodput_rps", "ttft_ms", "tpot_ms", "itl_ms",
                         "e2e_ms", "errors")}})
        with open(args.out, "w") as fh:  # each run as soon as it exists (a call cut short keeps what it finished)
            json.dump({"meta": {"device": device_name(), "partial": True}, "runs": runs}, fh, indent=2, default=str)
        print(f"[gc_pauses] COLM_GC_FREEZE={int(freeze)}", flush=True)
        print(table(summary), flush=True)
        for who, t in runs[-1]["gc_totals"].items():
            print(f"  {who:40s} {t['count']:7d} collections ({t['full_collections']} full), "
                  f"{t['sum_s'] * 1e3:9.1f} ms paused, longest <= {t['max_s'] * 1e3:g} ms", flush=True)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    side = {}
    for freeze in (False, True):
        rs = [r for r in runs if r["gc_freeze"] == freeze]
        procs = sorted({w for r in rs for w in r["gc_totals"]})
        side["frozen" if freeze else "unfrozen"] = {
            "tpot_p99_ms": mean([r["load"]["tpot_ms"]["p99"] for r in rs]),
            "itl_p99_ms": mean([r["load"]["itl_ms"]["p99"] for r in rs]),
            "throughput_rps": mean([r["load"]["throughput_rps"] for r in rs]),
            "gc_paused_ms": {w: mean([r["gc_totals"][w]["sum_s"] * 1e3 for r in rs if w in r["gc_totals"]])
                             for w in procs},
            "gc_longest_ms": {w: max(r["gc_totals"].get(w, {}).get("max_s", 0.0) * 1e3 for r in rs) for w in procs}}
    by_role = {}
    for key in ("gc_paused_ms", "gc_longest_ms"):
        for state in ("unfrozen", "frozen"):
            for w, v in side[state][key].items():
                role = w.split()[0].rstrip("0123456789")
                slot = by_role.setdefault(role, {}).setdefault(key, {}).setdefault(state, 0.0)
                by_role[role][key][state] = max(slot, v or 0.0) if key == "gc_longest_ms" else slot + (v or 0.0)
    ratios = {role: {key: (v["frozen"] / v["unfrozen"] if v.get("unfrozen") else None) for key, v in d.items()}
              for role, d in by_role.items()}
    un, fr = side["unfrozen"], side["frozen"]
    report = {
        "meta": {"device": device_name(), "host": platform.node(), "cpus": os.cpu_count(),
                 "python": sys.version.split()[0], "date": datetime.date.today().isoformat(),
                 "serve_config": cfg, "load": vars(args) | {"set": args.set},
                 "note": "each run: colm serve started with COLM_GC_FREEZE 0 or 1, every process's gc pause histograms "
                         "read from the routers' metrics before and after one closed-loop pass; 'gc' and the sums "
                         "are the pass's own pauses (after less before), the longest a bucket bound (max_le_s: the "
                         "lowest bucket holding every pause of the pass); 'gc_life' is the processes' whole life "
                         "with the exact longest pause (max_s), start-up and the freeze's own collection included"},
        "runs": runs, "side_by_side": side, "by_role": by_role, "ratio_frozen_over_unfrozen": ratios,
        "tpot_p99_ratio": (fr["tpot_p99_ms"] / un["tpot_p99_ms"]) if un["tpot_p99_ms"] and fr["tpot_p99_ms"] else None}
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    print("\n| role | paused ms unfrozen | frozen | ratio | longest ms unfrozen | frozen | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for role, d in by_role.items():
        p, m = d.get("gc_paused_ms", {}), d.get("gc_longest_ms", {})
        r = ratios[role]
        f = (lambda x: "-" if x is None else f"{x:.2f}")
        print(f"| {role} | {f(p.get('unfrozen'))} | {f(p.get('frozen'))} | {f(r.get('gc_paused_ms'))} | "
              f"{f(m.get('unfrozen'))} | {f(m.get('frozen'))} | {f(r.get('gc_longest_ms'))} |")
    print(f"TPOT p99 unfrozen {un['tpot_p99_ms']} ms, frozen {fr['tpot_p99_ms']} ms; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
