"""``ChatCompletionRequest`` (``POST /v1/chat/completions``): ``messages`` (checked and normalised here: roles,
string or text-part content, an assistant's earlier ``tool_calls``, a tool message's ``tool_call_id``), ``tools`` and
``tool_choice`` (``router.tool_calls``), and the chat forms of the token limit and log-probs.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import Field, StrictBool, StrictInt, field_validator

from colm.router.openai_errors import BadField, _kind, _shown
from colm.router.openai_fields import _text
from colm.router.openai_sampling import SamplingRequest
from colm.router.tool_calls import MAX_TOOLS, ToolChoice, check_tools, forced_choice
from colm.sampling import MAX_TOP_LOGPROBS
from colm.structured import StructuredOutput

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Any = Field(..., description="a non-empty list of messages {role: system|user|assistant, content: "
                                           "a string or a list of text parts}")
    max_completion_tokens: Optional[Annotated[StrictInt, Field(ge=0)]] = Field(
        None, description="an integer >= 0, or null (up to the end of the context)")
    max_tokens: Optional[Annotated[StrictInt, Field(ge=0)]] = Field(
        None, description="an integer >= 0, or null (the legacy name of max_completion_tokens)")
    logprobs: Optional[StrictBool] = Field(False, description="true or false")
    top_logprobs: Optional[Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = Field(
        None, description=f"an integer 0..{MAX_TOP_LOGPROBS} (with logprobs: true) or null")
    add_generation_prompt: Optional[StrictBool] = Field(True, description="true or false")
    add_special_tokens: Optional[StrictBool] = Field(False, description="true or false (the template writes the "
                                                                        "BOS itself; true adds one if it does not)")
    tools: Optional[list] = Field(None, description=f"a list of at most {MAX_TOOLS} function tools, or null")
    functions: Optional[list] = Field(None, description="null or [] (the legacy functions: use tools)")
    tool_choice: Optional[Any] = Field(None, description='"none", "required", {"type": "function", "function": '
                                                         '{"name": ...}}, or null')

    @field_validator("messages", mode="plain")
    @classmethod
    def _messages(cls, v):
        return _chat_messages(v)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError(f"top_logprobs={v} needs logprobs: true")
        return v

    def num_top_logprobs(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v):
        if v:
            raise ValueError("functions: the legacy function calls are not supported; give tools")
        return v

    @field_validator("tools", mode="plain")
    @classmethod
    def _tools(cls, v):
        return None if v is None else check_tools(v)

    def forced_tool(self) -> ToolChoice | None:
        """The tool call ``tool_choice`` forces (``router.tool_calls``), or None; BadField otherwise."""
        try:
            return forced_choice(self.tool_choice, self.tools)
        except ValueError as e:
            raise BadField(str(e), "tool_choice") from None

    def structured(self) -> StructuredOutput | None:
        forced, own = self.forced_tool(), super().structured()
        if forced is None:
            return own
        if own is not None:
            raise BadField("tool_choice: a forced tool call is its own structured output; drop response_format / "
                           "guided_*", "tool_choice")
        return forced.structured()


def _chat_messages(v) -> list[dict]:
    """-> [{"role", "content": str, optionally "name"}]; BadField naming the message's field."""
    if not isinstance(v, list) or not v:
        raise BadField(f"messages is {_kind(v) if v != [] else 'an empty list'}: give a non-empty list of messages",
                       "messages")
    out = []
    for i, m in enumerate(v):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadField(f"{where} is {_kind(m)}: each message is an object with role and content", where)
        role = m.get("role")
        if role not in ROLES:
            what = " is missing" if "role" not in m else f"={_shown(role)}"
            raise BadField(f"{where}.role{what}: allowed roles are {', '.join(ROLES)}", f"{where}.role")
        calls = m.get("tool_calls") if role == "assistant" else None
        if ("content" not in m or m["content"] is None) and not calls:
            raise BadField(f"{where}.content is {'missing' if 'content' not in m else 'null'}: give a string or a "
                           "list of text parts", f"{where}.content")
        msg = {"role": role, "content": _content(m["content"], f"{where}.content") if m.get("content") is not None
               else None}
        if calls:
            msg["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
        extra = {"name"} | ({"tool_call_id"} if role == "tool" else set())
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise BadField(f"{where}.tool_call_id: a tool message names the call it answers (a string)",
                           f"{where}.tool_call_id")
        for k, x in m.items():
            if k in ("role", "content") or (k == "tool_calls" and role == "assistant") or x is None:
                continue
            if k not in extra:
                raise BadField(f"{where}.{k}: not supported; a message has role, content, optionally name (and "
                               "tool_calls for an assistant, tool_call_id for a tool)", f"{where}.{k}")
            if not isinstance(x, str):
                raise BadField(f"{where}.{k} is {_kind(x)}: a string", f"{where}.{k}")
            msg[k] = _text(x, f"{where}.{k}")
        out.append(msg)
    return out


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's earlier ``tool_calls`` (passed to the chat template as given); BadField otherwise."""
    if not isinstance(calls, list):
        raise BadField(f"{where} is {_kind(calls)}: a list of calls", where)
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise BadField(f'{where}[{j}]: a call is {{"id": ..., "type": "function", "function": {{"name": ..., '
                           f'"arguments": "<JSON text>"}}}}', f"{where}[{j}]")
    return calls


def _content(c, where: str) -> str:
    if isinstance(c, str):
        return _text(c, where) if c else c
    if not isinstance(c, list):
        raise BadField(f"{where} is {_kind(c)}: give a string or a list of text parts", where)
    texts = []
    for j, part in enumerate(c):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise BadField(f"{at} is {_kind(part)}: a content part is an object {{\"type\": \"text\", \"text\": ...}}",
                           at)
        if part.get("type") != "text":
            raise BadField(f"{at}.type={_shown(part.get('type'))}: only text parts are supported", f"{at}.type")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise BadField(f"{at}.{extra[0]}: not supported; a text part has type and text", f"{at}.{extra[0]}")
        if not isinstance(part.get("text"), str):
            raise BadField(f"{at}.text is {_kind(part.get('text'))}: a string", f"{at}.text")
        texts.append(_text(part["text"], f"{at}.text") if part["text"] else "")
    return "\n".join(texts)
