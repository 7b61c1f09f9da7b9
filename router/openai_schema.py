"""Request models of the OpenAI-compatible HTTP API (pydantic v2), and the one rule that turns a
pydantic ``ValidationError`` into a 400 naming the field.

Types are strict: no bool for a number, no string for a number, no float for an integer; every float
must be finite (JSON's ``NaN`` / ``Infinity`` literals, which Python's json reader accepts, are
rejected). ``null`` means "the default" wherever the OpenAI schema marks a field nullable.

``n`` (1..16) gives that many choices per prompt (sequences of their own; a seeded request seeds choice j
with seed + j). ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (token ids as strings) and vLLM's
``repetition_penalty``, ``min_tokens`` and ``allowed_token_ids`` act as ``colm.logits_adjust`` says, ``min_p`` as
``colm.sampling`` does; vLLM's ``stop_token_ids`` end the output at any of them (with the chat template's end of
turn, in chat) and ``truncate_prompt_tokens`` keeps only the prompt's last that many tokens. Structured output
(``colm.structured``): OpenAI's ``response_format`` (text, json_object, json_schema) or one of vLLM's
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``, at most one. Fields the engines
cannot honour are rejected unless they ask for a no-op: a ``best_of`` other than n, a non-empty ``suffix``; in
chat, the legacy ``functions``, ``tool_choice: "auto"`` (forced calls: ``router.tool_calls``). ``user``
is accepted and ignored, and so are unknown top-level fields (as vLLM does); ``model`` is checked by the HTTP
layer (404 when unknown). The colm extras ``scale``, ``ttft_ms``, ``tpot_ms``, ``deadline_ms``, ``on_miss`` and ``speculative`` (chain-1
self-speculative decoding: drafts per round, 0..16) may sit at the top
level or inside ``"colm": {...}`` (the top level wins when both are given); unknown
keys inside ``"colm"`` are rejected, since a misspelled budget would otherwise be silently dropped.

Limits, the same as the gRPC API's: ``ttft_ms`` / ``tpot_ms`` / ``deadline_ms`` in (0, 3600000] (one
hour); ``seed`` 0..2**63-1; ``stop`` at most 16 strings of 1..256 characters (``""`` = no stop);
``scale`` >= 1 here and <= the model's number of chains in the router. ``top_k`` -1 means off, as in
vLLM; ``logprobs`` 0..20 on completions (chat: ``top_logprobs`` 0..20 with ``logprobs: true``): each generated
token comes with that many of the most likely tokens (and itself); the prompt's positions (``echo``) report their
most likely token only, so ``echo`` with ``logprobs`` above 1 is a 400 rather than a short list.
``include_stop_str_in_output`` (vLLM's extra) keeps a matched stop string in the text.

Chat ``messages``: a non-empty list of objects with ``role`` system / developer (OpenAI's newer name for system
instructions: ``colm.chat_template``) / user / assistant / tool, ``content`` a
string or a list of text parts ``{"type": "text", "text": ...}`` (joined with newlines, as vLLM does for
string-content templates), and optionally ``name``; anything else is a 400 naming the message's field.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

# The limits of the gRPC API, imported from there so that both fronts accept the same requests.
from colm.decode_worker.config import MAX_GAMMA
from colm.decode_worker.prefix_cache import MAX_CACHE_SALT
from colm.router.tool_calls import MAX_TOOLS, ToolChoice, check_tools, forced_choice
from colm.structured import StructuredOutput
from colm.proto.convert import MAX_BUDGET_MS, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SEED_MAX
from colm.sampling import (MAX_ALLOWED_TOKEN_IDS, MAX_BIAS, MAX_LOGIT_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY,
                           MAX_TEMPERATURE, MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, MIN_TEMPERATURE)

MAX_LOGPROBS = MAX_TOP_LOGPROBS  # the most likely tokens reported per generated token
MAX_N = 16  # choices per prompt (n): each is a sequence of its own, sharing the prompt's cached K/V
ROLES = ("system", "user", "assistant", "tool", "developer")

_STRICT = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")
Ms = Annotated[float, Field(gt=0, le=MAX_BUDGET_MS)]


def _scale_field():
    return Field(None, description="an integer scale >= 1 and <= the model's number of chains, or null (the router "
                                   "picks)")


def _ms_field():
    return Field(None, description=f"a finite number of milliseconds > 0 and <= {MAX_BUDGET_MS:.0f} (one hour)")


def _on_miss_field():
    return Field(None, description='"degrade" (serve at the scale closest to the budget) or "reject" (429)')


Scale = Optional[Annotated[StrictInt, Field(ge=1)]]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
Speculative = Optional[Annotated[StrictInt, Field(ge=0, le=MAX_GAMMA)]]


def _speculative_field():
    return Field(None, description=f"an integer 0..{MAX_GAMMA}: chain-1 drafts per round (0 or null = off)")

OnMiss = Optional[Literal["degrade", "reject"]]


class ColmExtras(BaseModel):
    """The scale and the latency budget of one request."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    scale: Scale = _scale_field()
    ttft_ms: Optional[Ms] = _ms_field()
    tpot_ms: Optional[Ms] = _ms_field()
    deadline_ms: Optional[Ms] = _ms_field()
    on_miss: OnMiss = _on_miss_field()
    speculative: Speculative = _speculative_field()


