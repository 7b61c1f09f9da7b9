"""Which KV hand-off path a ``Prefill`` request takes (``PrefillRequest.path``).

| path | payload | when |
| --- | --- | --- |
| ``grpc`` | raw bytes in the ``PushKV`` chunks | any two hosts |
| ``shm`` | POSIX shared memory, ``PushKV`` only signals | same host |
| ``cuda_ipc`` | one device staging tensor opened by decode through CUDA IPC, ``PushKV`` only signals | same host, both on CUDA |
| ``cuda_pool`` | written by prefill straight into decode's blocks (pool opened through CUDA IPC), ``WriteKV`` only signals | same host, both on CUDA |

``""`` keeps the behaviour of requests from before ``path`` existed (``shm`` when ``same_host``, else
``grpc``); ``auto`` takes the fastest path the request's flags allow (``cuda_pool`` on one host with
both sides on CUDA: ~2 ms less TTFT at 8K than ``cuda_ipc`` on an H100, bench/results/handoff_*_run9).
"""

from __future__ import annotations

TRANSFER_PATHS = ("auto", "grpc", "shm", "cuda_ipc", "cuda_pool")


def choose_path(path: str, same_host: bool, prefill_cuda: bool, decode_cuda: bool) -> str:
    """-> "grpc" | "shm" | "cuda_ipc" | "cuda_pool"; ValueError for an unknown path, or a CUDA path without CUDA
    on this side."""
    if path == "":
        return "shm" if same_host else "grpc"
    if path not in TRANSFER_PATHS:
        raise ValueError(f"path={path!r}: allowed are {('',) + TRANSFER_PATHS}")
    if path == "auto":
        if same_host and prefill_cuda and decode_cuda:
            return "cuda_pool"
        return "shm" if same_host else "grpc"
    if path in ("cuda_ipc", "cuda_pool") and not prefill_cuda:
        raise ValueError(f"path={path!r} needs the prefill worker on CUDA; this one runs on CPU "
                         "(use path 'shm', 'grpc' or 'auto')")
    return path
