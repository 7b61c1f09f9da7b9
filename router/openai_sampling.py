"""``SamplingRequest``: the fields ``/v1/completions`` and ``/v1/chat/completions`` share, and their conversion:
``adjustments`` (the logit adjustments and structured output as ``SamplingParams`` keywords), ``structured``
(OpenAI's ``response_format`` or one of vLLM's ``guided_*`` -> ``StructuredOutput``) and ``extras`` (the colm
extras, inside ``"colm"`` or at the top level).
"""

from __future__ import annotations

import json
from typing import Any, Annotated, Optional, Union

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, field_validator

# The limits of the gRPC API, imported from there so that both fronts accept the same requests.
from colm.decode_worker.prefix_cache import MAX_CACHE_SALT
from colm.proto.convert import MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SEED_MAX
from colm.router.openai_errors import BadField, _kind, _shown
from colm.router.openai_fields import (BUDGET_FIELDS, MAX_N, _STRICT, ColmExtras, Ms, OnMiss, Penalty, Scale,
                                       Speculative, StreamOptions, _ms_field, _on_miss_field, _scale_field,
                                       _speculative_field)
from colm.sampling import (MAX_ALLOWED_TOKEN_IDS, MAX_BIAS, MAX_LOGIT_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY,
                           MAX_TEMPERATURE, MIN_REPETITION_PENALTY, MIN_TEMPERATURE)
from colm.structured import StructuredOutput


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
