"""Which KV transport a ``Prefill`` request takes (``PrefillRequest.path``): a thin front of ``colm.kv.registry``.

The registry holds every transport's needs and the one ``choose``; this keeps the older call shape.
"""

from __future__ import annotations

from colm.kv.registry import PairFacts, choose


def choose_path(path: str, same_host: bool, prefill_cuda: bool, decode_cuda: bool,
                decode_transports: tuple[str, ...] = ()) -> str:
    """-> a transport name; ValueError for an unknown one, or one whose needs this side can see are unmet."""
    return choose(path, PairFacts(same_host, prefill_cuda, decode_cuda, tuple(decode_transports)))
