"""Shared setup of the engine and KV hand-off tests: a tiny CoLM-Air checkpoint, prompts, and the checks that a
decode worker's block pool is fully free again (in this process, or over gRPC for a worker in a child)."""

from __future__ import annotations

import contextlib
import time

import torch

from colm import checkpoint
from colm.prefill_worker.sinks import NullKVSink
from conftest import make_model

TOKEN = "test-cluster-token"


def assert_pool_free(engine, timeout: float = 15.0) -> None:
    """A ``DecodeEngine`` of this process: every block free (waits for a grace period or a late free) and no
    request left."""
    end = time.monotonic() + timeout
    while (engine.pool.num_free != engine.pool.num_blocks or engine._requests) and time.monotonic() < end:
        time.sleep(0.02)
    assert engine.pool.num_free == engine.pool.num_blocks and not engine._requests, \
        (engine.pool.num_free, engine.pool.num_blocks, sorted(engine._requests))


def wait_pool_free(stub, timeout: float = 10.0):
    """A decode worker behind ``stub`` (a ``DecodeWorkerStub``): its ``DecodeStats`` once every block is free, or
    the last ones when ``timeout`` has passed (the caller asserts on them)."""
    from colm.proto import load_proto
    from colm.proto.rpc import auth_metadata

    kv_pb2, _ = load_proto("kv")
    end = time.monotonic() + timeout
    while True:
        s = stub.Stats(kv_pb2.DecodeStatsRequest(), metadata=auth_metadata(TOKEN), timeout=5)
        if s.num_free_blocks == s.num_blocks or time.monotonic() > end:
            return s
        time.sleep(0.05)


def save_tiny_air(path, name: str = "tiny-air"):
    model = make_model(name)
    checkpoint.save(model, path)
    return model


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def middle_stop(text: str) -> str:
    """Two characters first found in the middle of ``text`` (without U+FFFD: random bytes decode to some),
    as a stop string that ends a generation partway."""
    for a in range(len(text) // 3, len(text) - 2):
        stop = text[a:a + 2]
        if "\ufffd" not in stop and text.find(stop) == a:
            return stop
    raise AssertionError(f"no stop string candidate in {text!r}")


def decode_engine_from(path, device: str = "cpu", dtype: str = "float32", num_blocks: int = 128, block_size: int = 4,
                       write_delay_s: float = 0.0, external_write_grace_s: float = 2.0, kv_ready_wait: str = "host"):
    """A ``DecodeEngine`` of the checkpoint at ``path``: the factory ``DecodeProcess`` children call (by name).
    ``write_delay_s`` slows every ``write_kv`` (fault tests kill the child mid-stream)."""
    import time

    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.kv_wire import parse_dtype

    config = DecodeConfig(num_blocks=num_blocks, block_size=block_size, external_write_grace_s=external_write_grace_s,
                          kv_ready_wait=kv_ready_wait)
    engine = DecodeEngine.from_checkpoint(path, config, device=device, dtype=parse_dtype(dtype))
    if write_delay_s:
        write = engine.write_kv

        def slow_write(*args, **kwargs):
            time.sleep(write_delay_s)
            return write(*args, **kwargs)

        engine.write_kv = slow_write
    return engine


class CaptureSink(NullKVSink):
    """Keeps every layer's K/V a prefill hands over ([L, T, 2, Hkv, hd] on the host, NaN where none came)."""

    copies_at_put = False  # it keeps the tensors it is handed

    def begin(self, layout):
        self.layout = layout
        self.k = torch.full((layout.num_layers, layout.num_tokens, 2, layout.num_kv_heads, layout.head_dim), float("nan"))
        self.kept = []  # (tensor handed over, its bytes at put time): the engine must never write it again

    def put(self, l0, l1, t0, t1, kv):
        assert torch.isnan(self.k[l0:l1, t0:t1]).all(), "a cell was sent twice"
        assert kv.shape == self.k[l0:l1, t0:t1].shape and kv.is_contiguous()
        self.k[l0:l1, t0:t1] = kv.detach().to("cpu", torch.float32)
        self.kept.append((kv, kv.clone()))


def prefill_engine_from(path, chunk_size: int = 16):
    """A ``PrefillEngine`` of the checkpoint at ``path`` (CPU): the factory ``PrefillProcess`` children call."""
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine

    return PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=chunk_size))


