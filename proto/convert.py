"""Request types to and from protobuf, in one module: ``SamplingParams`` <-> ``colm.v1.Sampling`` (public API)
and ``colm.v1.DecodeSampling`` (router -> decode worker), ``Budget`` <-> ``colm.v1.LatencyBudget``.

A request's sampling parameters cross the wire twice: client -> router (``sampling_from_public``, which checks
the public API's limits and names a bad field by its proto path, ``sampling.temperature``) and router ->
decode worker (``sampling_to_decode`` / ``sampling_from_decode``). Both directions of both messages live
here, so a new sampling field is added in one place (and ``tests/test_proto_convert.py`` fails until it is).

Proto floats are 32-bit: a temperature of 0.7 arrives as 0.699999988. ``_from_f32`` reads one back as the
shortest decimal that is the same float32 (0.7), so params -> proto -> params is exact for any value with at
most 7 significant digits, the router and the decode worker sample with the same numbers as the reference
generator, and a client's 0.01 is not refused as below the minimum temperature.

Only service modules (the router's gRPC servicer and backend, the decode worker's service) import this.
"""

from __future__ import annotations

import math
import re

import numpy as np

from colm.proto import load_proto
from colm.sampling import MAX_ALLOWED_TOKEN_IDS, MAX_LOGIT_BIAS, SamplingParams
from colm.structured import MAX_CHOICES, StructuredOutput

public_pb2, _ = load_proto("public")
kv_pb2, _ = load_proto("kv")

# Limits of the public API (documented in public.proto). A budget above an hour is a client bug: a 1e38 ms
# deadline overflowed the workers' call timeouts into an immediate DEADLINE_EXCEEDED.
MAX_BUDGET_MS = 3_600_000.0
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
SEED_MAX = 2**63 - 1  # the workers take an unsigned 64-bit seed; negative seeds are refused, not wrapped
# SamplingParams names its fields in Python; a gRPC client knows them by their proto paths
SAMPLING_PATHS = {"max_new_tokens": "sampling.max_new_tokens", "temperature": "sampling.temperature",
                  "top_k": "sampling.top_k", "top_p": "sampling.top_p", "seed": "sampling.seed",
                  "stop_token_ids": "sampling.stop_token_ids", "stop_strings": "sampling.stop",
                  "ignore_eos": "sampling.ignore_eos", "presence_penalty": "sampling.presence_penalty",
                  "frequency_penalty": "sampling.frequency_penalty",
                  "repetition_penalty": "sampling.repetition_penalty",
                  "logit_bias": "sampling.logit_bias", "min_tokens": "sampling.min_tokens",
                  "structured_output": "sampling.structured_output", "top_logprobs": "sampling.top_logprobs",
                  "min_p": "sampling.min_p", "allowed_token_ids": "sampling.allowed_token_ids"}


def _from_f32(v: float) -> float:
    """A proto float field's value as the shortest decimal that is the same float32."""
    return float(str(np.float32(v)))


# ---------------------------------------------------------------- public Sampling (client -> router)
def sampling_from_public(s, default_max_new_tokens: int) -> SamplingParams:
    """``colm.v1.Sampling`` -> SamplingParams; ValueError naming the field by its proto path.

    ``max_new_tokens`` 0 is ``default_max_new_tokens`` (the router's default); ``top_p`` 0 is 1 (off)."""
    if len(s.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_CHARS for x in s.stop):
        raise ValueError(f"sampling.stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                         f"characters each")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"sampling.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids "
                         f"(got {len(s.stop_token_ids)})")
    if s.HasField("seed") and s.seed < 0:
        raise ValueError(f"sampling.seed={s.seed}: must be in [0, {SEED_MAX}]")
    if s.max_new_tokens < 0:
        raise ValueError(f"sampling.max_new_tokens={s.max_new_tokens}: must be >= 0 (0 = the router's default)")
    if s.min_tokens < 0:
        raise ValueError(f"sampling.min_tokens={s.min_tokens}: must be >= 0")
    try:
        return SamplingParams(max_new_tokens=s.max_new_tokens or default_max_new_tokens,
                              temperature=_from_f32(s.temperature), top_k=s.top_k,
                              top_p=_from_f32(s.top_p) if s.top_p else 1.0,
                              seed=s.seed if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
                              stop_strings=tuple(s.stop), ignore_eos=s.ignore_eos, **_adjustments(s))
    except ValueError as e:
        msg = str(e)
        name = re.match(r"\w+", msg)
        if name and name.group() in SAMPLING_PATHS:
            msg = SAMPLING_PATHS[name.group()] + msg[name.end():]
        raise ValueError(msg) from None


def _adjustments(s) -> dict:
    """The logit adjustments of a ``Sampling`` or ``DecodeSampling`` as SamplingParams' keywords (a
    ``repetition_penalty`` of 0 is 1, off; ``logit_bias`` in token order)."""
    if len(s.logit_bias) > MAX_LOGIT_BIAS:  # checked before the map becomes a tuple of up to 4 MiB of pairs
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} token ids (got {len(s.logit_bias)})")
    if len(s.allowed_token_ids) > MAX_ALLOWED_TOKEN_IDS:
        raise ValueError(f"allowed_token_ids: at most {MAX_ALLOWED_TOKEN_IDS} ids (got {len(s.allowed_token_ids)})")
    return dict(presence_penalty=_from_f32(s.presence_penalty), frequency_penalty=_from_f32(s.frequency_penalty),
                repetition_penalty=_from_f32(s.repetition_penalty) if s.repetition_penalty else 1.0,
                logit_bias=tuple((int(t), _from_f32(b)) for t, b in sorted(s.logit_bias.items())),
                min_tokens=int(s.min_tokens), structured=structured_from_proto(s.structured_output)
                if s.HasField("structured_output") else None, top_logprobs=int(s.top_logprobs),
                min_p=_from_f32(s.min_p), allowed_token_ids=tuple(s.allowed_token_ids))


