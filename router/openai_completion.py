"""``CompletionRequest`` (``POST /v1/completions``): its prompt (a string, a token-id list, or a batch of them),
``max_tokens``, ``echo`` and ``logprobs``, and the no-op-only ``best_of`` and ``suffix``.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from colm.router.openai_errors import _kind
from colm.router.openai_fields import MAX_LOGPROBS, _text
from colm.router.openai_sampling import SamplingRequest


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
