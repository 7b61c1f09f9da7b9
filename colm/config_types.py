"""Configuration values checked against their dataclass fields' annotations, as a file is read.

YAML gives ``"10"`` for a quoted number, ``1.5`` where a count belongs, ``true`` where a port does, and a
bare ``no`` as false. A config class's own checks compare values (``x < 1``) and assume the type; a wrong type
then fails as a ``TypeError`` somewhere later, or passes (``"no"`` is truthy). ``check_types`` refuses each such
value first, naming the field, the value and the type the field takes. Annotations understood: ``int`` (not a
bool), ``float`` (an int or a finite float, not a bool), ``bool``, ``str``, ``None``, unions of these, ``dict``
and ``tuple[T, ...]`` / ``list[T]`` (a list or tuple of T). Any other annotation is left to the class.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
          dict: "a mapping"}


def _is(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if tp in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return len(args) != 1 or all(_is(v, args[0]) for v in value)
    return True


def describe(tp) -> str:
    """``tp`` in words: "an integer or null", "a list of integers"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if tp in (tuple, list) or origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(args) == 1 and args[0] in _NAMES:
            return "a list of " + {int: "integers", float: "numbers", bool: "booleans", str: "strings"}.get(
                args[0], "values")
        return "a list"
    if origin is dict:
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def check_types(cls, values: dict, section: str) -> None:
    """ValueError naming ``section.field``, the value and the type allowed, for the first of ``values`` whose
    type ``cls``'s field does not take (fields ``cls`` lacks are left to the caller)."""
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        tp = hints.get(name)
        if tp is not None and not _is(value, tp):
            # YAML 1.1 reads 3e-4 (no dot) as a string
            hint = (" such as 0.5 or 3.0e-4 (YAML reads 3e-4, without a dot, as text)"
                    if isinstance(value, str) and _is(1.5, tp) else "")
            raise ValueError(f"{section}.{name}={value!r}: must be {describe(tp)}{hint}")


def env_value(value: str, where: str) -> str:
    """``value``, or for ``env:NAME`` the value of environment variable NAME (how secrets are given: a key in a file
    or on a command line can be read by others); ValueError naming ``where`` when NAME is unset or empty."""
    if not value.startswith("env:"):
        return value
    name = value[4:]
    found = os.environ.get(name) if name else None
    if not found:
        raise ValueError(f"{where}: environment variable {name or '(none)'} is not set or empty (from {value!r})")
    return found


def section_name(obj) -> str:
    """A config section's name in messages, from its class: ``OptimSection`` -> ``optim``."""
    return type(obj).__name__.removesuffix("Section").lower()


def check_fields(obj) -> None:
    """``check_types`` of a built dataclass's own fields (from its ``__post_init__``)."""
    check_types(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, section_name(obj))
