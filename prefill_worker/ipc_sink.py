"""``IpcKVSink``: the cuda_ipc hand-off. K/V move device to device; ``PushKV`` only signals.

Path of one request: ``begin(layout)`` allocates one staging tensor for the request's whole K/V
(``[layers, tokens, 2, kv_heads, head_dim]``, the engine's dtype, through torch's caching allocator so
later requests reuse the segment), exports it (``colm.kv_ipc.export_staging``: CUDA IPC handle in the
``KVHeader``) and opens the ``PushKV`` stream -> each ``put`` copies its K/V into the staging tensor on
the current stream; once ``chunk_layers`` layers of a token range are in (0: all of them), it records
an event and queues their ranges -> the stream's generator (a helper thread) waits for that event,
then sends a ``KVChunk`` with the layer/token ranges and no payload, and decode copies those ranges
into its blocks -> ``finish`` sends ``KVEnd`` and waits for the ack (decode acks only once its copies
are done) -> the staging tensor is freed. ``fail`` cancels the stream (decode frees the request's
blocks) and frees it too.

Signals per layer (the default, ``PrefillConfig.ipc_chunk_layers=1``) let decode's copies overlap the
remaining layers; one signal per token range (0) leaves a single copy per prompt chunk after its
forward, so decode does no GPU work while a prefill on the same GPU computes. On one H100 the two
gave the same TTFT within noise (two 8K hand-off runs, 2026-11-23; see PrefillConfig.ipc_chunk_layers).

On a CPU engine the staging tensor can only be read by a decode engine in the same process (tests);
``colm.prefill_worker.service`` refuses the path without CUDA.
"""

from __future__ import annotations

import torch

from colm.kv_ipc import export_staging, release_staging
from colm.kv_wire import KVLayout, checksum, parse_dtype, prefetch, tensor_bytes
from colm.prefill_worker.kv_push import GrpcKVSink, kv_header, kv_pb2
from colm.prefill_worker.sinks import copies_done_event


class IpcKVSink(GrpcKVSink):
    def __init__(self, stub, request_id: str, cluster_token: str, device, checksum_kind: str = "none",
                 timeout_s: float = 60.0, chunk_layers: int = 1) -> None:
        super().__init__(stub, request_id, cluster_token, checksum_kind=checksum_kind, timeout_s=timeout_s)
        if chunk_layers < 0:
            raise ValueError(f"chunk_layers={chunk_layers}: must be >= 0 (0 = all layers of a token range)")
        self.path = "cuda_ipc"
        self.device = torch.device(device)
        self.chunk_layers = chunk_layers
        self._staging: torch.Tensor | None = None  # [layers, tokens, 2, kv_heads, head_dim]
        self._key = ""
        self._unsent: dict[tuple[int, int], list[int]] = {}  # (token_start, token_end) -> [first layer, end layer) put, not signalled

    def begin(self, layout: KVLayout) -> None:
        self._layout = layout
        fields = {}
        if layout.num_tokens:
            self._staging = torch.empty((layout.num_layers, layout.num_tokens, 2, layout.num_kv_heads, layout.head_dim),
                                        dtype=parse_dtype(layout.dtype), device=self.device)
            export = export_staging(self._staging)
            self._key = export.ipc_key
            fields = export.header_fields()
        header = kv_header(self.request_id, layout, self.checksum_kind, **fields)
        # a helper thread waits for each copy's event, so gRPC's sender thread never blocks on the GPU
        self._future = self.stub.PushKV.future(prefetch(self._messages(header), name="colm-kv-ipc"),
                                               timeout=self.timeout_s, metadata=self.metadata)

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        self._staging[layer_start:layer_end, token_start:token_end].copy_(kv, non_blocking=True)
        span = self._unsent.setdefault((token_start, token_end), [layer_start, layer_start])
        if layer_start != span[1]:
            raise ValueError(f"request {self.request_id}: layers [{layer_start},{layer_end}) of tokens "
                             f"[{token_start},{token_end}) put after layer {span[1]}: puts of a range go in layer order")
        span[1] = layer_end
        n = self._layout.num_layers
        if span[1] < n and (self.chunk_layers == 0 or span[1] - span[0] < self.chunk_layers):
            return
        del self._unsent[(token_start, token_end)]
        self._q.put(((span[0], span[1], token_start, token_end), None, copies_done_event(self._staging)))

    def _messages(self, header):
        yield kv_pb2.KVMessage(header=header)
        staging = self._staging
        for (l0, l1, t0, t1), _ in self._staged():  # yields once the put's copy has finished
            crc = 0
            if self.checksum_kind != "none":  # optional; costs a device->host copy of the range
                crc = checksum(tensor_bytes(staging[l0:l1, t0:t1].contiguous().cpu()), self.checksum_kind)
            yield self._range_message(l0, l1, t0, t1, crc)
        yield self._end_message()

    def _release(self) -> None:
        if self._key:
            release_staging(self._key)
            self._key = ""
        self._staging = None  # back to the caching allocator (decode acked, or the stream is gone)
        super()._release()
