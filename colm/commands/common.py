"""Argument helpers shared by subcommands.

torch is imported only when a parsed command needs it (``--device`` resolved or checked, a dtype looked
up), so building the parser (``colm --help``, ``colm serve --help``) stays free of torch.
"""

from __future__ import annotations

DTYPE_NAMES = ("bfloat16", "float16", "float32")


def device_name(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is a torch device string, refused (as an
    argparse error naming --device) when it is not one or names a CUDA device this machine does not have."""
    import argparse

    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from colm.checkpoint import check_device

    try:
        check_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


API_KEY_HELP = "the service's API key, or env:NAME to read it from environment variable NAME (a key on the command " \
               "line is visible to other users of the machine)"


def api_key(value: str) -> str:
    """``--api-key``: the key itself, or ``env:NAME`` for the value of environment variable NAME (as serve.yaml's
    secrets are given); an unset or empty NAME is refused as an argparse error naming it."""
    import argparse

    from colm.config_types import env_value

    try:
        return env_value(value, "--api-key")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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


def _bias_pair(s: str) -> tuple[int, float]:
    import argparse

    tid, sep, bias = s.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(tid), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give TOKEN_ID=BIAS, e.g. 257=-100") from None


def add_adjust_args(p) -> None:
    """The logit adjustments of ``colm.logits_adjust`` as flags (``adjust_kwargs`` reads them back)."""
    p.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2]: minus this for a token already "
                                                                         "in the output")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2]: minus this per time a token is "
                                                                          "in the output")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="in [0.01, 100]; 1 = off: tokens of the "
                                                                          "prompt or output have their logit scaled")
    p.add_argument("--logit-bias", type=_bias_pair, action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (in [-100, 100]) to token ID's logit; repeatable")
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS, stop token or stop string before this many")
    p.add_argument("--min-p", type=float, default=0.0, help="in [0, 1]: sample only tokens at least this fraction as "
                                                            "likely as the most likely one")
    so = p.add_mutually_exclusive_group()
    so.add_argument("--json-schema", default=None, help="structured output: a JSON schema (JSON text) the output "
                                                        "follows")
    so.add_argument("--json-object", action="store_true", help="structured output: any JSON object")
    so.add_argument("--regex", default=None, help="structured output: a regular expression the output matches")
    so.add_argument("--grammar", default=None, help="structured output: an EBNF grammar (root ::= ...)")
    so.add_argument("--choice", action="append", default=None, help="structured output: one of these strings; "
                                                                    "repeatable")


def adjust_kwargs(args) -> dict:
    """SamplingParams' keywords from ``add_adjust_args``' flags."""
    from colm.structured import StructuredOutput

    structured = None
    if args.json_schema is not None:
        structured = StructuredOutput("json_schema", args.json_schema)
    elif args.json_object:
        structured = StructuredOutput("json_object")
    elif args.regex is not None:
        structured = StructuredOutput("regex", args.regex)
    elif args.grammar is not None:
        structured = StructuredOutput("grammar", args.grammar)
    elif args.choice:
        structured = StructuredOutput("choice", choices=tuple(args.choice))
    return dict(presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, logit_bias=tuple(args.logit_bias),
                min_tokens=args.min_tokens, structured=structured, min_p=args.min_p)
