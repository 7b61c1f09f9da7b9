"""colm.proto.convert: SamplingParams and Budget to and from protobuf, round trips over every field with seeded
random values in the valid ranges; and colm.stopping.StopChecker, the one place the stop rules live."""

import dataclasses
import json
import random

import pytest

pytest.importorskip("google.protobuf")

from colm.proto import load_proto  # noqa: E402
from colm.proto.convert import (MAX_BUDGET_MS, MAX_STOP_CHARS, MAX_STOP_STRINGS, SEED_MAX,  # noqa: E402
                                budget_from_public, budget_to_public, sampling_from_decode, sampling_from_public,
                                sampling_to_decode, sampling_to_public)
from colm.router.policy import Budget, OnMiss  # noqa: E402
from colm.sampling import (MAX_BIAS, MAX_LOGIT_BIAS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_TEMPERATURE,  # noqa: E402
                           MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, SamplingParams)
from colm.stopping import StopChecker  # noqa: E402
from colm.structured import KINDS, StructuredOutput  # noqa: E402

public_pb2, _ = load_proto("public")
kv_pb2, _ = load_proto("kv")
SEEDS = range(300)
# a proto field -> the SamplingParams field it carries
PUBLIC_FIELDS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "seed": "seed", "stop_token_ids": "stop_token_ids", "stop": "stop_strings", "ignore_eos": "ignore_eos",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias", "min_tokens": "min_tokens",
                 "structured_output": "structured", "top_logprobs": "top_logprobs", "min_p": "min_p",
                 "allowed_token_ids": "allowed_token_ids"}
DECODE_FIELDS = {**PUBLIC_FIELDS, "stop_strings": "stop_strings"}
del DECODE_FIELDS["stop"]


def _text(rng: random.Random) -> str:
    alphabet = "ab \n.,:;<>é中🙂\u0000\ufffd"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, rng.choice([3, MAX_STOP_CHARS]))))


def random_params(rng: random.Random) -> SamplingParams:
    """Every field set at random within its valid range; floats with at most 7 significant digits (what a
    client types), which a float32 proto field carries exactly through colm.proto.convert."""
    max_new_tokens = rng.randint(1, 1 << 20)

    def f7(lo, hi):
        return float(f"{rng.uniform(lo, hi):.7g}")

    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=rng.choice([0.0, MIN_TEMPERATURE, MAX_TEMPERATURE,
                                float(f"{rng.uniform(MIN_TEMPERATURE, MAX_TEMPERATURE):.4g}")]),
        top_k=rng.choice([0, 1, rng.randint(0, 2**31 - 1)]),
        top_p=rng.choice([1.0, float(f"{rng.uniform(1e-6, 1.0):.6g}") or 1.0]),
        seed=rng.choice([None, 0, SEED_MAX, rng.randint(0, SEED_MAX)]),
        stop_token_ids=tuple(rng.randint(0, 2**31 - 1) for _ in range(rng.randint(0, 8))),
        stop_strings=tuple(_text(rng) for _ in range(rng.randint(0, MAX_STOP_STRINGS))),
        presence_penalty=rng.choice([0.0, -MAX_PENALTY, MAX_PENALTY, f7(-MAX_PENALTY, MAX_PENALTY)]),
        frequency_penalty=rng.choice([0.0, -MAX_PENALTY, MAX_PENALTY, f7(-MAX_PENALTY, MAX_PENALTY)]),
        repetition_penalty=rng.choice([1.0, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY,
                                       f7(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)]),
        logit_bias=tuple((t, rng.choice([-MAX_BIAS, MAX_BIAS, 0.0, f7(-MAX_BIAS, MAX_BIAS)]))
                         for t in rng.sample(range(2**31 - 1), rng.choice([0, 1, 5, MAX_LOGIT_BIAS]))),
        top_logprobs=rng.choice([0, 1, MAX_TOP_LOGPROBS, rng.randint(0, MAX_TOP_LOGPROBS)]),
        min_p=rng.choice([0.0, 1.0, float(f"{rng.uniform(0, 1):.6g}")]),
        allowed_token_ids=tuple(sorted(set(rng.randint(0, 2**31 - 1) for _ in range(rng.choice([0, 1, 40]))))),
        **_ends(rng, max_new_tokens))