def engine_num_params(engine) -> int:
    """A ``WorkerProcess.call`` target: what the child's engine holds."""
    return engine.num_params


def engine_call_fails(engine, message: str):
    """A ``WorkerProcess.call`` target that raises."""
    raise ValueError(message)


@contextlib.contextmanager
def started_engines(path, num_blocks: int = 128, **decode):
    """(decode engine, prefill engine, full model) of the tiny Air model saved at ``path``, both engines started
    in this process (blocks of 4 tokens; prefill chunks of 16, batches of 64 tokens) and stopped afterwards.
    ``decode``: more ``DecodeConfig`` fields."""
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine

    full = save_tiny_air(path)
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=num_blocks, block_size=4, **decode)).start()
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, max_batch_tokens=64)).start()
    try:
        yield de, pe, full
    finally:
        pe.stop(), de.stop()


@contextlib.contextmanager
def mixed_batch_engines(path, colocated: bool):
    """A started decode engine of the checkpoint at ``path`` (200 blocks of 4 tokens, overlapped steps) that
    prefills its own prompts (``colocated``: chunks of up to 32 tokens) or is fed by a prefill engine. Yields
    ``(engine, start)``: ``start(rid, prompt, params, scale, speculative=0)`` reserves, prefills and starts one
    request (with the prompt given as context where its sampling reads it) and returns its token stream. Both engines
    stop at the end, and the pool must be free again."""
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.logits_adjust import reads_prompt
    from colm.prefill_worker.engine import PrefillEngine
    from colm.prefill_worker.sinks import LocalKVSink

    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=200, block_size=4, colocated_prefill=colocated,
                                                         max_batched_tokens=32, overlap_steps=True)).start()
    pe = None if colocated else PrefillEngine.from_checkpoint(path)

    def start(rid, prompt, params, scale, speculative=0):
        de.reserve(rid, len(prompt), params.max_new_tokens)
        context = None
        if colocated and len(prompt) > 1:
            de.prefill_kv(rid, prompt[:-1])
        elif len(prompt) > 1:
            pe.prefill(rid, prompt, LocalKVSink(de, rid))
            context = prompt[:-1] if reads_prompt(params) else None
        return de.start_generation(rid, prompt[-1], params, scale=scale, speculative=speculative, context_ids=context)

    try:
        yield de, start
    finally:
        de.stop()
        if pe is not None:
            pe.stop()
    assert_pool_free(de)


@contextlib.contextmanager
def worker_servers(path, grace_s: float):
    """A decode and a prefill worker server of the checkpoint at ``path`` in this process, as the KV transport tests
    run them: decode 64 blocks of 4, a 5 s KV timeout and ``grace_s`` of external-write grace; prefill chunks of 16
    and a 1 MiB NIXL arena. Yields (decode server, decode stub, prefill stub, prefill server); stops both after."""
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.decode_worker.service import DecodeServer
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine
    from colm.prefill_worker.service import PrefillServer
    from colm.proto import load_proto
    from colm.proto.rpc import make_channel

    _, kv_pb2_grpc = load_proto("kv")
    decode = DecodeServer(DecodeEngine.from_checkpoint(path, DecodeConfig(
        num_blocks=64, block_size=4, kv_timeout_s=5, external_write_grace_s=grace_s)), TOKEN).start()
    prefill = PrefillServer(PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, nixl_arena_bytes=1 << 20)),
                            TOKEN).start()
    try:
        yield (decode, kv_pb2_grpc.DecodeWorkerStub(make_channel(decode.address)),
               kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address)), prefill)
    finally:
        prefill.stop(), decode.stop()
