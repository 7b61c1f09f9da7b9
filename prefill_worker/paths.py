"""Which KV transport a ``Prefill`` request takes (``PrefillRequest.path``): a thin front of ``colm.kv.registry``.

The registry holds every transport's needs and the one ``choose``; this keeps the older call shape.
"""

from __future__ import annotations

from colm.kv.registry import PairFacts, choose, names

TRANSFER_PATHS = ("auto", "grpc", "shm", "cuda_ipc", "cuda_pool", "nixl")


def choose_path(path: str, same_host: bool, prefill_cuda: bool, decode_cuda: bool,
                decode_transports: tuple[str, ...] = ()) -> str:
    """-> a transport name; ValueError for an unknown one, or one whose needs this side can see are unmet."""
    if path not in ("",) + TRANSFER_PATHS and path not in names():
        raise ValueError(f"path={path!r}: allowed are {('',) + TRANSFER_PATHS}")
    return choose(path, PairFacts(same_host, prefill_cuda, decode_cuda, tuple(decode_transports)))
