"""``colm train --config FILE.yaml [section.field=value ...]`` (and ``python -m colm.train``).

Several processes: ``torchrun --nproc-per-node N -m colm.train --config FILE.yaml`` (FSDP2).
"""

from __future__ import annotations

import argparse
import sys


def _add_args(p) -> None:
    p.add_argument("--config", required=True, help="training YAML (see configs/train/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.FIELD=VALUE",
                   help="override config fields, e.g. optim.steps=20 run.out_dir=runs/x (values parsed as YAML)")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a CoLM / CoLM-Air model (pre-training, heads stage, expansion, chain tuning)")
    _add_args(p)
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected SECTION.FIELD=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def run(args) -> int:
    from colm.train.config import TrainConfig
    from colm.train.distributed import leave
    from colm.train.loop import train

    cfg = TrainConfig.from_yaml(args.config, parse_overrides(args.overrides))
    train(cfg)
    return leave(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m colm.train", description=__doc__)
    _add_args(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"colm train: error: {e}", file=sys.stderr)
        from colm.train.distributed import leave

        return leave(2)
