"""Fuzz the public gRPC service (``colm.v1.Colm``) of a router with real prefill and decode workers.

The request types come from the running router's server reflection (their descriptors, not the generated
classes): every field of every method's request message, nested ones included, gets out-of-range, NaN,
infinite, huge, negative, unknown-enum, huge-repeated and invalid-UTF-8 values, one at a time and then in
seeded random combinations; raw byte garbage (random bytes, corrupted and truncated encodings, invalid
UTF-8 in every string field, broken varints and tags) goes through a generic channel with identity
serializers. A few calls carry no API key. While the fuzz runs, a well-formed greedy client checks its
tokens against a run made before. Bounded: ~1300 calls, well under a minute on 2 CPUs.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import random
import threading
import time
from collections import Counter

import grpc
import pytest

pytest.importorskip("colm.decode_worker.service")
pytest.importorskip("grpc_reflection")

from google.protobuf import descriptor_pool, message_factory  # noqa: E402
from google.protobuf.descriptor import FieldDescriptor as F  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase  # noqa: E402

from colm.client import Client  # noqa: E402
from colm.kv_wire import _varint  # noqa: E402
from test_grpc_validation import Cluster  # noqa: E402

API_KEY = "fuzz-api-key-0123456789"
SEED = 20261203
NUM_STRUCTURED = 1000  # calls built from the descriptors (the one-field pass, then random combinations)
NUM_RAW = 300  # raw byte payloads
TIME_LIMIT_S = 75.0
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.NOT_FOUND}  # UpdateRequest for an id nothing runs under
GREEDY_PROMPT = "The import statement"

FLOATS = [math.nan, -math.nan, math.inf, -math.inf, -1.0, -0.0, 5e-324, 1e-45, 1e-30, 0.005, 0.5, 1.0, 1.5, 100.0,
          101.0, 3_600_000.0, 3_600_001.0, 3.4e38, 1e38, 1e308]
INT32 = [-1, -(2**31), 2**31 - 1, 0, 1, 2, 3, 1023, 1025, 1 << 20]
INT64 = [-1, -(2**63), 2**63 - 1, 0, 7, 2**32]
UINT = [0, 1, 2**32 - 1]
STRINGS = ["", "a b", "\x00\x01", "\n", "é" * 50, "\u202e\ufeff", "x" * 129, "ok-id_1.2", "s" * 300, "z" * 100_000]
BYTES = [b"", b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00" * 16, b"hi", b"x" * 1025,
         b"x" * 2000, bytes(range(256)), b"y" * (5 << 20), b"w" * (10 << 20)]
HUGE = 100_000  # payloads above this size are left out of the random combinations


def _size(v) -> int:
    return len(v) if isinstance(v, (str, bytes, list, dict)) else 1


def _is_map(fd) -> bool:
    return fd.type == F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry


def scalar_values(fd) -> list:
    if fd.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return FLOATS
    if fd.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return INT32
    if fd.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return INT64
    if fd.type in (F.TYPE_UINT32, F.TYPE_FIXED32, F.TYPE_UINT64, F.TYPE_FIXED64):
        return UINT
    if fd.type == F.TYPE_BOOL:
        return [True, False]
    if fd.type == F.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return known + [-1, max(known) + 1, 99, 2**31 - 1]
    if fd.type == F.TYPE_STRING:
        return STRINGS
    if fd.type == F.TYPE_BYTES:
        return BYTES
    raise AssertionError(f"no fuzz values for {fd.full_name} (type {fd.type})")


def field_values(fd) -> list:
    """Candidate values of one leaf field: scalars, lists for a repeated field, dicts for a map."""
    if _is_map(fd):
        keys = scalar_values(fd.message_type.fields_by_name["key"])
        values = scalar_values(fd.message_type.fields_by_name["value"])
        return [{}, {k: v for k, v in zip(keys, values)}, {keys[-1]: values[0]}, {k: 1.0 for k in range(1025)},
                {k: values[len(values) // 2] for k in range(100_000)}]
    vals = scalar_values(fd)
    if not fd.is_repeated:
        return vals
    small = [v for v in vals if _size(v) < 1000]
    one = small[len(small) // 2]
    out = [[], [one], small, [one] * 17, [one] * 1025, [one] * 100_000]
    if fd.type not in (F.TYPE_STRING, F.TYPE_BYTES, F.TYPE_BOOL):
        out.append([one] * 1_200_000)  # over router.max_message_bytes, under gRPC's own limit
    return out


def leaves(desc, prefix=()):
    """Paths (tuples of field descriptors) to every scalar or repeated-scalar field, nested messages walked."""
    for fd in desc.fields:
        if fd.type == F.TYPE_MESSAGE and not fd.is_repeated:
            yield from leaves(fd.message_type, prefix + (fd,))
        else:
            yield prefix + (fd,)


def mutate(msg, path, value) -> bool:
    """Set the field at ``path`` of ``msg`` to ``value``; False if the client library refuses it."""
    *parents, leaf = path
    for fd in parents:
        msg = getattr(msg, fd.name)
    try:
        if _is_map(leaf):
            field = getattr(msg, leaf.name)
            field.clear()
            field.update(value)
        elif leaf.is_repeated:
            field = getattr(msg, leaf.name)
            del field[:]
            field.extend(value)
        else:
            setattr(msg, leaf.name, value)
    except (TypeError, ValueError, OverflowError):  # e.g. 2**63 - 1 into an int32: not the server's business
        return False
    return True


def varint(n: int) -> bytes:
    return _varint(n & (1 << 64) - 1)  # a negative int as protobuf writes it: two's complement in 64 bits


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def nested(path, leaf_bytes: bytes) -> bytes:
    """The encoding of ``leaf_bytes`` (the leaf field's own tag and value) inside its parent messages."""
    for fd in reversed(path[:-1]):
        leaf_bytes = tag(fd.number, 2) + varint(len(leaf_bytes)) + leaf_bytes
    return leaf_bytes


def raw_payloads(rng: random.Random, methods, bases, n: int):
    """(method, payload bytes) of ``n`` raw requests: hand-made invalid encodings, then random garbage."""
    out = []
    for name, m in methods.items():
        for path in leaves(m.input_type):
            leaf = path[-1]
            if leaf.type == F.TYPE_STRING:  # proto3 strings must be UTF-8: a parse failure
                out.append((name, nested(path, tag(leaf.number, 2) + b"\x02\xff\xfe")))
            out.append((name, nested(path, tag(leaf.number, 0) + b"\xff" * 10 + b"\x01")))  # an 11-byte varint
            out.append((name, nested(path, tag(leaf.number, 2) + varint(2**31))))  # length past the end
            out.append((name, nested(path, tag(leaf.number, rng.choice((1, 3, 5))) + b"\x01")))  # wrong wire type
            if leaf.type in (F.TYPE_INT32, F.TYPE_ENUM):  # a 64-bit varint in a 32-bit field
                out.append((name, nested(path, tag(leaf.number, 0) + varint(2**40 + 5))))
        out.append((name, b""))
        out.append((name, b"\x0b" * 200))  # unterminated groups
        out.append((name, b"\x00"))  # field number 0
    names = list(methods)
    while len(out) < n:
        name = rng.choice(names)
        kind = rng.random()
        if kind < 0.4 or name not in bases:
            payload = rng.randbytes(rng.randint(1, 64))
        else:
            good = bytearray(bases[name].SerializeToString())
            if kind < 0.7 and good:
                for _ in range(rng.randint(1, 3)):
                    good[rng.randrange(len(good))] = rng.randrange(256)
            elif good:
                del good[rng.randrange(len(good)):]
            payload = bytes(good) + (rng.randbytes(rng.randint(0, 8)) if rng.random() < 0.3 else b"")
        out.append((name, payload))
    return out[:n]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(num_blocks=256, api_key=API_KEY, poll_interval_s=0.5, max_running=16, max_queued=64)
    yield c
    c.stop()


def reflected_methods(addr: str):
    """The Colm service's methods as server reflection describes them, with message classes built from it."""
    channel = grpc.insecure_channel(addr)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("colm.v1.Colm")
    methods = {m.name: m for m in service.methods}
    classes = {m.name: message_factory.GetMessageClass(m.input_type) for m in service.methods}
    return channel, methods, classes


def test_fuzz_public_grpc(cluster, caplog):
    caplog.set_level(logging.WARNING)
    rng = random.Random(SEED)
    md_ok = (("authorization", f"Bearer {API_KEY}"),)
    with Client(cluster.addr, api_key=API_KEY) as c:
        reference = {s: c.complete(GREEDY_PROMPT, max_new_tokens=12, scale=s)["token_ids"] for s in (1, 2)}
    refl_channel, methods, classes = reflected_methods(cluster.addr)
    refl_channel.close()
    assert set(methods) == {"Generate", "Complete", "Tokenize", "ListScales", "Health", "UpdateRequest"}

    def base(name):
        msg = classes[name]()
        if name in ("Generate", "Complete"):
            msg.text = b"fuzz me"
            msg.sampling.max_new_tokens = 2
            msg.budget.deadline_ms = 20_000
        elif name == "Tokenize":
            msg.text = b"ab"
        elif name == "UpdateRequest":  # no request runs under this id: NOT_FOUND, or INVALID_ARGUMENT when mutated
            msg.request_id = "fuzz-nobody"
            msg.scale = 1
        return msg

    bases = {name: base(name) for name in methods}
    # structured: every (leaf, value) once, then random combinations of 1-4 of them (big payloads left out)
    structured = []
    for name, m in methods.items():
        for path in leaves(m.input_type):
            for value in field_values(path[-1]):
                msg = base(name)
                if mutate(msg, path, value):
                    structured.append((name, msg))
    singles = len(structured)
    choices = [(name, path, v) for name, m in methods.items() for path in leaves(m.input_type)
               for v in field_values(path[-1]) if _size(v) <= HUGE]
    while len(structured) < NUM_STRUCTURED:
        name, path, value = rng.choice(choices)
        msg = base(name)
        mutate(msg, path, value)
        for _ in range(rng.randint(0, 3)):
            n2, p2, v2 = rng.choice(choices)
            if n2 == name:
                mutate(msg, p2, v2)
        structured.append((name, msg))
    calls = [(name, msg.SerializeToString()) for name, msg in structured]
    calls += raw_payloads(rng, methods, bases, NUM_RAW)
    rng.shuffle(calls)
    keyless = set(rng.sample(range(len(calls)), 40))  # no key or a wrong one: UNAUTHENTICATED whatever they hold

    channel = grpc.insecure_channel(cluster.addr, options=[("grpc.max_send_message_length", 32 << 20),
                                                           ("grpc.max_receive_message_length", 32 << 20)])
    stubs = {name: (channel.unary_stream if m.server_streaming else channel.unary_unary)(f"/colm.v1.Colm/{name}")
             for name, m in methods.items()}
    grpc_limit = 2 * cluster.bg.router.cfg.max_message_bytes + (1 << 20)  # colm.router.grpc_server.start_grpc
    histogram: Counter = Counter()
    lock = threading.Lock()
    bad: list = []
    stop = threading.Event()
    greedy = {"runs": 0, "mismatch": []}

    def one(i: int, name: str, payload: bytes) -> None:
        keyless_call = i in keyless
        md = md_ok if not keyless_call else ((("authorization", "Bearer wrong-key"),) if i % 2 else ())
        try:
            r = stubs[name](payload, metadata=md, timeout=30)
            if methods[name].server_streaming:
                r = list(r)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        except Exception as e:  # noqa: BLE001 - a client-side crash is a finding too
            code = None
            bad.append((name, f"{type(e).__name__}: {e}", payload[:80]))
        with lock:
            histogram[name, code.name if code else "CRASH"] += 1
            # gRPC itself refuses a message over its receive limit, before any interceptor sees it
            want_keyless = (grpc.StatusCode.RESOURCE_EXHAUSTED if len(payload) > grpc_limit
                            else grpc.StatusCode.UNAUTHENTICATED)
            if code not in ALLOWED or (keyless_call and code != want_keyless) or \
                    (code == grpc.StatusCode.NOT_FOUND and name != "UpdateRequest"):
                bad.append((name, code, "keyless" if keyless_call else "", payload[:80]))

    def greedy_client() -> None:
        with Client(cluster.addr, api_key=API_KEY) as c:
            while not stop.is_set():
                for s in (1, 2):
                    got = c.complete(GREEDY_PROMPT, max_new_tokens=12, scale=s)["token_ids"]
                    greedy["runs"] += 1
                    if got != reference[s]:
                        greedy["mismatch"].append((s, got))

    t0 = time.monotonic()
    sent = 0
    with cf.ThreadPoolExecutor(1) as g:
        greedy_done = g.submit(greedy_client)
        with cf.ThreadPoolExecutor(4) as pool:
            for i, (name, payload) in enumerate(calls):
                if time.monotonic() - t0 > TIME_LIMIT_S:
                    break
                pool.submit(one, i, name, payload)
                sent += 1
        stop.set()
        greedy_done.result(timeout=120)
    channel.close()
    elapsed = time.monotonic() - t0
    print(f"\nfuzz: {sent} calls ({singles} one-field, {NUM_STRUCTURED - singles} combined, {NUM_RAW} raw; "
          f"{len(keyless)} keyless) in {elapsed:.1f} s; greedy completions alongside: {greedy['runs']}")
    for (name, code), n in sorted(histogram.items()):
        print(f"  {name:<10} {code:<20} {n}")
    assert sent >= 1000 and sum(histogram.values()) == sent, (sent, TIME_LIMIT_S)
    assert not bad, bad[:10]
    assert greedy["runs"] >= 2 and not greedy["mismatch"], greedy
    # the router logged no error (no traceback, no "Task exception was never retrieved")
    errors = [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    # the workers are alive and healthy, and every reservation the fuzz made is back in the pool
    assert cluster.workers_alive()
    assert cluster.settle() == 256
    with Client(cluster.addr, api_key=API_KEY) as c:
        h = c.health()
        assert h["serving"] and all(w["healthy"] for w in h["workers"]), h
        for s in (1, 2):
            assert c.complete(GREEDY_PROMPT, max_new_tokens=12, scale=s)["token_ids"] == reference[s]
