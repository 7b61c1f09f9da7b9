"""``PrefillConfig``: the prefill worker's settings (frozen, validated)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm.kv_wire import CHECKSUMS, default_checksum


@dataclass(frozen=True)
class PrefillConfig:
    max_batch_tokens: int = 16384      # padded tokens (rows x longest prompt) per batched forward
    max_batch_size: int = 32           # prompts per batch
    chunk_size: int = 8192             # prompt tokens per forward chunk; longer prompts are chunked and run alone
    max_queue: int = 1024              # queued prompts before submit raises CapacityError
    kv_chunk_bytes: int = 4 << 20      # payload of one KV message on the gRPC bytes path (4 MiB beat 2 and 16 on loopback)
    default_timeout_s: float = 60.0    # queue + compute + transfer, when a request gives none
    checksum: str = default_checksum() # bytes path: "crc32c" (when the crc32c package is installed) | "crc32" | "none"
    shm_checksum: str = "none"         # shared-memory path: the bytes never leave this host's memory
    ipc_checksum: str = "none"         # cuda_ipc path: the bytes never leave the GPU (a checksum costs a host copy)
    # nixl transport: over each put's bytes, checked by decode in its pool; "auto": none for a GPU send buffer and a
    # decode worker on the same host (the bytes never leave the host's GPUs, as cuda_ipc's and cuda_pool's), wsum32
    # (computed on the GPU, no host copy) for one across hosts, the host's fastest CRC for a host send buffer
    nixl_checksum: str = "auto"
    nixl_arena_bytes: int = 256 << 20  # nixl transport: send buffer registered with NIXL once (on first use);
                                       # a request's K/V are copied into a region of it and WRITten from there
    # nixl transport: where that buffer lies: "device" (the prefill engine's GPU: VRAM -> VRAM WRITEs, UCX cuda_ipc on
    # one host) | "host" (pinned DRAM: DRAM -> the pool's memory) | "auto" (device when the engine runs on CUDA)
    nixl_send_memory: str = "auto"
    # cuda_ipc path: layers per KVChunk signal, so decode copies them into its blocks while later layers
    # compute; 0 = one signal per token range once all its layers are in (one copy per chunk of the prompt,
    # after its forward). On one H100 shared by both workers, 8K prompt: TTFT 31.4 vs 30.9 ms (0 vs 1) in
    # one hand-off run and 32.1 vs 32.9 ms in another (2026-11-23): no difference beyond the noise, so per layer stays.
    ipc_chunk_layers: int = 1
    # CUDA only: a batch's length is padded up to a multiple of this. SDPA's cuDNN attention builds an
    # execution plan per sequence length (tens of ms), so unpadded prompts of ever-new lengths paid that in
    # their TTFT under load; buckets bound the shapes (right padding leaves the real tokens exact).
    # With chunk_size a multiple of it, every chunk's length is one too.
    length_bucket: int = 256
    # CUDA only: a batch of at most this many padded tokens (rows rounded up to a power of two x length)
    # that fits in one chunk replays a CUDA graph (one per shape, captured on first use or at start with
    # warmup_graphs); 0 = always eager. H100, chain-1 of the 1B-shape models at 2K tokens: 15.1 -> 3.9 ms
    # ({16,16}) and 15.8 -> 2.6 ms ({8,8,8,8}): the eager forward is host-bound
    # (bench/engines.py --sections prefill, 2026-11-23; current figures in docs/results.md). Serving on one H100, with
    # 4096 and every graph captured at start: goodput 16.2 req/s at 16 req/s offered, TTFT p50 11-17 ms,
    # against 7.1 req/s eager. (An earlier run, graphs captured lazily while serving and each keeping its own K/V,
    # had lost goodput at 16 req/s.) Off here, so an engine built in code compiles nothing it was not asked
    # to; deploy/serve.yaml turns it on for the service.
    cuda_graph_tokens: int = 0
    warmup_graphs: bool = False        # with cuda_graph_tokens: capture every graph at start (no request meets a capture)

    def nixl_send(self, engine_device, same_host: bool = False) -> tuple[str, str]:
        """(arena device, checksum kind) of the nixl transport's sender for a prefill engine on ``engine_device``
        pushing to a decode worker on the same host or not."""
        dev = torch.device(engine_device)
        on_gpu = self.nixl_send_memory == "device" or (self.nixl_send_memory == "auto" and dev.type == "cuda")
        if on_gpu and dev.type != "cuda":
            raise ValueError(f"nixl_send_memory='device': the prefill engine runs on {dev}, not on a GPU")
        auto = ("none" if same_host else "wsum32") if on_gpu else default_checksum()
        kind = self.nixl_checksum if self.nixl_checksum != "auto" else auto
        return (str(dev) if on_gpu else "cpu"), kind

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "chunk_size", "max_queue", "kv_chunk_bytes", "length_bucket",
                     "nixl_arena_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.ipc_chunk_layers < 0:
            raise ValueError(f"ipc_chunk_layers={self.ipc_chunk_layers}: must be >= 0 (0 = all layers of a token range)")
        if self.cuda_graph_tokens < 0:
            raise ValueError(f"cuda_graph_tokens={self.cuda_graph_tokens}: must be >= 0 (0 = no CUDA graphs)")
        if self.chunk_size > self.max_batch_tokens:
            raise ValueError(f"chunk_size={self.chunk_size} exceeds max_batch_tokens={self.max_batch_tokens}")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s={self.default_timeout_s}: must be > 0")
        for name in ("checksum", "shm_checksum", "ipc_checksum", "nixl_checksum"):
            allowed = CHECKSUMS + (("auto",) if name == "nixl_checksum" else ())
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: allowed are {allowed}")
        if self.nixl_send_memory not in ("auto", "device", "host"):
            raise ValueError(f"nixl_send_memory={self.nixl_send_memory!r}: allowed are ('auto', 'device', 'host')")
        if "crc32c" in (self.checksum, self.shm_checksum, self.ipc_checksum, self.nixl_checksum) and default_checksum() != "crc32c":
            raise ValueError("checksum='crc32c' needs the crc32c package (pip install crc32c)")
