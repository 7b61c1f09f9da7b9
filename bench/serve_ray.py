"""The README's ``colm serve`` on Ray under closed-loop load, as a user runs it, in one command.

Starts ``colm serve --config`` (embedded Ray) as a child process with the given YAML and ``--set`` overrides, waits
until its health says serving with every worker healthy (the load starts only then: clients that connect to the
launcher's router before its replicas listen all land on one router), runs one ``colm loadtest`` pass per budget
mix against it, and stops it with SIGTERM. The first pass writes ``PREFIX.json`` / ``.png`` (``colm loadtest``'s
summary), the second ``PREFIX_mix``, a later one ``PREFIX_mixN``; each with ``meta``: the device, the serve
configuration, seconds to ready, and the GPU's busy percentage (``nvidia-smi`` sampled every second during the pass,
mean; None without a GPU). Where the figures in docs/results.md came from: the command below on one H200.

    python bench/serve_ray.py --set model.preset=llama-3.2-1b-16-16-air --set model.dtype=bfloat16 \\
        --set decode.num_blocks=0 --set decode.warmup_context=2200 --set decode.max_batch_size=160 \\
        --set router.replicas=auto --concurrency 160 --ramp-s 2 --num-requests 6000 --warmup-requests 64 \\
        --processes 8 --connections 8 --prompt-len 512,2048 --output-len 32,96 \\
        --slo-ttft-ms 200 --slo-tpot-ms 10 --passes 'none;none=1,tpot:4=1,ttft:100=1' --out $OUT/serve_ray_h200_1b_air_c160
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

import yaml

import _proc_stats
import _pyspy
from _gpu_busy import GpuSampler
from _service import ColmServe
from colm.commands.loadtest import add_load_options, load_spec
from colm.loadtest import load_window, plot, run as run_load, table


def cpu_list(text: str) -> set[int]:
    """"0-9,12" -> {0, ..., 9, 12}: the CPUs a process may run on (``os.sched_setaffinity``)."""
    cpus = set()
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r}: expected CPU numbers and ranges, e.g. 0-9,12")
        cpus.update(range(int(a), int(b or a) + 1))
    if not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"{text!r}: CPUs {sorted(cpus - os.sched_getaffinity(0))} are not available "
                                         f"here (this process may run on {sorted(os.sched_getaffinity(0))})")
    return cpus


def set_key(d: dict, dotted: str, text: str) -> None:
    """``d[a][b] = value`` for ``dotted`` "a.b" (the value parsed as YAML: numbers, booleans, null, lists)."""
    *path, last = dotted.split(".")
    for key in path:
        if not isinstance(d.get(key), dict):  # absent, or null in the YAML
            d[key] = {}
        d = d[key]
    d[last] = yaml.safe_load(text)


def serve_config(base: str | None, sets: list[str]) -> dict:
    from colm.deploy.config import ClusterConfig, bundled_serve_yaml

    with open(base or bundled_serve_yaml()) as f:
        d = yaml.safe_load(f) or {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (e.g. model.preset=tiny-air)")
        set_key(d, key.strip(), value)
    ClusterConfig.from_dict(d)  # a bad key or value stops here, with the config's own message
    return d


def device_name() -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="base serve.yaml (default: the bundled deploy/serve.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (repeatable): --set router.replicas=auto")
    ap.add_argument("--passes", default="none", help="budget mixes, one load pass each, separated by ';' "
                    "(colm loadtest --budgets syntax): 'none;none=1,tpot:4=1,ttft:100=1'")
    add_load_options(ap)  # colm loadtest's: clients, lengths, SLO, warm-up, client processes, ramp
    ap.set_defaults(concurrency=16, timeout_s=120.0)  # a closed loop (at least 1 client)
    ap.add_argument("--ready-timeout-s", type=float, default=600.0, help="for colm serve to start and serve")
    ap.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS",
                    help="sample the launcher's and every Ray actor's Python (py-spy, GIL holder) for this long during "
                         "the first pass, starting --py-spy-delay s into it; the summary goes into the pass's meta")
    ap.add_argument("--py-spy-delay", type=float, default=5.0)
    ap.add_argument("--service-cpus", type=cpu_list, default=None, metavar="LIST",
                    help="CPUs for colm serve and its Ray processes (e.g. 0-9); the load generator then runs on "
                         "--client-cpus, so clients and service do not share cores (default: no pinning)")
    ap.add_argument("--client-cpus", type=cpu_list, default=None, metavar="LIST")
    ap.add_argument("--out", default="serve_ray", help="output prefix: PREFIX.json, PREFIX_mix.json, ...")
    args = ap.parse_args()

    if args.py_spy > 0 and not _pyspy.available():
        raise SystemExit("--py-spy: the py-spy executable is not on PATH (pip install py-spy)")
    if args.concurrency < 1:
        raise SystemExit(f"--concurrency {args.concurrency}: a closed loop needs at least 1 client")
    cfg = serve_config(args.config, args.set)
    api_key = (cfg.get("router") or {}).get("api_key")
    if isinstance(api_key, str) and api_key.startswith("env:"):
        api_key = os.environ.get(api_key[4:])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    service = ColmServe(f.name, cpus=args.service_cpus)
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)  # the load's client processes inherit it
    gpu = GpuSampler(interval_ms=1000)
    wrote = []
    try:
        try:
            health = service.wait_ready(args.ready_timeout_s, api_key)
        except (RuntimeError, TimeoutError) as e:
            raise SystemExit(str(e)) from None
        addr, ready_s = service.addr, service.ready_s
        print(f"[serve_ray] serving at {addr} after {ready_s:.0f} s: "
              f"{', '.join(w['worker_id'] for w in health['workers'])}", flush=True)
        for i, budgets in enumerate(p.strip() for p in args.passes.split(";")):
            spec = load_spec(args, budgets, warmup_requests=args.warmup_requests if i == 0 else 0)
            prefix = args.out if i == 0 else f"{args.out}_mix" if i == 1 else f"{args.out}_mix{i}"
            since = gpu.mark()
            procs = _pyspy.service_processes(service.proc.pid)
            before = _proc_stats.snapshot(procs)
            cpu_sampler = _proc_stats.CpuSampler(procs)  # cores per process over the load window, found afterwards
            spy = _pyspy.Profile(procs, args.py_spy, args.py_spy_delay, prefix + "_pyspy") \
                if i == 0 and args.py_spy > 0 else None
            summary = run_load(addr, spec, None, None, api_key=api_key, progress=False)
            busy_run, clocks = gpu.mean_since(since), gpu.clocks_since(since)
            # over the measured load only: not the health check, the client processes' start or their warm-up
            window = load_window(summary)
            busy = gpu.mean_between(*window) if window else busy_run
            cpu = _proc_stats.delta(before, _proc_stats.snapshot(procs))
            cpu_sampler.stop()
            cores_window = cpu_sampler.cores_between(*window) if window else {}
            summary["meta"] = {"addr": addr, "device": device_name(), "date": datetime.date.today().isoformat(),
                               "budgets": budgets, "serve_config": cfg, "ready_s": round(ready_s, 1),
                               "launched_by": "colm serve --config (embedded Ray); load started once health said "
                                              "serving with every worker healthy",
                               "gpu_busy_percent_mean": busy,
                               "gpu_busy_percent_mean_whole_pass": busy_run,
                               "service_cpus": sorted(args.service_cpus or []),
                               "client_cpus": sorted(args.client_cpus or []),
                               "gpu_busy_note": "nvidia-smi utilization.gpu sampled each second, mean over the "
                                                "measured load (first send to last answer; _whole_pass: also the "
                                                "client processes' start and warm-up)",
                               "gpu_clocks": clocks,
                               "process_cpu": cpu,
                               "process_cpu_note": "per service process over the pass, from /proc (all threads): "
                                                   "CPU cores used, context switches per second (involuntary: "
                                                   "preempted while runnable)",
                               "process_cores_in_load_window": {k: round(v, 3) for k, v in cores_window.items()}}
            if spy is not None:
                summary["meta"]["py_spy"] = {
                    "processes": spy.result(),
                    "note": "py-spy record --gil --nonblocking: samples of the GIL-holding thread; gil_busy_share = "
                            "samples / (rate x seconds); top_self / top_inclusive: shares of the samples"}
                for label, s in summary["meta"]["py_spy"].get("processes", {}).items():
                    print(f"[serve_ray] py-spy {label}: GIL busy {s.get('gil_busy_share')}, top self "
                          f"{s.get('top_self', [])[:4] or s.get('error')}", flush=True)
            with open(prefix + ".json", "w") as fh:
                json.dump(summary, fh, indent=2)
            plot(summary, prefix + ".png")
            wrote.append(prefix + ".json")
            print(f"[serve_ray] pass {i} (budgets {budgets}), GPU busy {busy if busy is not None else '-'} %; "
                  + ", ".join(f"{k} {cores_window.get(k, v['cores']):.2f} cores "
                              f"{v['involuntary_switches_per_s']:.0f} preempt/s" for k, v in cpu.items()), flush=True)
            print(table(summary), flush=True)
    finally:
        gpu.stop()
        rc = service.stop()
        os.unlink(f.name)
    print(f"[serve_ray] colm serve exited with {rc}; wrote {', '.join(wrote)}")
    return 0 if wrote else 1


if __name__ == "__main__":
    sys.exit(main())
