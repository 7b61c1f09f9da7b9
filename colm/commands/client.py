"""``colm client``: call a running colm service (generate, tokenize, scales, health)."""

from __future__ import annotations

import json
import sys

from colm.commands.common import API_KEY_HELP, add_adjust_args, adjust_kwargs, api_key


def register(sub) -> None:
    p = sub.add_parser("client", help="call a running colm service over gRPC")
    csub = p.add_subparsers(dest="client_command", metavar="ACTION")
    g = csub.add_parser("generate", help="generate text (greedy by default)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32,
                   help=">= 1 (the API reads 0 as unset, the router's default; 0 is refused here)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--scale", type=int, default=None, help="pin a scale (default: the router chooses)")
    g.add_argument("--ttft-ms", type=float, default=None, help="time-to-first-token budget")
    g.add_argument("--tpot-ms", type=float, default=None, help="per-token budget")
    g.add_argument("--deadline-ms", type=float, default=None, help="whole-request budget")
    g.add_argument("--reject", action="store_true", help="fail instead of degrading when no scale fits the budget")
    g.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    g.add_argument("--ids", action="store_true", help="print token ids")
    g.add_argument("--json", action="store_true", help="print the full response as JSON")
    add_adjust_args(g)
    for name, helptext in (("tokenize", "text -> token ids"), ("scales", "list scales and latency estimates"),
                           ("health", "router and worker health")):
        q = csub.add_parser(name, help=helptext)
        if name == "tokenize":
            q.add_argument("--text", required=True)
    for q in [g] + [csub.choices[n] for n in ("tokenize", "scales", "health")]:
        q.add_argument("--addr", default="127.0.0.1:50051", help="router gRPC address HOST:PORT")
        q.add_argument("--api-key", type=api_key, default=None, help=API_KEY_HELP)
        q.add_argument("--tls-ca", default=None, help="CA certificate (PEM) for a TLS endpoint")
        q.set_defaults(func=run)


def run(args) -> int:
    import grpc

    from colm.client import Client

    if args.client_command == "generate" and args.max_new_tokens == 0:
        # `colm generate --max-new-tokens 0` makes no token; over the API 0 would silently become the default
        raise ValueError("--max-new-tokens 0: the gRPC API reads 0 as unset (the router's default, "
                         "router.default_max_new_tokens), so it cannot ask for no tokens: give >= 1")
    try:
        with Client(args.addr, api_key=args.api_key, tls_ca=args.tls_ca) as c:
            if args.client_command == "generate":
                kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, scale=args.scale, ttft_ms=args.ttft_ms, tpot_ms=args.tpot_ms,
                          deadline_ms=args.deadline_ms, reject=args.reject, **adjust_kwargs(args))
                kw["logit_bias"] = dict(kw["logit_bias"])
                kw["structured_output"] = kw.pop("structured")
                if args.stream:
                    ids = []
                    for ev in c.stream(args.prompt, **kw):
                        if ev["kind"] == "token":
                            ids.append(ev["id"])
                            sys.stdout.write(f"{ev['id']} " if args.ids else ev["text"])
                            sys.stdout.flush()
                        elif ev["kind"] == "finish":
                            sys.stdout.write("" if args.ids else ev["text"])
                            print()
                            print(f"[colm client] finish={ev['finish_reason']} {json.dumps(ev['usage'])}",
                                  file=sys.stderr)
                        else:
                            print(f"[colm client] scale={ev['scale']} degraded={ev['degraded']}", file=sys.stderr)
                    return 0
                r = c.complete(args.prompt, **kw)
                if args.json:
                    print(json.dumps(r, indent=2))
                elif args.ids:
                    print(" ".join(map(str, r["token_ids"])))
                else:
                    print(args.prompt + r["text"])
                print(f"[colm client] scale={r['scale']} degraded={r['degraded']} finish={r['finish_reason']} "
                      f"ttft={r['usage']['ttft_ms']:.1f}ms total={r['usage']['total_ms']:.1f}ms", file=sys.stderr)
            elif args.client_command == "tokenize":
                print(" ".join(map(str, c.tokenize(args.text))))
            elif args.client_command == "scales":
                print(json.dumps(c.list_scales(), indent=2))
            elif args.client_command == "health":
                print(json.dumps(c.health(), indent=2))
            else:
                print("colm client: give an action (generate, tokenize, scales, health)", file=sys.stderr)
                return 2
    except grpc.RpcError as e:
        print(f"colm client: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0
