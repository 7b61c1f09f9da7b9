"""Argument helpers shared by subcommands.

torch is imported only when a parsed command needs it (``--device auto`` resolved, a dtype looked
up), so building the parser (``colm --help``, ``colm serve --help``) stays free of torch.
"""

from __future__ import annotations

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def device_name(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is a torch device string."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_args(p) -> None:
    # argparse passes a string default through ``type`` only when the command is parsed without --device.
    p.add_argument("--device", default="auto", type=device_name,
                   help="torch device (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="compute dtype (default: the checkpoint's)")


def resolve_dtype(name: str | None):
    if name is None:
        return None
    import torch

    return getattr(torch, name)


def resolve_model_dir(name: str) -> str:
    """``demo`` names the bundled demo checkpoint; anything else is a directory path."""
    if name == "demo":
        from colm.assets import demo_model_dir

        return str(demo_model_dir())
    return name
