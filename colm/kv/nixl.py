"""The ``nixl`` transport: K/V bytes through NIXL (UCX: TCP, shared memory, RDMA, NVLink) straight into decode's
KV pool, control through gRPC.

Decode registers its pool tensor ``kv [2, layers, num_blocks, block_size, kv_heads, head_dim]`` with its NIXL agent
once per process (``pool_grant_fields``: DRAM on a CPU pool, VRAM on a CUDA pool: the same call). Prefill registers
one host send buffer once (``NixlEndpoint``'s arena, ``PrefillConfig.nixl_arena_bytes``) and gives each request a
region of it (``RegionArena``).

Path of one request (``DecodeWorker.WriteKV``, header with ``transport="nixl"``; the router sends Reserve and
Prefill at once, as decode's grant waits for the reservation):
prefill ``NixlKVSink.begin`` takes a send region and opens the stream on a helper thread (the forward starts
meanwhile) -> decode ``DecodeEngine.grant_kv`` (the cuda_pool grant: the request's blocks, held from now on while
the sender may write) and replies ``KVPoolGrant`` with ``block_ids`` / ``block_size`` / ``num_blocks`` / ``dtype``
plus its agent's name and metadata and the pool's registered address (``nixl_addr``, ``nixl_bytes``, ``nixl_mem``,
``nixl_device``) -> the sender adds that agent (cached per agent name and metadata: one UCX connection per peer
process) -> each ``put`` (layers [l0, l1) x tokens [t0, t1), ``kv [nl, nt, 2, Hkv, hd]``) is copied once into the
send region in pool order (``[2, nl, nt, Hkv, hd]``: K then V, per layer the tokens in order), so that every run of
consecutive slots of the granted blocks is one contiguous piece of it (``put_segments``: 2 x nl x runs segments; a
fresh pool's blocks are one run) -> one NIXL WRITE of the descriptor lists of the puts whose bytes are ready (a
graphed forward's puts come at once: one WRITE), their checksums (``PrefillConfig.nixl_checksum``: ``wsum32`` of a
device send buffer, all of a WRITE's puts in one launch and one read) computed meanwhile; writes are pipelined
(several in flight) and each is polled until ``check_xfer_state`` says DONE, then one ``KVMarks`` message names its
puts (a ``KVChunk`` each: the ranges, crc32 = checksum of the put's bytes in pool order) -> decode marks each range
written (``mark_kv``: nothing copied) and checks its checksum by reading those slots of its pool (a device pool:
noted per chunk, all summed at ``KVEnd`` in one launch, before the K/V count as complete) -> ``KVEnd`` ->
``finish_kv`` and the ack. No NIXL notification: the ordered gRPC marks already say what landed, with a checksum
each.

Copies per byte: prefill one copy (the put into the registered send region, reordered on the way): on the host,
or on CUDA straight into the region, which lies in VRAM by default (``PrefillConfig.nixl_send_memory``; UCX then
moves VRAM -> VRAM through cuda_ipc on one host) or in pinned DRAM. Decode none. Checksums of device bytes run on a
side stream (``side_stream``), not behind the forward or the decode step.

Faults: a peer that dies makes NIXL fail the write (``NIXL_ERR_REMOTE_DISCONNECT``, seen over UCX's TCP transport
within milliseconds) or the gRPC stream break; a write still PROC at the request's deadline fails it. Decode's blocks
follow the cuda_pool rules: a request that ends while its stream is open keeps them out of the free list; decode
then cancels the stream (the grant's ``WriterLease.stop_writer``) and frees them after ``DecodeConfig.external_write_grace_s``
(a sender that lives on may still have writes in flight), at once after a clean end. The sender frees its region
likewise (at once when clean, after its grace otherwise).

The parts, each re-exported here (callers and tests import them from ``colm.kv.nixl``): ``nixl_agent`` (the agent,
its progress-thread pause, the endpoints per role), ``nixl_segments`` (pool geometry, byte segments),
``nixl_checksums`` (checksums of bytes in place, on a side stream), ``nixl_receiver`` (decode's side),
``nixl_sender`` (prefill's side, ``NixlKVSink``). Patch a function where it lives: its callers there look it up.
"""

from __future__ import annotations

from colm.kv.nixl_agent import (_CONFIG_LOCK, _ENDPOINTS, _ENDPOINTS_LOCK, DEFAULT_UCX_TLS, DEFAULT_UCX_TLS_CUDA,
                                PROGRESS_DELAY_US, NixlEndpoint, _make_agent, arena_free_bytes, close_endpoints,
                                endpoint, log)
from colm.kv.nixl_checksums import _SIDE_STREAMS, pool_checksum, read_pending, side_stream
from colm.kv.nixl_receiver import _check, check_pending, geometry_of, pending_segments, pool_grant_fields, verify_range
from colm.kv.nixl_segments import (PoolGeometry, batch_segments, put_segments, ranges_segments, to_pool_order,
                                   token_runs)
from colm.kv.nixl_sender import _COPIES, _REPLIES, MAX_BATCH, MAX_IN_FLIGHT, NixlKVSink, _as_error

# Every name this module held before it was split, from the module that now holds it (the same objects).
__all__ = [
    "DEFAULT_UCX_TLS", "DEFAULT_UCX_TLS_CUDA", "PROGRESS_DELAY_US", "NixlEndpoint", "endpoint", "close_endpoints",
    "arena_free_bytes", "log", "_CONFIG_LOCK", "_ENDPOINTS", "_ENDPOINTS_LOCK", "_make_agent",
    "PoolGeometry", "token_runs", "put_segments", "batch_segments", "ranges_segments", "to_pool_order",
    "pool_checksum", "read_pending", "side_stream", "_SIDE_STREAMS",
    "pool_grant_fields", "geometry_of", "verify_range", "pending_segments", "check_pending", "_check",
    "MAX_IN_FLIGHT", "MAX_BATCH", "NixlKVSink", "_REPLIES", "_COPIES", "_as_error",
]
