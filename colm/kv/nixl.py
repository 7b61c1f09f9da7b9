"""The ``nixl`` transport: K/V bytes through NIXL (UCX: TCP, shared memory, RDMA, NVLink), control through gRPC.

Both ends register one host buffer with their NIXL agent once per process (``NixlEndpoint``: DRAM; a
device arena is future work, see docs/transports.md) and hand requests regions of it (``RegionArena``).

Path of one request (``DecodeWorker.WriteKV``, header with ``transport="nixl"``):
prefill ``NixlKVSink.begin`` takes a send region and opens the stream -> decode ``receive`` takes a region of
its receive arena for the request (``engine.begin_kv`` first: the reservation must exist) and replies
``KVPoolGrant`` with its agent's name and metadata and the region's address -> the sender adds that agent
(cached per agent name: one UCX connection per peer process) -> each ``put`` (staged to host memory off the
forward's thread) is copied into the send region and WRITten to the next offset of decode's region; writes
are pipelined (several in flight) and each is polled until ``check_xfer_state`` says DONE, then its
``KVChunk`` (ranges, ``shm_offset`` = its offset in the region, checksum over those bytes) goes on the stream
-> decode checks the checksum of the region bytes and copies them into the request's blocks (``write_kv``)
-> ``KVEnd`` -> ``finish_kv`` and the ack. No NIXL notification: the ordered gRPC marks already say what
landed, with a checksum each; a notification would be a second completion channel to reconcile.

Faults: a peer that dies makes NIXL fail the write (``NIXL_ERR_REMOTE_DISCONNECT``, seen over UCX's TCP
transport within milliseconds) or the gRPC stream break; a write still PROC at the request's deadline fails it.
Decode frees the region when the stream ends: at once after a clean end, after
``DecodeConfig.external_write_grace_s`` otherwise (a sender that lives on may still have writes in flight);
the sender frees its region likewise. The request's blocks go back through ``engine.fail_kv``.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from colm.errors import CapacityError, PeerUnavailableError, TransferError
from colm.kv.arena import RegionArena
from colm.kv_wire import KVLayout, bytes_to_tensor, checksum, tensor_bytes

log = logging.getLogger("colm.kv.nixl")

# UCX transports when the environment does not choose: tcp (any two hosts, and it notices a dead peer: its
# connection closes), sm (same host: shared memory, cma), self (loopback inside one process).
DEFAULT_UCX_TLS = "tcp,sm,self"
MAX_IN_FLIGHT = 4  # writes posted and not yet DONE, per request


def available() -> bool:
    """nixl imports here (``sys.modules['nixl'] = None`` hides it, as in the skip check)."""
    try:
        import nixl._api  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (missing UCX plugin)
        return False
    return True


class NixlEndpoint:
    """This process's NIXL agent for one role plus its registered arena. Made once (``endpoint``)."""

    def __init__(self, role: str, arena_bytes: int) -> None:
        os.environ.setdefault("UCX_TLS", DEFAULT_UCX_TLS)  # read by UCX when the agent's backend starts
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.name = f"colm-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # STRICT: every handler thread of the worker uses the one agent
        self.agent = nixl_agent(self.name, nixl_agent_config(backends=["UCX"],
                                                             sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT))
        if "UCX" not in self.agent.backends:
            raise RuntimeError("nixl: the UCX backend plugin did not load")
        self.buf = torch.empty(arena_bytes, dtype=torch.uint8)  # [arena_bytes]; pages touched on first use
        self.reg = self.agent.register_memory(self.buf)
        self.arena = RegionArena(arena_bytes)
        self.base = self.buf.data_ptr()
        self.metadata = self.agent.get_agent_metadata()
        self._peers: dict[str, str] = {}  # agent name -> the name add_remote_agent returned
        self._lock = threading.Lock()

    def peer(self, name: str, metadata: bytes) -> str:
        """The remote agent ``name``, added from ``metadata`` on first use (cached per agent)."""
        with self._lock:
            if name not in self._peers:
                self._peers[name] = self.agent.add_remote_agent(metadata)
            return self._peers[name]

    def forget(self, name: str) -> None:
        """Drop a peer whose connection failed (a restarted worker comes back under a new name anyway)."""
        with self._lock:
            if self._peers.pop(name, None) is not None:
                try:
                    self.agent.remove_remote_agent(name)
                except Exception:  # noqa: BLE001 - already gone
                    pass

    def post_write(self, local_off: int, remote_addr: int, nbytes: int, peer: str, mem: str = "DRAM", dev: int = 0):
        """Post a WRITE of ``nbytes`` from this arena's ``local_off`` to ``remote_addr`` of ``peer``; the handle."""
        local = self.agent.get_xfer_descs([(self.base + local_off, nbytes, 0)], "DRAM")
        remote = self.agent.get_xfer_descs([(remote_addr, nbytes, dev)], mem)
        handle = self.agent.initialize_xfer("WRITE", local, remote, peer)
        state = self.agent.transfer(handle)
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise PeerUnavailableError(f"nixl: WRITE to {peer} failed when posted")
        return handle

    def state(self, handle) -> str:
        return self.agent.check_xfer_state(handle)

    def release(self, handle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:  # noqa: BLE001 - a handle of a dead peer
            log.debug("nixl: releasing a transfer handle failed: %s", e)


_ENDPOINTS: dict[str, NixlEndpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


def endpoint(role: str, arena_bytes: int) -> NixlEndpoint:
    """This process's endpoint of ``role`` ("prefill" | "decode"), made on first use with ``arena_bytes``."""
    with _ENDPOINTS_LOCK:
        ep = _ENDPOINTS.get(role)
        if ep is None:
            ep = _ENDPOINTS[role] = NixlEndpoint(role, arena_bytes)
        return ep


# ------------------------------------------------------------------------------------------- decode side
def receive(engine, header, layout: KVLayout, messages, state: dict, kv_pb2):
    """Decode's half of a ``WriteKV`` stream of the nixl transport (``DecodeService.WriteKV`` calls it after the
    header): yields the grant, then the ack. ``state["region"]`` holds the region's offset until the caller frees
    it (``release_region``) however the stream ends; ``state["clean"]`` once acked."""
    cfg = engine.config
    ep = endpoint("decode", cfg.nixl_arena_bytes)
    rid = header.request_id
    engine.begin_kv(rid, layout)
    n = layout.num_bytes
    region = 0
    if n:
        try:
            region = ep.arena.allocate(n)
        except CapacityError as e:
            engine.fail_kv(rid, e)
            raise
        state["region"] = region
    yield kv_pb2.KVPoolReply(grant=kv_pb2.KVPoolGrant(
        request_id=rid, dtype=layout.dtype, nixl_agent=ep.name, nixl_metadata=ep.metadata,
        nixl_addr=ep.base + region, nixl_bytes=n, nixl_mem="DRAM", nixl_device=0))
    kind = header.checksum or "none"
    for msg in messages:
        which = msg.WhichOneof("kind")
        if which == "chunk":
            c = msg.chunk
            if c.data or getattr(msg, "payload", None):
                raise TransferError(f"request {rid}: inline bytes on the nixl transport")
            if c.dtype != layout.dtype:
                raise TransferError(f"request {rid}: chunk dtype {c.dtype!r}, header {layout.dtype!r}")
            if c.shm_offset + c.nbytes > n:
                raise TransferError(f"request {rid}: chunk [{c.shm_offset}, +{c.nbytes}) outside its {n}-byte region")
            view = ep.buf[region + c.shm_offset : region + c.shm_offset + c.nbytes]  # [nbytes] uint8, no copy
            payload = tensor_bytes(view)
            if kind != "none" and checksum(payload, kind) != c.crc32:
                raise TransferError(f"request {rid}: checksum mismatch in chunk {c.seq} (region bytes "
                                    f"[{c.shm_offset}, +{c.nbytes}))")
            try:
                kv = bytes_to_tensor(payload, c.dtype, tuple(c.shape))
            except ValueError as e:
                raise TransferError(f"request {rid}: chunk {c.seq}: {e}") from None
            engine.write_kv(rid, c.layer_start, c.layer_end, c.token_start, c.token_end, kv, seq=c.seq, sync=True)
            del kv, payload, view
        elif which == "end":
            engine.finish_kv(rid, header.num_tokens)
            state["clean"] = True
            yield kv_pb2.KVPoolReply(ack=kv_pb2.KVAck(request_id=rid, num_chunks=msg.end.num_chunks,
                                                      num_bytes=msg.end.num_bytes))
            return
        else:
            raise TransferError(f"request {rid}: second KV header in one stream")
    raise TransferError(f"request {rid}: KV stream ended without KVEnd (truncated)")


def release_region(engine, state: dict) -> None:
    """Free the stream's receive region: now after a clean end, after the grace otherwise. Idempotent."""
    region = state.pop("region", None)
    if region is not None:
        ep = endpoint("decode", engine.config.nixl_arena_bytes)
        ep.arena.free(region, 0.0 if state.get("clean") else engine.config.external_write_grace_s)


def arena_free_bytes(role: str) -> tuple[int, int] | None:
    """(free bytes, size) of this process's arena of ``role``; None when it was never made."""
    ep = _ENDPOINTS.get(role)
    return None if ep is None else (ep.arena.num_free_bytes, ep.arena.size)


# ------------------------------------------------------------------------------------------- prefill side
from colm.prefill_worker.kv_push import GrpcKVSink, _peer_error, _Stop, kv_header, kv_pb2  # noqa: E402

_REPLIES = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="colm-kv-nixl")


class NixlKVSink(GrpcKVSink):
    """Prefill's half (see the module docstring). ``arena_bytes``: this process's send arena, made on first use."""

    def __init__(self, stub, request_id: str, cluster_token: str, checksum_kind: str = "crc32",
                 timeout_s: float = 60.0, arena_bytes: int = 256 << 20, grace_s: float = 2.0) -> None:
        super().__init__(stub, request_id, cluster_token, checksum_kind=checksum_kind, timeout_s=timeout_s)
        self.path = "nixl"
        self.ep = endpoint("prefill", arena_bytes)
        self.grace_s = grace_s
        self.granted = threading.Event()
        self._done = threading.Event()
        self._grant = None
        self._peer = ""
        self._region: int | None = None
        self._error: BaseException | None = None
        self._ack = None
        self._call = None
        self._clean = False
        self._deadline = 0.0
        self._lock = threading.Lock()

    def begin(self, layout: KVLayout) -> None:
        self._layout = layout
        self._deadline = time.monotonic() + self.timeout_s
        if layout.num_bytes:
            self._region = self.ep.arena.allocate(layout.num_bytes)  # CapacityError: this request fails alone
        header = kv_header(self.request_id, layout, self.checksum_kind, transport="nixl")
        with self._lock:
            self._call = self.stub.WriteKV(self._messages(header), timeout=self.timeout_s, metadata=self.metadata)
        _REPLIES.submit(self._read_replies)

    def _read_replies(self) -> None:
        try:
            reply = next(self._call)
            if reply.WhichOneof("kind") != "grant" or not reply.grant.nixl_agent:
                raise TransferError(f"request {self.request_id}: decode answered WriteKV without a NIXL grant")
            g = reply.grant
            if g.nixl_bytes != self._layout.num_bytes:
                raise TransferError(f"request {self.request_id}: a region of {g.nixl_bytes} bytes granted, "
                                    f"{self._layout.num_bytes} to write")
            self._peer = self.ep.peer(g.nixl_agent, g.nixl_metadata) if self._layout.num_bytes else ""
            self._grant = g
            self.granted.set()
            reply = next(self._call)
            if reply.WhichOneof("kind") != "ack":
                raise TransferError(f"request {self.request_id}: decode sent a second grant")
            self._ack = reply.ack
        except StopIteration:
            self._set_error(TransferError(f"request {self.request_id}: WriteKV ended without "
                                          f"{'an ack' if self._grant is not None else 'a grant'}"))
        except BaseException as e:  # noqa: BLE001 - handed to finish
            self._set_error(_as_error(self.request_id, e))
        finally:
            self.granted.set()
            self._done.set()

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc

    def _messages(self, header):
        yield kv_pb2.KVMessage(header=header)
        if not self.granted.wait(max(0.0, self._deadline - time.monotonic())) or self._grant is None:
            return  # no grant (an error, or the deadline): the stream ends without KVEnd
        inflight: collections.deque = collections.deque()  # (handle, chunk message), posting order
        offset = 0
        try:
            for (l0, l1, t0, t1), host in self._staged():
                nbytes = host.numel() * host.element_size()
                dst = self.ep.buf[self._region + offset : self._region + offset + nbytes]
                src = host.view(torch.int16 if host.dtype == torch.bfloat16 else host.dtype).reshape(-1)
                dst.view(src.dtype).copy_(src)  # one copy into registered memory (torch: off the GIL)
                crc = checksum(tensor_bytes(dst), self.checksum_kind) if self.checksum_kind != "none" else 0
                handle = self.ep.post_write(self._region + offset, self._grant.nixl_addr + offset, nbytes, self._peer,
                                            self._grant.nixl_mem or "DRAM", self._grant.nixl_device)
                msg = self._range_message(l0, l1, t0, t1, crc)
                msg.chunk.shm_offset = offset
                inflight.append((handle, msg))
                offset += nbytes
                # post more while puts are queued; else (or at the cap) finish the oldest write and send its mark
                while inflight and (self._q.empty() or len(inflight) >= MAX_IN_FLIGHT):
                    yield self._wait(*inflight.popleft())
            while inflight:
                yield self._wait(*inflight.popleft())
        finally:
            for handle, _ in inflight:  # a failed stream: drop what is still posted (the region's free waits)
                self.ep.release(handle)
        yield self._end_message()

    def _wait(self, handle, msg):
        """``msg`` once its write is DONE; raises on ERR or at the deadline."""
        spins = 0
        try:
            while True:
                state = self.ep.state(handle)
                if state == "DONE":
                    return msg
                if state == "ERR":
                    self.ep.forget(self._grant.nixl_agent)
                    raise PeerUnavailableError(f"request {self.request_id}: NIXL write to {self._grant.nixl_agent} failed")
                if time.monotonic() > self._deadline:
                    raise TimeoutError(f"request {self.request_id}: NIXL write not done by the deadline")
                spins += 1
                if spins > 200:  # a short spin, then poll without burning a shared core
                    time.sleep(0.0002)
        except Exception as e:
            self._set_error(e)
            raise
        finally:
            self.ep.release(handle)

    def finish(self, timeout_s: float) -> int:
        self._close_queue()
        try:
            if not self._done.wait(timeout_s):
                self._stop()
                raise TimeoutError(f"request {self.request_id}: NIXL KV transfer not acknowledged in {timeout_s:.1f} s")
            if self._error is not None:
                raise self._error
            n = self._checked(self._ack)
            self._clean = True
            return n
        finally:
            self._release()

    def fail(self, exc: BaseException) -> None:
        self._set_error(exc)
        self._close_queue(_Stop())
        self._stop()
        self._release()

    def _stop(self) -> None:
        with self._lock:
            if self._call is not None:
                self._call.cancel()

    def _release(self) -> None:
        with self._lock:
            region, self._region = self._region, None
        if region is not None:  # a failed stream may have writes in flight that read the region: free it later
            self.ep.arena.free(region, 0.0 if self._clean else self.grace_s)


def _as_error(request_id: str, e: BaseException) -> BaseException:
    import grpc

    if isinstance(e, grpc.RpcError):
        return _peer_error(request_id, e)
    return e
