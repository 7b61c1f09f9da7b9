"""This process's NIXL agents: one ``NixlEndpoint`` per role, with its registered memory and the peers it writes to.

``_make_agent`` makes the agent (UCX backend, strict thread sync) with a pause between its progress thread's rounds
(``PROGRESS_DELAY_US``), which NIXL's Python API would otherwise fix at 0: a core spun per process. ``endpoint``
makes a role's endpoint on first use (prefill's with its registered send arena, decode's without);
``close_endpoints`` drops them all. The sender (``nixl_sender``) and the receiver (``nixl_receiver``) both go
through here.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref

import numpy as np
import torch

from colm.errors import PeerUnavailableError
from colm.kv.arena import RegionArena

log = logging.getLogger("colm.kv.nixl")

# UCX transports when the environment does not choose: tcp (any two hosts, and it notices a dead peer: its
# connection closes), sm (same host: shared memory, cma), self (loopback inside one process); where CUDA is,
# also cuda_copy (host <-> device staging) and cuda_ipc (device -> device between processes of one host).
DEFAULT_UCX_TLS = "tcp,sm,self"
DEFAULT_UCX_TLS_CUDA = "tcp,sm,self,cuda_copy,cuda_ipc"
# The agent's progress thread sleeps this long (microseconds) between rounds. NIXL's Python API starts it with no
# pause, and it then spins a whole core per process for as long as the agent lives, idle or not (measured: 1.00 core
# at 0 us, 0.01 at 100 us). Our own polling of a write's state makes progress meanwhile. COLM_NIXL_PROGRESS_DELAY_US.
PROGRESS_DELAY_US = 100
_CONFIG_LOCK = threading.Lock()


def _make_agent(name: str, delay_us: int):
    """A NIXL agent (UCX, strict thread sync) whose progress thread pauses ``delay_us`` between rounds. The Python
    API fixes that pause at 0, so the binding's config class is swapped for one that keeps ours while the agent is
    made (under a lock; a binding without the field gets the API's default)."""
    from nixl import _api
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    conf = nixl_agent_config(backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    base = getattr(getattr(_api, "nixlBind", None), "nixlAgentConfig", None)
    if base is None or not hasattr(base(), "pthrDelay"):
        return nixl_agent(name, conf)

    class _Config(base):
        def __setattr__(self, key, value):
            base.__setattr__(self, key, delay_us if key == "pthrDelay" else value)

    with _CONFIG_LOCK:
        _api.nixlBind.nixlAgentConfig = _Config
        try:
            return nixl_agent(name, conf)
        finally:
            _api.nixlBind.nixlAgentConfig = base


class NixlEndpoint:
    """This process's NIXL agent for one role, its registered memory and the peers it writes to. Made once per role
    (``endpoint``). ``arena_bytes`` > 0: one buffer registered now and handed out in regions (the sender's send
    buffer): on ``arena_device`` "cpu", host memory (pinned when CUDA is there, so a device put's copy into it is
    asynchronous); on a CUDA device, device memory (a device put is copied device -> device and WRITten VRAM ->
    VRAM)."""

    def __init__(self, role: str, arena_bytes: int = 0, arena_device: str = "cpu") -> None:
        cuda = torch.cuda.is_available()
        # read by UCX when the agent's backend starts
        os.environ.setdefault("UCX_TLS", DEFAULT_UCX_TLS_CUDA if cuda else DEFAULT_UCX_TLS)
        self.name = f"colm-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # STRICT: every handler thread of the worker uses the one agent
        self.agent = _make_agent(self.name, int(os.environ.get("COLM_NIXL_PROGRESS_DELAY_US", PROGRESS_DELAY_US)))
        if "UCX" not in self.agent.backends:
            raise RuntimeError("nixl: the UCX backend plugin did not load")
        self._lock = threading.Lock()
        self._peers: dict[str, tuple[str, bytes]] = {}  # agent name -> (add_remote_agent's name, its metadata)
        self._regs: dict[tuple[int, int], tuple] = {}  # (address, bytes) -> (registration, mem, device)
        self.buf = None
        self.arena = None
        self.base = 0
        self.arena_mem, self.arena_dev = "DRAM", 0
        if arena_bytes > 0:
            dev = torch.device(arena_device)
            if dev.type == "cuda":
                self.buf = torch.empty(arena_bytes, dtype=torch.uint8, device=dev)  # [arena_bytes]
            else:
                self.buf = torch.empty(arena_bytes, dtype=torch.uint8, pin_memory=cuda)  # [arena_bytes]
            _, _, self.arena_mem, self.arena_dev = self.register(self.buf)
            self.arena = RegionArena(arena_bytes)
            self.base = self.buf.data_ptr()
        self.metadata = self.agent.get_agent_metadata()

    def register(self, t: torch.Tensor) -> tuple[int, int, str, int]:
        """Register contiguous ``t`` (host: DRAM, CUDA: VRAM) once: (address, bytes, mem, device). The registration
        goes when ``t`` does; the agent's metadata (what a peer adds) then names it."""
        if not t.is_contiguous():
            raise ValueError("nixl: only a contiguous tensor can be registered")
        key = (t.data_ptr(), t.numel() * t.element_size())
        with self._lock:
            got = self._regs.get(key)
            if got is None:
                mem = "VRAM" if t.is_cuda else "DRAM"
                device = t.get_device() if t.is_cuda else 0
                reg = self.agent.register_memory(t)
                if reg is None:
                    raise RuntimeError(f"nixl: registering {key[1]} bytes of {mem} failed")
                got = self._regs[key] = (reg, mem, device)
                self.metadata = self.agent.get_agent_metadata()
                weakref.finalize(t, self._deregister, key)
            return key[0], key[1], got[1], got[2]

    def close(self) -> None:
        """Forget every peer and registration and drop the agent (its progress thread ends with it)."""
        with self._lock:
            for name in list(self._peers):
                self._remove(name)
            keys = list(self._regs)
        for key in keys:
            self._deregister(key)
        self.agent = None

    def _deregister(self, key) -> None:
        with self._lock:
            got = self._regs.pop(key, None)
        if got is not None:
            try:
                self.agent.deregister_memory(got[0])
            except Exception as e:  # noqa: BLE001 - at interpreter exit
                log.debug("nixl: deregistering failed: %s", e)

    def peer(self, name: str, metadata: bytes) -> str:
        """The remote agent ``name``, added from ``metadata`` on first use (cached per agent; added again when its
        metadata changed: it registered more memory)."""
        with self._lock:
            got = self._peers.get(name)
            if got is not None and got[1] != metadata:
                self._remove(name)
                got = None
            if got is None:
                got = self._peers[name] = (self.agent.add_remote_agent(metadata), metadata)
            return got[0]

    def forget(self, name: str) -> None:
        """Drop a peer whose connection failed (a restarted worker comes back under a new name anyway)."""
        with self._lock:
            if name in self._peers:
                self._remove(name)

    def _remove(self, name: str) -> None:
        remote, _ = self._peers.pop(name)
        try:
            self.agent.remove_remote_agent(remote)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def post_write(self, local: np.ndarray, remote: np.ndarray, peer: str, mem: str = "DRAM", local_mem: str = "DRAM"):
        """Post one WRITE of the segments ``local`` (this process's ``local_mem``) -> ``remote`` (``peer``'s ``mem``):
        uint64 [n, 3] rows (address, length, device), pairwise of equal length. The handle."""
        handle = None
        try:
            handle = self.agent.initialize_xfer("WRITE", self.agent.get_xfer_descs(local, local_mem),
                                                self.agent.get_xfer_descs(remote, mem), peer)
            state, why = self.agent.transfer(handle), ""
        except Exception as e:  # noqa: BLE001 - NIXL raises its own errors (NIXL_ERR_REMOTE_DISCONNECT: the peer died)
            state, why = "ERR", f" ({type(e).__name__}: {e})"
        if state == "ERR":
            if handle is not None:
                self.release(handle)
            name = peer.decode(errors="replace") if isinstance(peer, bytes) else peer
            raise PeerUnavailableError(f"nixl: WRITE to {name} failed when posted{why}")
        return handle

    def state(self, handle) -> str:
        """The WRITE's state: "DONE", "PROC", or "ERR" (also when NIXL raises: a peer that died mid-write)."""
        try:
            return self.agent.check_xfer_state(handle)
        except Exception as e:  # noqa: BLE001 - NIXL's own errors
            log.debug("nixl: checking a transfer failed: %s", e)
            return "ERR"

    def release(self, handle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:  # noqa: BLE001 - a handle of a dead peer
            log.debug("nixl: releasing a transfer handle failed: %s", e)


_ENDPOINTS: dict[str, NixlEndpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


def endpoint(role: str, arena_bytes: int = 0, arena_device: str = "cpu") -> NixlEndpoint:
    """This process's endpoint of ``role`` ("prefill": with a send arena of ``arena_bytes`` on ``arena_device`` |
    "decode": none), made on first use (a later call's arena arguments are not looked at)."""
    with _ENDPOINTS_LOCK:
        ep = _ENDPOINTS.get(role)
        if ep is None:
            ep = _ENDPOINTS[role] = NixlEndpoint(role, arena_bytes, arena_device)
        return ep


def close_endpoints() -> None:
    """Drop this process's endpoints (their agents' UCX progress threads poll while they live). The next
    ``endpoint`` call makes a new one; memory registered with the old agents is forgotten with them."""
    with _ENDPOINTS_LOCK:
        eps = list(_ENDPOINTS.values())
        _ENDPOINTS.clear()
    for ep in eps:
        ep.close()


def arena_free_bytes(role: str) -> tuple[int, int] | None:
    """(free bytes, size) of this process's send arena of ``role``; None when it was never made (or has none)."""
    ep = _ENDPOINTS.get(role)
    return None if ep is None or ep.arena is None else (ep.arena.num_free_bytes, ep.arena.size)
