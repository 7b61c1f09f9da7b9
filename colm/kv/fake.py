"""The ``fake`` transport (tests): K/V handed to a decode engine of the same process through its target
interface (``begin_kv`` / ``write_kv`` / ``finish_kv`` / ``fail_kv``), with faults on demand.

``attach(address, engine)`` makes a decode engine reachable under its server's address; ``FakeKVSink.faults``
injects: ``"drop"`` (the second put never arrives: ``finish_kv`` finds cells missing), ``"corrupt"`` (a put's
values changed and its check fails, as a checksum mismatch would), ``"die"`` (the sender fails after the first
put). Never picked by ``auto``.
"""

from __future__ import annotations

from colm.errors import TransferError
from colm.kv.registry import SinkContext, Transport, register

_ENGINES: dict[str, object] = {}


def attach(address: str, engine) -> None:
    _ENGINES[address] = engine


def detach(address: str) -> None:
    _ENGINES.pop(address, None)


class FakeKVSink:
    path = "fake"

    def __init__(self, engine, request_id: str, faults: str = "") -> None:
        self.engine, self.request_id, self.faults = engine, request_id, faults
        self.num_bytes = self._seq = 0
        self._layout = None

    def begin(self, layout) -> None:
        self._layout = layout
        self.engine.begin_kv(self.request_id, layout)

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        self._seq += 1
        if self.faults == "die" and self._seq > 1:
            raise TransferError(f"request {self.request_id}: fake sender died")
        if self.faults == "drop" and self._seq == 2:
            return
        if self.faults == "corrupt" and self._seq == 2:
            exc = TransferError(f"request {self.request_id}: checksum mismatch in chunk {self._seq - 1} (fake)")
            self.engine.fail_kv(self.request_id, exc)
            raise exc
        self.engine.write_kv(self.request_id, layer_start, layer_end, token_start, token_end, kv, seq=self._seq - 1)
        self.num_bytes += kv.numel() * kv.element_size()

    def finish(self, timeout_s: float) -> int:
        self.engine.finish_kv(self.request_id, self._layout.num_tokens)
        return self.num_bytes

    def fail(self, exc: BaseException) -> None:
        self.engine.fail_kv(self.request_id, exc)


def make_sink(ctx: SinkContext):
    engine = _ENGINES.get(ctx.decode_address)
    if engine is None:
        raise ValueError(f"transport 'fake': no decode engine attached at {ctx.decode_address!r} in this process")
    return FakeKVSink(engine, ctx.request_id)


TRANSPORT = register(Transport("fake", make_sink, same_process=True))
