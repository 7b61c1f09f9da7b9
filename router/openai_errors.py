"""How a request body that fails validation becomes a 400 naming the field: ``BadField`` (a ``ValueError`` with
the field's dotted path in ``param``), ``bad_field`` (pydantic's first error as one message: the path, what was
wrong, what is allowed), ``parse`` (a decoded body -> a request model), and the short description of a JSON value
that error messages show instead of the value (``_kind``, ``_shown``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from colm.router.openai_fields import BUDGET_FIELDS


def _kind(x: Any) -> str:
    """A short description of a JSON value for an error message (never the whole value)."""
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, (int, float)):
        r = repr(x)
        return r if len(r) <= 24 else f"a {len(r)}-digit number"
    if isinstance(x, str):
        return repr(x) if len(x) <= 24 else "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def _shown(x: Any) -> str:
    """A JSON value as it may appear after ``field=`` in a message: scalars as themselves, containers by kind."""
    k = _kind(x)
    return k if x is None or isinstance(x, bool) or k == repr(x) else f"<{k}>"


class BadField(ValueError):
    """A request field failed validation; ``param`` names it (dotted, list indices in brackets)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def bad_field(e: ValidationError, model: type[BaseModel]) -> BadField:
    """The first error of ``e`` as one message: the field path, what was wrong, and what is allowed."""
    errs = e.errors(include_url=False)
    # a union reports one error per member: the deepest one is about the member the input was meant to be
    err = max((x for x in errs if x["loc"][:1] == errs[0]["loc"][:1]), key=lambda x: len(x["loc"]))
    path, fields, described = [], model.model_fields, None
    for part in err["loc"]:
        if isinstance(part, int):
            path.append(f"[{part}]")
        elif fields is not None and part in fields:
            path.append(("." if path else "") + part)
            ann = fields[part].annotation
            members = getattr(ann, "__args__", (ann,))  # Optional[Model] -> (Model, NoneType)
            sub = next((a for a in members if isinstance(a, type) and issubclass(a, BaseModel)), None)
            described = fields[part]
            fields = sub.model_fields if sub else None
        # anything else is pydantic's name of a union member ("str", "list[str]"): not a field
    param = "".join(path) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        param = f"{param}.{err['loc'][-1]}"
        return BadField(f"{param}: unknown field; allowed: {', '.join(BUDGET_FIELDS)}", param)
    if err["type"] == "missing":
        return BadField(f"{param}: required field is missing", param)
    allowed = f"; allowed: {described.description}" if described is not None else ""
    if err["type"] == "value_error":  # ours: the message starts with the field's name
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, BadField):  # a validator that names a field inside its own (messages[2].role)
            return inner
        return BadField(msg + allowed, param)
    return BadField(f"{param}={_shown(err.get('input'))}: {msg}{allowed}", param)


def parse(model: type[BaseModel], body: Any):
    """Validate a decoded JSON body; BadField (a ValueError, so a 400) on the first bad field."""
    if not isinstance(body, dict):
        raise BadField(f"request body must be a JSON object (got {_kind(body)})", None)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise bad_field(e, model) from None
    except RecursionError:
        raise BadField("request body is nested too deeply", None) from None