def structured_from_proto(m) -> StructuredOutput:
    """``colm.v1.StructuredOutput`` -> StructuredOutput; ValueError when no kind is set."""
    kind = m.WhichOneof("kind")
    if kind is None:
        raise ValueError("structured_output: set one of json_schema, json_object, regex, grammar, choice")
    if kind == "json_object":
        if not m.json_object:
            raise ValueError("structured_output: json_object must be true when set")
        return StructuredOutput("json_object")
    if kind == "choice":
        if len(m.choice.choices) > MAX_CHOICES:  # before copying up to 4 MiB of strings
            raise ValueError(f"structured_output (choice): give 1..{MAX_CHOICES} strings (got {len(m.choice.choices)})")
        return StructuredOutput("choice", choices=tuple(m.choice.choices))
    return StructuredOutput(kind, getattr(m, kind))


def structured_to_proto(so: StructuredOutput):
    m = public_pb2.StructuredOutput()
    if so.kind == "json_object":
        m.json_object = True
    elif so.kind == "choice":
        m.choice.choices.extend(so.choices)
    else:
        setattr(m, so.kind, so.spec)
    return m


def _sampling_msg(cls, p: SamplingParams, stop_field: str):
    """SamplingParams -> ``cls`` (``Sampling`` or ``DecodeSampling``, which name the stop strings differently)."""
    s = cls(max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos, presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
            logit_bias=dict(p.logit_bias), min_tokens=p.min_tokens, top_logprobs=p.top_logprobs, min_p=p.min_p,
            allowed_token_ids=p.allowed_token_ids,
            **{stop_field: p.stop_strings})
    if p.structured is not None:
        s.structured_output.CopyFrom(structured_to_proto(p.structured))
    if p.seed is not None:
        s.seed = p.seed
    return s


def sampling_to_public(p: SamplingParams):
    """SamplingParams -> ``colm.v1.Sampling`` (what a client sends). ``max_new_tokens`` 0 has no public form:
    0 there means the router's default."""
    return _sampling_msg(public_pb2.Sampling, p, "stop")


# ---------------------------------------------------------------- DecodeSampling (router -> decode worker)
def sampling_to_decode(p: SamplingParams):
    """SamplingParams -> ``colm.v1.DecodeSampling``. The stop strings go too: the router clears them where it
    checks them itself (``colm.stopping``)."""
    if p.seed is not None and p.seed < 0:
        raise ValueError(f"seed={p.seed}: the decode worker takes an unsigned 64-bit seed")
    return _sampling_msg(kv_pb2.DecodeSampling, p, "stop_strings")


def sampling_from_decode(s) -> SamplingParams:
    """``colm.v1.DecodeSampling`` -> SamplingParams (``top_p`` 0 is 1, off); ValueError on a bad value."""
    return SamplingParams(max_new_tokens=int(s.max_new_tokens), temperature=_from_f32(s.temperature),
                          top_k=int(s.top_k), top_p=_from_f32(s.top_p) if s.top_p > 0 else 1.0,
                          seed=int(s.seed) if s.HasField("seed") else None, stop_token_ids=tuple(s.stop_token_ids),
                          stop_strings=tuple(s.stop_strings), ignore_eos=bool(s.ignore_eos), **_adjustments(s))


# ---------------------------------------------------------------- LatencyBudget (client -> router)
def _budget_ms(b, name: str) -> float | None:
    v = getattr(b, name)
    if not math.isfinite(v) or not 0 <= v <= MAX_BUDGET_MS:
        raise ValueError(f"budget.{name}={v!r}: must be a number of milliseconds in [0, {MAX_BUDGET_MS:.0f}] "
                         f"(0 = none)")
    return v or None


def budget_from_public(b):
    """``colm.v1.LatencyBudget`` -> ``colm.router.policy.Budget`` (0 ms = none); ValueError naming the field."""
    from colm.router.policy import Budget, OnMiss  # router code, imported on use: the decode service needs none

    if b.on_miss not in public_pb2.OnMiss.values():
        raise ValueError(f"budget.on_miss={b.on_miss}: unknown; allowed: "
                         f"{', '.join(f'{n} ({v})' for n, v in public_pb2.OnMiss.items())}")
    return Budget(ttft_ms=_budget_ms(b, "ttft_ms"), tpot_ms=_budget_ms(b, "tpot_ms"),
                  deadline_ms=_budget_ms(b, "deadline_ms"),
                  on_miss=OnMiss.REJECT if b.on_miss == public_pb2.ON_MISS_REJECT else OnMiss.DEGRADE)


def budget_to_public(budget):
    """``Budget`` -> ``colm.v1.LatencyBudget`` (None = 0 ms)."""
    from colm.router.policy import OnMiss

    return public_pb2.LatencyBudget(ttft_ms=budget.ttft_ms or 0.0, tpot_ms=budget.tpot_ms or 0.0,
                                    deadline_ms=budget.deadline_ms or 0.0,
                                    on_miss=public_pb2.ON_MISS_REJECT if budget.on_miss is OnMiss.REJECT
                                    else public_pb2.ON_MISS_DEGRADE)