def _ends(rng: random.Random, max_new_tokens: int) -> dict:
    """ignore_eos, min_tokens and structured output (which takes neither of the two)."""
    if rng.random() < 0.5:
        return dict(ignore_eos=rng.random() < 0.5, min_tokens=rng.choice([0, max_new_tokens,
                                                                          rng.randint(0, max_new_tokens)]))
    kind = rng.choice(KINDS)
    if kind == "choice":
        so = StructuredOutput("choice", choices=tuple(_text(rng) for _ in range(rng.randint(1, 5))))
    elif kind == "json_object":
        so = StructuredOutput("json_object")
    elif kind == "json_schema":
        so = StructuredOutput("json_schema", json.dumps({"type": "object", "title": _text(rng)}))
    else:
        so = StructuredOutput(kind, _text(rng))
    return dict(ignore_eos=False, min_tokens=0, structured=so)


def test_every_field_is_converted():
    """A new field of SamplingParams or of either message fails here until colm.proto.convert carries it."""
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    assert set(PUBLIC_FIELDS.values()) == names and set(DECODE_FIELDS.values()) == names
    assert {f.name for f in public_pb2.Sampling.DESCRIPTOR.fields} == set(PUBLIC_FIELDS)
    assert {f.name for f in kv_pb2.DecodeSampling.DESCRIPTOR.fields} == set(DECODE_FIELDS)
    assert {f.name for f in dataclasses.fields(Budget)} == {"ttft_ms", "tpot_ms", "deadline_ms", "on_miss"}
    assert {f.name for f in public_pb2.LatencyBudget.DESCRIPTOR.fields} == {"ttft_ms", "tpot_ms", "deadline_ms",
                                                                           "on_miss"}


@pytest.mark.parametrize("seed", SEEDS)
def test_sampling_round_trips(seed):
    rng = random.Random(seed)
    p = random_params(rng)
    # params -> proto -> params, through the wire bytes, both messages
    pub = public_pb2.Sampling.FromString(sampling_to_public(p).SerializeToString())
    assert sampling_from_public(pub, default_max_new_tokens=7) == p
    dec = kv_pb2.DecodeSampling.FromString(sampling_to_decode(p).SerializeToString())
    assert sampling_from_decode(dec) == p
    # proto -> params -> proto: the message a client sent is the one the router forwards
    assert sampling_to_public(sampling_from_public(pub, 7)) == pub
    assert sampling_to_decode(sampling_from_decode(dec)) == dec
    # and the router's hop: public -> params -> DecodeSampling -> params
    assert sampling_from_decode(sampling_to_decode(sampling_from_public(pub, 7))) == p


def test_public_defaults_and_float32():
    s = sampling_from_public(public_pb2.Sampling(), default_max_new_tokens=16)
    assert s == SamplingParams(max_new_tokens=16, top_p=1.0)  # 0 = the router's default; top_p 0 = off
    assert sampling_from_decode(kv_pb2.DecodeSampling(max_new_tokens=3)).top_p == 1.0
    # float32 on the wire: 0.01 is not refused as below the minimum, 0.7 samples as 0.7 on every side
    s = sampling_from_public(public_pb2.Sampling(temperature=MIN_TEMPERATURE, top_p=0.7), 4)
    assert s.temperature == MIN_TEMPERATURE and s.top_p == 0.7
    assert sampling_from_decode(sampling_to_decode(SamplingParams(temperature=0.7))).temperature == 0.7


@pytest.mark.parametrize("field, value, path", [
    ("temperature", 1e-3, "sampling.temperature"), ("temperature", float("nan"), "sampling.temperature"),
    ("top_p", 1.5, "sampling.top_p"), ("max_new_tokens", -1, "sampling.max_new_tokens"),
    ("seed", -1, "sampling.seed"), ("stop", [""], "sampling.stop"), ("stop", ["x"] * 17, "sampling.stop"),
    ("stop", ["x" * 257], "sampling.stop"), ("stop_token_ids", [-1], "sampling.stop_token_ids"),
    ("stop_token_ids", [1] * 1025, "sampling.stop_token_ids"), ("presence_penalty", 2.5, "sampling.presence_penalty"),
    ("frequency_penalty", float("inf"), "sampling.frequency_penalty"),
    ("repetition_penalty", 1e-3, "sampling.repetition_penalty"), ("logit_bias", {-1: 1.0}, "sampling.logit_bias"),
    ("logit_bias", {5: 100.5}, "sampling.logit_bias"), ("logit_bias", {i: 1.0 for i in range(1025)}, "sampling.logit_bias"),
    ("min_tokens", -1, "sampling.min_tokens"), ("min_tokens", 17, "sampling.min_tokens"),
    ("top_logprobs", -1, "sampling.top_logprobs"), ("top_logprobs", 21, "sampling.top_logprobs"),
    ("min_p", -0.5, "sampling.min_p"), ("min_p", 1.5, "sampling.min_p"), ("min_p", float("nan"), "sampling.min_p"),
    ("allowed_token_ids", [-3], "sampling.allowed_token_ids"),
    ("allowed_token_ids", [1] * 65537, "sampling.allowed_token_ids"),
    ("structured_output", {}, "sampling.structured_output"),
    ("structured_output", {"json_object": False}, "sampling.structured_output"),
    ("structured_output", {"json_schema": "[1"}, "sampling.structured_output"),
    ("structured_output", {"regex": "x" * 65537}, "sampling.structured_output"),
    ("structured_output", {"choice": {"choices": []}}, "sampling.structured_output"),
    ("structured_output", {"choice": {"choices": ["a"] * 257}}, "sampling.structured_output"),
    ("structured_output", {"regex": "a", "ignore_eos": True}, "sampling.structured_output")])
