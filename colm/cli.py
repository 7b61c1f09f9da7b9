"""The ``colm`` command line: one subcommand per module in ``colm.commands``.

Each command module defines ``register(subparsers)`` that adds its parser and sets ``func``;
modules are imported only to build the parser, and heavy imports stay inside ``func``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand module under colm.commands) — order is the order shown by --help.
COMMAND_MODULES = [
    "generate",
    "init_model",
    "convert_hf",
    "expand",
    "info",
    "prepare_data",
    "train",
    "eval",
    "serve",
    "client",
    "loadtest",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colm",
        description="Chain-of-Model language models: build, convert, expand, train, evaluate and serve CoLM / CoLM-Air.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"colm.commands.{name}")
        except ImportError as e:  # an optional extra is missing: keep the rest of the CLI usable
            sub.add_parser(name.replace("_", "-"), help=f"(unavailable: {e})")
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"colm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
