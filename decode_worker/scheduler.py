"""The decode engine's scheduler: which requests the next loop iteration runs, and how.

``Scheduler`` is a part of ``DecodeEngine`` (a mixin over its state: the lock, the requests, the running batch).
Each iteration, under the lock, ``_schedule`` ends what is due (cancelled, past a deadline, KV late: ``_housekeep``),
admits waiting requests in arrival order up to ``max_batch_size`` (``_waiting``: started, K/V complete; a sender's
ready event must have run), splits the running batch into plain-step rows and speculative rounds by (scale, gamma)
(``split_rounds``, a plain function) and, colocated, takes the prompt chunk the token budget leaves. For overlapped
steps (``DecodeConfig.overlap_steps``) it decides whether a batch may be queued ahead (``_can_overlap``) and which
rows the step queued ahead holds (``_next_batch``: the same rule as the admission, so the next iteration finds the
batch it was launched for).
"""

from __future__ import annotations

import time

from colm.errors import DeadlineError

from colm.decode_worker.request import DecodeRequest
from colm.decode_worker.speculative import round_gamma
from colm.decode_worker.step import queueable


def split_rounds(running, limit: int) -> tuple[list[DecodeRequest], dict[tuple[int, int], list[DecodeRequest]]]:
    """(plain-step rows, {(scale, gamma): speculative rows}) of the running batch, each in its order; past ``limit``
    running requests (``speculative_max_batch``; 0 = none) every row steps plainly."""
    batch: list[DecodeRequest] = []  # plain steps
    rounds: dict[tuple[int, int], list[DecodeRequest]] = {}  # (scale, gamma) -> its speculative rows
    drafting = not limit or len(running) <= limit  # past it, speculative rows step plainly
    for r in running:
        gamma = round_gamma(r) if drafting else 0
        if gamma:
            rounds.setdefault((r.scale, gamma), []).append(r)
        else:
            batch.append(r)
    return batch, rounds


class Scheduler:
    def _schedule(self):
        """(batch, scales, rounds, size, segments) of this iteration: the plain-step rows and their scales, the
        speculative rounds, the running batch's size and (colocated) the prompt chunk's segments."""
        with self._lock:
            self._housekeep()
            batch, rounds = split_rounds(self._running, self.config.speculative_max_batch)
            scales = [r.scale for r in batch]
            size = len(self._running)
            segments = self._take_prefill(batch, rounds) if self.config.colocated_prefill else []
        return batch, scales, rounds, size, segments

    def _housekeep(self) -> None:
        self._release_due()
        now = time.monotonic()
        for req in list(self._requests.values()):
            if req.running:
                if req.cancel is None and now > req.deadline:
                    req.cancel = DeadlineError(f"request {req.request_id}: reservation deadline passed")
                if req.cancel is not None:
                    self._finalize(req, req.cancel)
            elif now > req.deadline:
                self._finalize(req, DeadlineError(f"request {req.request_id}: reservation deadline passed"))
            elif req.started and not req.kv_done and now > req.kv_deadline:
                self._finalize(req, DeadlineError(f"request {req.request_id}: KV did not arrive in time"))
        self._ready_polling = False
        for req in list(self._waiting()):
            if len(self._running) >= self.config.max_batch_size:
                break
            if req.kv_ready is not None and not self._writes_ran(req):
                continue
            req.running = True
            self._running.append(req)
            req.timeline.mark("admitted")

    def _waiting(self, joining: frozenset = frozenset()):
        """The requests admission takes next, in its order (arrival: dicts keep insertion order): started, not running,
        their K/V complete, or completing this iteration (``joining``: ids). Under the lock. The one rule of both the
        admission and the step queued ahead of it (``_next_batch``)."""
        for req in self._requests.values():
            if not req.running and req.started and (req.kv_done or id(req) in joining):
                yield req

    # ---------------------------------------------------------------- overlapped steps (DecodeConfig.overlap_steps)
    def _mixed_ahead(self) -> bool:
        """A batch of mixed scales may be queued ahead: it runs as one forward ("widest"), and as one graph where
        graphs run (a mixed graph that failed to capture leaves such batches to ``decode_step``'s hidden graph)."""
        return self.config.mixed_scale_mode == "widest" and (self.graphs is None or self.graphs.mixed_enabled)

    def _can_overlap(self, batch, scales) -> bool:
        return (self._overlap and (len(set(scales)) == 1 or self._mixed_ahead())
                and all(queueable(r) and r.cancel is None for r in batch))

    def _next_batch(self, batch, scales, joining) -> tuple[list, list[int], list[int]] | None:
        """(rows, carry, scales) of the step after ``batch`` (run at ``scales``) as the next iteration will run it:
        the rows that go on (their indices in ``batch``), then the requests the admission will add (``joining`` and
        any others ready), in its order, each at its scale; None when nothing goes on or a joining request could
        not share an overlapped step (its scale differs and mixed batches do not run as one forward)."""
        carry = [i for i, r in enumerate(batch) if len(r.out_tokens) + 2 <= r.params.max_new_tokens]
        rows = [batch[i] for i in carry]
        row_scales = [scales[i] for i in carry]
        mixed_ok = self._mixed_ahead()
        with self._lock:  # gRPC threads add requests meanwhile
            for req in self._waiting(frozenset(map(id, joining))):  # as _housekeep admits, up to max_batch_size
                if len(rows) >= self.config.max_batch_size:
                    break
                if (req.kv_ready is not None or req.cancel is not None or not queueable(req) or round_gamma(req)
                        or (not mixed_ok and req.scale != scales[0])):
                    return None  # it would not join this step as a row picked on the device: no step ahead
                rows.append(req)
                row_scales.append(req.scale)
        return (rows, carry, row_scales) if rows else None