def test_public_errors_name_the_proto_path(field, value, path):
    s = public_pb2.Sampling()
    if isinstance(value, list):
        getattr(s, field).extend(value)
    elif field == "structured_output":
        s.ignore_eos = value.pop("ignore_eos", False)
        s.structured_output.SetInParent()
        for k, v in value.items():
            if k == "choice":
                s.structured_output.choice.choices.extend(v["choices"])
            else:
                setattr(s.structured_output, k, v)
    elif isinstance(value, dict):
        getattr(s, field).update(value)
    else:
        setattr(s, field, value)
    with pytest.raises(ValueError, match=f"^{path}"):
        sampling_from_public(s, 16)


@pytest.mark.parametrize("seed", SEEDS)
def test_budget_round_trips(seed):
    rng = random.Random(seed)

    def ms():
        return rng.choice([None, MAX_BUDGET_MS, 1e-3, rng.uniform(1e-3, MAX_BUDGET_MS)])

    b = Budget(ttft_ms=ms(), tpot_ms=ms(), deadline_ms=ms(), on_miss=rng.choice(list(OnMiss)))
    msg = public_pb2.LatencyBudget.FromString(budget_to_public(b).SerializeToString())
    assert budget_from_public(msg) == b
    assert budget_to_public(budget_from_public(msg)) == msg


@pytest.mark.parametrize("field, value", [("ttft_ms", -1.0), ("tpot_ms", float("inf")),
                                          ("deadline_ms", MAX_BUDGET_MS * 2), ("on_miss", 7)])
def test_budget_errors_name_the_proto_path(field, value):
    with pytest.raises(ValueError, match=f"^budget.{field}="):
        budget_from_public(public_pb2.LatencyBudget(**{field: value}))


def test_decode_refuses_a_seed_it_cannot_carry():
    with pytest.raises(ValueError, match="seed=-1"):
        sampling_to_decode(SamplingParams(seed=-1))


# ---------------------------------------------------------------- the stop rules
def _decode(ids):
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def test_stop_checker_rules_and_order():
    p = SamplingParams(max_new_tokens=5, stop_token_ids=(9,), stop_strings=("lo w",))
    c = StopChecker(p, eos_id=257, decode=_decode)
    assert [c.add(t) for t in b"hel"] == ["", "", ""] and c.detok.text == "hel"
    assert c.add(ord("l")) == "" and c.delta == "l"
    assert c.add(ord("o")) == "length"  # max_new_tokens comes after stop tokens and strings, and does end it
    assert StopChecker(p, 257).add(257) == "stop"  # EOS
    assert StopChecker(dataclasses.replace(p, ignore_eos=True), 257).add(257) == ""
    assert StopChecker(p, -1).add(9) == "stop" and StopChecker(p, None).add(3) == ""
    c = StopChecker(dataclasses.replace(p, max_new_tokens=10), 257, _decode)
    assert [c.add(t) for t in b"hello w"] == [""] * 6 + ["stop"]  # the string spans tokens
    # without a decode function there is no text: stop strings are left to whoever has it (the router)
    c = StopChecker(dataclasses.replace(p, max_new_tokens=10), 257)
    assert [c.add(t) for t in b"hello w"] == [""] * 7 and c.finish() == ""


def test_stop_checker_matches_a_full_text_search():
    """Stop at the same token as `any(s in decode(out))`, for random byte streams and stop strings."""
    rng = random.Random(0)
    for _ in range(200):
        out = [rng.choice(b"ab \xc3\xa9") for _ in range(40)]
        stops = tuple({bytes(rng.choice(b"ab ") for _ in range(rng.randint(1, 3))).decode()
                       for _ in range(rng.randint(1, 3))})
        c = StopChecker(SamplingParams(max_new_tokens=40, stop_strings=stops), None, _decode)
        got = next((i for i, t in enumerate(out) if c.add(t)), None)
        want = next((i for i in range(len(out)) if any(s in _decode(out[:i + 1]) for s in stops)), None)
        assert got == (want if want is not None else len(out) - 1), (out, stops)