BUDGET_FIELDS = tuple(ColmExtras.model_fields)


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: Optional[StrictBool] = Field(None, description="true or false")


def _prompt_list(p: list, where: str) -> list:
    """A list prompt -> [token-id list] or [str | token-id list, ...]; ValueError names the bad element."""
    if not p:
        raise ValueError(f"{where} is empty")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return [_token_ids(p, where)]
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            out.append(_text(x, f"{where}[{i}]"))
        elif isinstance(x, list):
            out.append(_token_ids(x, f"{where}[{i}]"))
        elif isinstance(x, int) and not isinstance(x, bool):
            bad = next(j for j, y in enumerate(p) if not (isinstance(y, int) and not isinstance(y, bool)))
            raise ValueError(f"{where}[{bad}] is {_kind(p[bad])}: a token-id list holds integers >= 0 only")
        else:
            raise ValueError(f"{where}[{i}] is {_kind(x)}: each prompt of a batch is a string or a list of token ids")
    return out


def _token_ids(ids: list, where: str) -> list[int]:
    if not ids:
        raise ValueError(f"{where} is empty: give at least one token id")
    for j, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"{where}[{j}] is {_kind(t)}: token ids are integers >= 0")
    return ids


def _text(s: str, where: str) -> str:
    if not s:
        raise ValueError(f"{where} is an empty string")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return s


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


