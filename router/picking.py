"""Picking the workers for one attempt of a request, waiting where none can take it now.

``_pick`` asks placement (``router/placement.py``) for a prefill and a decode worker (a colocated decode worker
prefills itself), leaving out workers that failed this request until they report again. With every decode pool
full for now, the request waits in the KV wait line (``router/kv_wait.py``), first come first served, until
``router.kv_wait_s`` is spent (then NoWorker(full): RESOURCE_EXHAUSTED); with no healthy worker of a role but one
that may come back, it waits for it within ``router.worker_wait_s`` (then Unavailable). Both waits end at the
request's deadline (DeadlineExceeded).

A mixin of ``Router`` (``router/core.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
import time

from colm.decode_worker.prefix_cache import block_hashes
from colm.router.placement import NoWorker
from colm.router.request import DeadlineExceeded, RequestSpec, Unavailable


class AttemptPicking:
    async def _pick(self, spec: RequestSpec, prompt: list[int], total_len: int, failed: dict[str, float],
                    decode_only: bool = False, kv_give_up: float | None = None, refused: str = "") -> tuple:
        """(prefill worker, decode worker) for one attempt (``decode_only``: a decode worker twice, for a call that
        needs no prefill). A worker that failed this request is left out until it reports again (Ray restarted it).
        With no healthy worker of a role but one that may come back (not dead), wait for it within the request's
        deadline and ``worker_wait_s``: a single decode worker's restart costs its streams seconds, not their
        requests. With every decode pool full for now, wait in the KV line (``router/kv_wait.py``) until
        ``kv_give_up`` (default: ``kv_wait_s`` from now); ``refused``: why a worker refused the last pick as full (its
        report was behind): wait before picking again."""
        give_up = min(spec.deadline, time.monotonic() + self.cfg.worker_wait_s)
        if kv_give_up is None:
            kv_give_up = time.monotonic() + self.cfg.kv_wait_s
        digests: dict[int, list[bytes]] = {}  # block size -> the prompt's digests, for prefix affinity
        try:
            if refused:
                await self._wait_for_blocks(spec, kv_give_up, refused)
            while True:
                if not self.kv_queue.may_try(spec.uid):  # others wait for blocks ahead of it: in line behind them
                    await self._wait_for_blocks(spec, kv_give_up, "requests ahead of it wait for KV blocks")
                    continue
                placed = self._try_pick(spec, prompt, total_len, failed, decode_only, digests)
                if isinstance(placed, tuple):
                    return placed
                e = placed
                if e.full:  # every decode pool full for now: wait for blocks, first come first served
                    await self._wait_for_blocks(spec, kv_give_up, str(e))
                    continue
                decode_alone = decode_only or any(self.registry.prefills_itself(w)
                                                  for w in self.registry.workers.values())
                may_return = all(any(not w.dead for w in self.registry.workers.values() if w.role == role)
                                 for role in (("decode",) if decode_alone else ("prefill", "decode")))
                if not may_return or time.monotonic() + self.cfg.poll_interval_s > give_up:
                    raise Unavailable(f"request {spec.request_id}: {e}") from None
                await asyncio.sleep(self.cfg.poll_interval_s)
        finally:
            self.kv_queue.leave(spec.uid)

    async def _wait_for_blocks(self, spec: RequestSpec, give_up: float, why: str) -> None:
        """In the KV wait line until woken or a poll interval passes; DeadlineExceeded at the request's deadline,
        NoWorker(full) (RESOURCE_EXHAUSTED) once ``router.kv_wait_s`` is spent."""
        now = time.monotonic()
        if now >= spec.deadline:
            raise DeadlineExceeded(f"request {spec.request_id} passed its deadline waiting for KV blocks ({why})")
        if now >= give_up:
            raise NoWorker(f"request {spec.request_id}: {why} (waited router.kv_wait_s={self.cfg.kv_wait_s:g} s)",
                           full=True)
        self.kv_queue.join(spec.uid)
        await self.kv_queue.wait(spec.uid, min(self.cfg.poll_interval_s, give_up - now, spec.deadline - now))

    def _try_pick(self, spec: RequestSpec, prompt: list[int], total_len: int, failed: dict[str, float],
                  decode_only: bool, digests: dict[int, list[bytes]]):
        """(prefill, decode) workers, or the NoWorker that says why none could be picked now."""
        exclude = {wid for wid, t in failed.items()
                   if (w := self.registry.workers.get(wid)) is None or w.reported_at <= t}
        try:
            bs = self.registry.affinity_block_size(exclude)
            if bs and bs not in digests:  # as the worker will hash them: the prompt but its last token
                digests[bs] = block_hashes(prompt[:-1], bs, spec.cache_salt)
            decode = self.registry.pick_decode(total_len, exclude=exclude, digests=digests.get(bs))
            if decode_only or self.registry.prefills_itself(decode):  # colocated: it prefills the prompt itself
                return decode, decode
            try:
                return self.registry.pick_prefill(len(prompt), exclude=exclude), decode
            except NoWorker:  # the decode pick is not taken: its blocks must not count against the next try
                self.registry.unpick_decode(decode, total_len)
                raise
        except NoWorker as e:
            return e
