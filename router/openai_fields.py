"""Field types and limits shared by the OpenAI request models: the colm extras (``ColmExtras``: scale and latency
budget, also accepted at the top level), ``stream_options``, and the check of a non-empty, valid-Unicode string.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

# The limits of the gRPC API, imported from there so that both fronts accept the same requests.
from colm.decode_worker.config import MAX_GAMMA
from colm.proto.convert import MAX_BUDGET_MS
from colm.sampling import MAX_PENALTY, MAX_TOP_LOGPROBS

MAX_LOGPROBS = MAX_TOP_LOGPROBS  # the most likely tokens reported per generated token
MAX_N = 16  # choices per prompt (n): each is a sequence of its own, sharing the prompt's cached K/V

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


def _text(s: str, where: str) -> str:
    if not s:
        raise ValueError(f"{where} is an empty string")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return s
