"""Tool calls on the chat API, forced by ``tool_choice``: a named function or ``"required"``.

A forced call needs no parser of a model's own tool-call format: the output is held by structured output
(``colm.structured``) to the shape of the call, then read back as OpenAI ``tool_calls``:

* ``{"type": "function", "function": {"name": N}}``: the output is N's arguments, a JSON object following its
  ``parameters`` schema; one call to N (finish_reason ``stop``, as OpenAI answers a named choice);
* ``"required"``: the output is a JSON array of at least one ``{"name": ..., "parameters": {...}}``, each name one
  of the tools and its parameters following that tool's schema (vLLM's form); one call per element (finish_reason
  ``tool_calls``).

A named call streams: its arguments arrive as tool-call deltas. ``"none"`` (and no ``tool_choice``) leaves the
output free; the tools still reach the chat template (as
``tools``, as transformers passes them) for templates that describe them to the model. ``"auto"`` would need a
parser of the model's own tool-call markup, which colm does not have: a 400 that says to force the call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from colm.structured import StructuredOutput

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class ToolChoice:
    """A forced tool call: ``name`` (a named function) or None (``"required"``: any of the tools)."""

    name: str | None
    tools: tuple[dict, ...]  # the request's tools, validated

    def structured(self) -> StructuredOutput:
        params = {t["function"]["name"]: t["function"].get("parameters", ANY_OBJECT) for t in self.tools}
        if self.name is not None:
            return StructuredOutput("json_schema", json.dumps(params[self.name]))
        call = [{"type": "object", "properties": {"name": {"enum": [n]}, "parameters": p},
                 "required": ["name", "parameters"], "additionalProperties": False} for n, p in params.items()]
        return StructuredOutput("json_schema", json.dumps({"type": "array", "minItems": 1,
                                                           "items": {"anyOf": call}}))

    def calls(self, text: str) -> list[dict] | None:
        """The OpenAI ``tool_calls`` of a finished output, or None when it does not parse (a truncated output)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        pairs = [(self.name, value)] if self.name is not None else [(c["name"], c["parameters"]) for c in value]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": n, "arguments": json.dumps(p, ensure_ascii=False)}} for n, p in pairs]


def check_tools(tools) -> list[dict]:
    """OpenAI ``tools`` -> the list as given; ValueError naming the element."""
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ValueError(f"tools: give a list of at most {MAX_TOOLS} tools")
    names = set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f'tools[{i}]: a tool is {{"type": "function", "function": {{"name": ..., '
                             f'"parameters": {{...}}}}}}')
        if not isinstance(fn.get("name"), str) or not _NAME.match(fn["name"]):
            raise ValueError(f"tools[{i}].function.name: 1-64 letters, digits, _ or -")
        if fn["name"] in names:
            raise ValueError(f"tools[{i}].function.name={fn['name']!r} appears twice")
        names.add(fn["name"])
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tools[{i}].function.parameters: a JSON schema object")
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError(f"tools[{i}].function.description: a string")
    return tools


def forced_choice(tool_choice, tools: list[dict] | None) -> ToolChoice | None:
    """``tool_choice`` with the request's ``tools`` -> the forced call, or None (free output); ValueError otherwise."""
    if tool_choice in (None, "none"):
        return None
    if tool_choice == "auto":
        raise ValueError('tool_choice="auto": colm has no parser of the model\'s own tool-call markup; force the '
                         'call with "required" or {"type": "function", "function": {"name": ...}}')
    if not tools:
        raise ValueError(f"tool_choice={tool_choice!r} needs tools")
    if tool_choice == "required":
        return ToolChoice(None, tuple(tools))
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(fn, dict):
        raise ValueError('tool_choice: "none", "required", or {"type": "function", "function": {"name": ...}}')
    if fn.get("name") not in {t["function"]["name"] for t in tools}:
        raise ValueError(f"tool_choice.function.name={fn.get('name')!r} is not one of the tools")
    return ToolChoice(fn["name"], tuple(tools))
