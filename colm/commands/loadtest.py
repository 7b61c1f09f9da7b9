"""``colm loadtest``: open-loop (Poisson) or closed-loop load test of a running service.

Exits 1, after writing its report, when no request succeeded (an unreachable address or a bad API key is refused
before any load is sent; see ``colm.loadtest.run``)."""

from __future__ import annotations

import sys

from colm.commands.common import API_KEY_HELP, api_key


def register(sub) -> None:
    p = sub.add_parser("loadtest", help="load-test a colm service: latency/goodput per rate and scale, JSON + PNG")
    p.add_argument("--addr", default="127.0.0.1:50051", help="router gRPC address")
    p.add_argument("--rates", default="2,4,8",
                   help="comma-separated request rates (req/s, finite, > 0), open loop: one run and row each")
    p.add_argument("--budgets", default="none",
                   help="weighted budget mix, e.g. 'none=1,tpot:20=2,ttft:200+tpot:50=1,scale:1=1'")
    add_load_options(p)
    p.add_argument("--api-key", type=api_key, default=None, help=API_KEY_HELP)
    p.add_argument("--out", default="loadtest",
                   help="output prefix: writes PREFIX.json and PREFIX.png (its directory is created)")
    p.set_defaults(func=run)


def add_load_options(p) -> None:
    """The load's shape and SLO (``LoadSpec`` fields but the rates and budgets), shared with ``bench/serve_ray.py``."""
    p.add_argument("--concurrency", type=int, default=0, help="closed loop with this many clients instead")
    p.add_argument("--num-requests", type=int, default=200, help="in total, split over the rates")
    p.add_argument("--prompt-len", default="8,32", help="LOW,HIGH tokens (uniform)")
    p.add_argument("--output-len", default="4,16", help="LOW,HIGH tokens (uniform)")
    p.add_argument("--prefix-len", type=int, default=0,
                   help="every prompt opens with one of --num-prefixes shared prefixes of this many tokens (0: none)")
    p.add_argument("--num-prefixes", type=int, default=1, help="shared prefixes to pick from (with --prefix-len)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampled requests (0 = greedy), seeded per request")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--timeout-s", type=float, default=60.0, help="per request, seconds (> 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="unmeasured requests sent first (closed loop, 8 clients): compilation, tuning, CUDA graphs")
    p.add_argument("--processes", type=int, default=1,
                   help="split the load over this many client processes: a closed loop's clients, an open loop's "
                        "arrivals (one process parsing every streamed message caps the load it can make)")
    p.add_argument("--connections", type=int, default=1,
                   help="connections per client process, clients taking them in turn (several router replicas "
                        "behind one port are spread over by connection)")
    p.add_argument("--ramp-s", type=float, default=0.0,
                   help="closed loop: start the clients one after another over this many seconds (0: all at once)")


def parse_pair(text: str, flag: str = "--prompt-len/--output-len") -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give LOW,HIGH token counts, e.g. 8,32") from None


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    out = []
    for item in text.split(","):
        kind, _, w = item.partition("=")
        try:
            out.append((kind.strip(), float(w or 1)))
        except ValueError:
            raise ValueError(f"--budgets {text!r}: weight {w!r} of {kind.strip()!r} is not a number") from None
    return tuple(out)


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"--rates {text!r}: give comma-separated request rates in req/s, e.g. 2,4,8") from None


def load_spec(args, budgets: str, **fields):
    """The ``LoadSpec`` of ``add_load_options``' arguments (and ``--rates`` where the parser has it), the budget mix
    ``budgets``; ``fields`` replace any of it."""
    from colm.loadtest import LoadSpec

    rates = getattr(args, "rates", None)
    spec = dict(num_requests=args.num_requests, concurrency=args.concurrency,
                prompt_len=parse_pair(args.prompt_len, "--prompt-len"),
                output_len=parse_pair(args.output_len, "--output-len"), budgets=parse_mix(budgets),
                slo_ttft_ms=args.slo_ttft_ms,
                slo_tpot_ms=args.slo_tpot_ms, timeout_s=args.timeout_s, seed=args.seed,
                warmup_requests=args.warmup_requests, processes=args.processes, connections=args.connections,
                ramp_s=args.ramp_s, prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
                temperature=args.temperature, top_p=args.top_p,
                **({"rates": parse_rates(rates)} if rates else {}))
    return LoadSpec(**{**spec, **fields})


def run(args) -> int:
    from colm.loadtest import run as run_load, table

    spec = load_spec(args, args.budgets)
    summary = run_load(args.addr, spec, f"{args.out}.json", f"{args.out}.png", api_key=args.api_key,
                       meta={"addr": args.addr})
    print(table(summary))
    t = summary["total"]
    if not t["num_ok"]:
        print(f"[colm loadtest] no request succeeded: 0/{t['num_requests']} ok, errors {t['errors']}; wrote "
              f"{args.out}.json and {args.out}.png", file=sys.stderr)
        return 1
    print(f"[colm loadtest] {t['num_ok']}/{t['num_requests']} ok, goodput {t['goodput_rps']:.2f} req/s, "
          f"errors {t['errors']}; wrote {args.out}.json and {args.out}.png")
    return 0
