"""Prefix affinity: send a prompt to the colocated decode worker most likely to hold its prefix's K/V.

Each colocated decode worker keeps its own prefix cache (``decode_worker.prefix_cache``), so a prompt hits only the
cache of the worker it lands on. The router remembers, per worker, the block digests of the prompts it placed there
(the worker's own digests: same block size, same salt) and counts how many leading digests of a new prompt it sent
to each worker. That is an estimate of the worker's cache, which may have evicted since (SGLang's cache-aware router
keeps an approximate tree per worker for the same reason); a wrong guess costs a prefill, never a wrong token.

Load comes first: ``WorkerRegistry.pick_decode`` lets affinity choose only among the workers with room whose
sequences are within ``RouterConfig.prefix_affinity_balance`` of the least loaded one, so one popular prefix cannot
pile every request onto one worker.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixAffinity:
    """Per worker, the digests of the prompt blocks placed there, least recently placed evicted first."""

    def __init__(self, max_digests_per_worker: int = 1 << 15) -> None:
        if max_digests_per_worker < 1:
            raise ValueError(f"max_digests_per_worker={max_digests_per_worker}: must be >= 1")
        self.max_digests = max_digests_per_worker
        self._seen: dict[str, OrderedDict[bytes, None]] = {}

    def matched(self, worker_id: str, digests: list[bytes]) -> int:
        """How many leading ``digests`` were placed on ``worker_id``."""
        seen = self._seen.get(worker_id)
        if not seen:
            return 0
        n = 0
        for d in digests:
            if d not in seen:
                break
            n += 1
        return n

    def record(self, worker_id: str, digests: list[bytes]) -> None:
        """``digests`` (a prompt's, in order) were placed on ``worker_id``."""
        seen = self._seen.setdefault(worker_id, OrderedDict())
        for d in reversed(digests):  # the prompt's first block ends up the most recent: a prefix's root is kept longest
            seen[d] = None
            seen.move_to_end(d)
        while len(seen) > self.max_digests:
            seen.popitem(last=False)

    def forget(self, worker_id: str) -> None:
        """The worker restarted or left: its cache is gone."""
        self._seen.pop(worker_id, None)
