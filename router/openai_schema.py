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

Modules: ``openai_fields`` (shared field types, limits, the colm extras), ``openai_sampling`` (the shared
``SamplingRequest`` and its conversion), ``openai_completion``, ``openai_chat``, ``openai_errors`` (``BadField``,
``parse``); this one re-exports them and holds the tokenizer endpoints' models.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr, field_validator

from colm.proto.convert import MAX_BUDGET_MS
from colm.router.openai_chat import ROLES, ChatCompletionRequest
from colm.router.openai_completion import CompletionRequest
from colm.router.openai_errors import BadField, bad_field, parse
from colm.router.openai_fields import BUDGET_FIELDS, MAX_LOGPROBS, MAX_N, _STRICT, ColmExtras, StreamOptions, _text
from colm.router.openai_sampling import SamplingRequest

__all__ = ["BUDGET_FIELDS", "MAX_BUDGET_MS", "MAX_LOGPROBS", "MAX_N", "ROLES", "BadField", "ChatCompletionRequest",
           "ColmExtras", "CompletionRequest", "DetokenizeRequest", "SamplingRequest", "StreamOptions",
           "TokenizeRequest", "bad_field", "parse"]


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
