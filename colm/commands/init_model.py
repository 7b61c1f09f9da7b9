"""``colm init``: write a randomly initialised checkpoint of a named preset."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("init", help="create a random-weight checkpoint from a preset (e.g. tiny-air)")
    p.add_argument("--preset", default="tiny-air", help="preset name (see `colm info --presets`)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="init standard deviation")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from colm import checkpoint
    from colm.model import CoLM
    from colm.presets import preset

    cfg = preset(args.preset)
    model = CoLM(cfg).reset_parameters(std=args.std, seed=args.seed).to(getattr(torch, args.dtype))
    checkpoint.save(model, args.out, tokenizer={"kind": "byte"})
    print(f"wrote {args.out}: preset {args.preset}, chains {list(cfg.chains)}, kv_sharing={cfg.kv_sharing}, "
          f"{cfg.num_params() / 1e6:.2f}M parameters")
    return 0
