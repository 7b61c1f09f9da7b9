"""Argument helpers shared by subcommands."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_device_args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute dtype (default: the checkpoint's)")


def resolve_dtype(name: str | None):
    return None if name is None else DTYPES[name]


def resolve_model_dir(name: str) -> str:
    """``demo`` names the bundled demo checkpoint; anything else is a directory path."""
    if name == "demo":
        from colm.assets import demo_model_dir

        return str(demo_model_dir())
    return name
