"""The ``colm`` command line: one subcommand per module in ``colm.commands``.

Each command module defines ``register(subparsers)`` that adds its parser and sets ``func``. The
top-level parser is lazy: ``COMMANDS`` gives each command's one-line help, and only the module of the
command being run is imported to build its parser (``colm --help`` imports none of them). Heavy imports
(torch, grpc, ray) stay inside each command's ``func``, so ``colm serve --help`` stays fast too.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module under colm.commands, one-line help); order is the order shown by --help. The help
# matches what each module's register() passes to add_parser (tests/test_cli_flags.py checks).
COMMANDS = {
    "generate": ("generate", "generate text with a checkpoint at a chosen scale (the reference path)"),
    "init": ("init_model", "create a random-weight checkpoint from a preset (e.g. tiny-air)"),
    "convert-hf": ("convert_hf", "convert a Hugging Face Llama checkpoint directory into a one-chain colm checkpoint"),
    "expand": ("expand", "add a chain to a checkpoint: the old model becomes the first chains (chain expansion)"),
    "info": ("info", "show a checkpoint's chains and per-scale parameter counts, or list presets"),
    "prepare-data": ("prepare_data", "tokenize text files/directories (or pydoc:topics) into token files"),
    "train": ("train", "train a CoLM / CoLM-Air model (pre-training, heads stage, expansion, chain tuning)"),
    "eval": ("eval", "perplexity of every scale on a held-out token file (table + JSON)"),
    "serve": ("serve", "serve a model: embedded local Ray cluster (or --address auto), workers, router"),
    "client": ("client", "call a running colm service over gRPC"),
    "loadtest": ("loadtest", "load-test a colm service: latency/goodput per rate and scale, JSON + PNG"),
}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the top level has no options but -h, so its first word)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with ``command``'s full sub-parser (its module imported) and one-line stubs for the rest."""
    parser = argparse.ArgumentParser(
        prog="colm",
        description="Chain-of-Model language models: build, convert, expand, train, evaluate and serve CoLM / CoLM-Air.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, helptext) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=helptext, add_help=False)
            continue
        try:
            module = importlib.import_module(f"colm.commands.{module_name}")
        except ImportError as e:  # an optional extra is missing: say which, the rest of the CLI stays usable
            stub = sub.add_parser(name, help=f"(unavailable: {e})")
            stub.set_defaults(unavailable=f"colm {name}: unavailable: {e}")
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    if getattr(args, "unavailable", None):
        print(args.unavailable, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        # no command: the overview; a command with actions (colm client) but none given: its own help
        (subparsers.choices[args.command] if args.command else parser).print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:
        print(f"colm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