class SamplingRequest(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = _STRICT

    model: Optional[StrictStr] = Field(None, description="a name that /v1/models lists (NAME or NAME@k), or null")
    temperature: Optional[float] = Field(
        1.0, description=f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] (default 1)")
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = Field(1.0, description="a number in (0, 1] (default 1)")
    top_k: Optional[Annotated[StrictInt, Field(ge=-1)]] = Field(0, description="an integer >= 0; 0 or -1 = off")
    seed: Optional[Annotated[StrictInt, Field(ge=0, le=SEED_MAX)]] = Field(
        None, description=f"an integer 0..{SEED_MAX} or null")
    stop: Optional[Union[Annotated[StrictStr, Field(max_length=MAX_STOP_CHARS)],
                         Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                                   Field(max_length=MAX_STOP_STRINGS)]]] = Field(
        None, description=f"a string, a list of at most {MAX_STOP_STRINGS} non-empty strings (each at most "
                          f"{MAX_STOP_CHARS} characters), or null")
    stream: Optional[StrictBool] = Field(False, description="true or false")
    stream_options: Optional[StreamOptions] = Field(None, description='an object {"include_usage": true/false}')
    ignore_eos: Optional[StrictBool] = Field(False, description="true or false")
    include_stop_str_in_output: Optional[StrictBool] = Field(False, description="true or false")
    n: Optional[StrictInt] = Field(1, description=f"an integer 1..{MAX_N}: choices per prompt")
    presence_penalty: Optional[Penalty] = Field(
        None, description=f"a number in [{-MAX_PENALTY}, {MAX_PENALTY}] or null (0)")
    frequency_penalty: Optional[Penalty] = Field(
        None, description=f"a number in [{-MAX_PENALTY}, {MAX_PENALTY}] or null (0)")
    repetition_penalty: Optional[Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)]] = Field(
        None, description=f"a number in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] or null (1 = off)")
    logit_bias: Optional[dict[StrictStr, Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]]] = Field(
        None, description=f"an object of at most {MAX_LOGIT_BIAS} token ids (as strings) -> a bias in "
                          f"[{-MAX_BIAS}, {MAX_BIAS}], or null")
    min_tokens: Optional[Annotated[StrictInt, Field(ge=0)]] = Field(
        None, description="an integer >= 0 and <= the request's maximum of new tokens, or null (0)")
    min_p: Optional[Annotated[float, Field(ge=0, le=1)]] = Field(None, description="a number in [0, 1] or null (0)")
    stop_token_ids: Optional[Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)]] = (
        Field(None, description=f"a list of at most {MAX_STOP_TOKEN_IDS} token ids (integers >= 0), or null"))
    truncate_prompt_tokens: Optional[Annotated[StrictInt, Field(ge=1)]] = Field(
        None, description="an integer >= 1: keep only the prompt's last this many tokens, or null (the whole prompt)")
    allowed_token_ids: Optional[Annotated[list[Annotated[StrictInt, Field(ge=0)]],
                                          Field(max_length=MAX_ALLOWED_TOKEN_IDS)]] = Field(
        None, description=f"a list of at most {MAX_ALLOWED_TOKEN_IDS} token ids (integers >= 0), or null (all)")
    user: Optional[StrictStr] = Field(None, description="a string (ignored)")
    response_format: Optional[Any] = Field(
        None, description='{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": '
                          '{"schema": {...}}}, or null')
    guided_json: Optional[Union[StrictStr, dict]] = Field(None, description="a JSON schema (an object or its text)")
    guided_regex: Optional[StrictStr] = Field(None, description="a regular expression")
    guided_choice: Optional[list[StrictStr]] = Field(None, description="a list of strings")
    guided_grammar: Optional[StrictStr] = Field(None, description="an EBNF grammar (root ::= ...)")
    cache_salt: Optional[Annotated[StrictStr, Field(max_length=MAX_CACHE_SALT)]] = Field(
        None, description=f"a string of at most {MAX_CACHE_SALT} characters: requests share cached prompt K/V only "
                          "with requests of the same salt")
    colm: Optional[ColmExtras] = Field(None, description="an object with scale, ttft_ms, tpot_ms, deadline_ms, "
                                                         "on_miss, speculative")
    scale: Scale = _scale_field()
    ttft_ms: Optional[Ms] = _ms_field()
    tpot_ms: Optional[Ms] = _ms_field()
    deadline_ms: Optional[Ms] = _ms_field()
    on_miss: OnMiss = _on_miss_field()
    speculative: Speculative = _speculative_field()

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, t):
        if t is not None and t != 0 and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature={t!r} is out of range")
        return t

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v is not None and not 1 <= v <= MAX_N:
            raise ValueError(f"n={v}: must be 1..{MAX_N}")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v, info):
        # as vLLM answers: options that shape a stream are refused on a request that is not one (an empty object,
        # which sets none, passes there too)
        if v is not None and v.model_fields_set and not info.data.get("stream"):
            raise ValueError("stream_options: allowed only with stream: true")
        return v

    @field_validator("best_of", check_fields=False)  # completions only
    @classmethod
    def _best_of(cls, v, info):
        if v is not None and v != (info.data.get("n") or 1):
            raise ValueError(f"best_of={v}: only equal to n is supported (no ranking of extra sequences)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        """-> ((token id, bias), ...); a key must be a token id written in decimal."""
        if v is None:
            return ()
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(v)} entries: at most {MAX_LOGIT_BIAS}")
        bad = next((k for k in v if not (k.isascii() and k.isdigit()) or len(k) > 12), None)
        if bad is not None:
            raise ValueError(f"logit_bias key {_shown(bad)}: keys are token ids (integers >= 0, as strings)")
        return tuple((int(k), b) for k, b in v.items())

    def adjustments(self) -> dict:
        """The logit adjustments and the structured output as ``SamplingParams`` keywords (null: the default)."""
        return dict(presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                    repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                    logit_bias=self.logit_bias or (), min_tokens=self.min_tokens or 0, structured=self.structured(),
                    min_p=self.min_p or 0.0, allowed_token_ids=tuple(self.allowed_token_ids or ()))

    def structured(self) -> StructuredOutput | None:
        """``response_format`` (OpenAI) or one of vLLM's ``guided_*`` -> StructuredOutput; BadField naming the field
        when it is malformed or more than one is given."""
        given = [k for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, k) is not None]
        rf = _response_format(self.response_format)
        if rf is not None:
            given.insert(0, "response_format")
        if len(given) > 1:
            raise BadField(f"{' and '.join(given)}: give at most one structured output", given[1])
        if not given:
            return None
        name = given[0]
        try:
            if name == "response_format":
                return rf
            if name == "guided_json":
                spec = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
                return StructuredOutput("json_schema", spec)
            if name == "guided_choice":
                return StructuredOutput("choice", choices=tuple(self.guided_choice))
            return StructuredOutput("regex" if name == "guided_regex" else "grammar", getattr(self, name))
        except ValueError as e:
            raise BadField(f"{name}: {e}", name) from None

    @field_validator("suffix", check_fields=False)  # completions only
    @classmethod
    def _not_supported(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported")
        return v

    def extras(self) -> dict:
        """The colm extras that were given: those inside "colm" first, the top-level ones over them."""
        ext = self.colm.model_dump(exclude_none=True) if self.colm else {}
        ext.update({k: getattr(self, k) for k in BUDGET_FIELDS if getattr(self, k) is not None})
        return ext


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Any = Field(..., description="a non-empty string, a list of token ids (integers >= 0), or a non-empty "
                                         "list of strings / token-id lists")
    max_tokens: Optional[Annotated[StrictInt, Field(ge=0)]] = Field(16, description="an integer >= 0 (default 16)")
    echo: Optional[StrictBool] = Field(False, description="true or false")
    logprobs: Optional[Union[Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)], StrictBool]] = Field(
        None, description=f"an integer 0..{MAX_LOGPROBS} (at most 1 with echo: the prompt's positions report their "
                          "most likely token only) or null")
    best_of: Optional[StrictInt] = Field(None, description="null or equal to n")
    add_special_tokens: Optional[StrictBool] = Field(True, description="true or false (true: a BOS first when the "
                                                                       "tokenizer config asks for one)")
    suffix: Optional[StrictStr] = Field(None, description="null or an empty string (insertion is not supported)")

    @field_validator("logprobs")
    @classmethod
    def _echo_logprobs(cls, v, info):
        if info.data.get("echo") and not isinstance(v, bool) and v is not None and v > 1:
            raise ValueError(f"logprobs={v} with echo: the prompt's positions report their most likely token only; "
                             "give 0 or 1")
        return v

    def num_top_logprobs(self) -> int:
        """How many of the most likely tokens each generated token reports (true counts as 1)."""
        return int(self.logprobs or 0)

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, p):
        """-> a list of prompts, each a string or a list of token ids."""
        if isinstance(p, str):
            return [_text(p, "prompt")]
        if isinstance(p, list):
            return _prompt_list(p, "prompt")
        raise ValueError(f"prompt is {_kind(p)}")


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



def _response_format(v) -> StructuredOutput | None:
    """OpenAI's ``response_format`` -> StructuredOutput (None for text or null); BadField naming the part."""
    if v is None:
        return None
    if not isinstance(v, dict) or v.get("type") not in ("text", "json_object", "json_schema"):
        kind = _shown(v.get("type")) if isinstance(v, dict) else _kind(v)
        raise BadField(f"response_format.type={kind}: allowed types are text, json_object, json_schema",
                       "response_format.type")
    if v["type"] == "text":
        return None
    if v["type"] == "json_object":
        return StructuredOutput("json_object")
    js = v.get("json_schema")
    schema = js.get("schema") if isinstance(js, dict) else None
    if not isinstance(schema, (dict, bool)):
        raise BadField("response_format.json_schema.schema: give the JSON schema as an object",
                       "response_format.json_schema.schema")
    try:
        return StructuredOutput("json_schema", json.dumps(schema))
    except ValueError as e:
        raise BadField(f"response_format.json_schema.schema: {e}", "response_format.json_schema.schema") from None


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


class TokenizeRequest(BaseModel):
    model_config = _STRICT

    prompt: StrictStr = Field(..., description="a string")
    add_special_tokens: Optional[StrictBool] = Field(True, description="true or false (true: a BOS first when the "
                                                                       "tokenizer config asks for one)")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, p):
        return _text(p, "prompt") if p else p


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    tokens: list[Annotated[StrictInt, Field(ge=0)]] = Field(..., description="a list of token ids (integers >= 0)")


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
