"""``colm info``: describe a checkpoint (per-scale sizes) or list the presets."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="show a checkpoint's chains and per-scale parameter counts, or list presets")
    p.add_argument("--model", help="colm checkpoint directory, or 'demo' for the bundled demo model")
    p.add_argument("--presets", action="store_true", help="list preset names")
    p.set_defaults(func=run)


def describe(cfg) -> str:
    lines = [f"chains={list(cfg.chains)} dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
             f"kv_heads={cfg.n_kv_heads} ffn={cfg.ffn_hidden} kv_sharing={cfg.kv_sharing}",
             f"{'scale':>5} {'dim':>6} {'params':>14}"]
    for k in range(1, cfg.num_chains + 1):
        lines.append(f"{k:>5} {cfg.scale_dim(k):>6} {cfg.num_params(k):>14,}")
    return "\n".join(lines)


def run(args) -> int:
    from colm.presets import PRESETS, preset

    if args.presets or not args.model:
        for name in PRESETS:
            cfg = preset(name)
            print(f"{name:28s} chains={list(cfg.chains)!s:16s} dim={cfg.dim:<5d} air={cfg.kv_sharing!s:5s} "
                  f"params={cfg.num_params() / 1e9:.3f}B")
        return 0
    from colm.checkpoint import load_config
    from colm.commands.common import resolve_model_dir

    print(describe(load_config(resolve_model_dir(args.model))))
    return 0
