"""The decode engine's runner: one loop iteration's forward work, and its tokens handed out.

``StepRunner`` is a part of ``DecodeEngine`` (a mixin over its state). ``step`` takes the iteration the scheduler
chose (``_schedule``), runs it outside the lock (the plain step of its batch, each speculative round, the colocated
prompt chunk) and then, under the lock, records its time and hands each row its token(s) (``_emit``; a stop ends the
request). A plain step runs either synchronously (``decode_worker.step.decode_step``) or overlapped: step n+1 is
queued on the device before step n's tokens are read (``_overlapped``; a queued step whose batch no longer holds is
dropped, ``_drop_ahead``). A step or round that raises is redone row by row (``_isolated``): a row that fails alone
ends only its request, and the worker goes on serving.
"""

from __future__ import annotations

import logging
import time

from colm.errors import NoTokenAllowedError, RequestFailedError
from colm.kernels._tuning import num_tuned

from colm.decode_worker.request import DecodeRequest, TokenEvent, stop_reason
from colm.decode_worker.speculative import speculative_round
from colm.decode_worker.step import decode_step, launch_step

log = logging.getLogger("colm.decode")


class StepRunner:
    def step(self) -> int:
        """Admit ready requests and advance every running sequence: one token, or one speculative round (one or
        more tokens) for a request with ``speculative`` at a scale above 1; returns the batch size."""
        batch, scales, rounds, size, segments = self._schedule()
        if not size and not segments:
            return 0
        t0 = time.perf_counter()
        warmed = self._warm_marks()
        if rounds:
            self._drop_ahead()  # a step queued ahead for rows now drafting is stale (their positions move by rounds)
        # A step queued ahead is dropped (waited for, its work thrown away) when the next batch is not the one it
        # was launched for. It is launched for this batch's rows that go on, then the prompts this chunk completes.
        joining = [s.request for s in segments if s.end == len(s.request.prompt_tokens)]
        # The chunk goes on the GPU right behind the decode step, before the host waits for the step's tokens
        # (overlapped steps): the GPU runs it while the host reads and hands them out, with no gap between the two.
        chunk: list[dict] = []

        def run_chunk() -> None:
            if segments and not chunk:
                chunk.append(self._run_prefill(segments))  # never raises: a failure fails only its requests

        results = self._plain_step(batch, scales, may_overlap=not rounds, joining=joining,
                                   before_read=run_chunk) if batch else []
        spec = {key: self._spec_round(rows, *key) for key, rows in rounds.items()}
        run_chunk()  # a step that read its tokens synchronously (or none): the chunk runs after it
        failed = chunk[0] if chunk else {}
        dt = (time.perf_counter() - t0) * 1000.0
        with self._lock:
            timed = self._warm_marks() == warmed  # a capture or a tuning is not a step time (nor a round)
            self._end_prefill(segments, failed, dt, steer=bool(size) and timed)
            if not size:
                self.mux.flush()
                return len(segments)
            self._num_steps += 1
            self._last_step_ms, self._last_batch = dt, size
            if timed and not rounds:
                self._step_times.record(max(scales), dt, len(batch))
            elif timed and not batch and not segments and len(rounds) == 1:
                (s, gamma), rows = next(iter(rounds.items()))  # the iteration was one round: its time is the round's
                self._round_times.record(f"{s}:{gamma}", dt, len(rows))
            for req, s, result in zip(batch, scales, results):
                if req.cancel is not None or not req.running or result is None:
                    continue
                self._emit(req, s, result[0], result[1], top=result[2] if len(result) > 2 else ())
            for (s, gamma), rows in rounds.items():
                for req, toks in zip(rows, spec[(s, gamma)]):
                    if req.cancel is not None or not req.running or toks is None:
                        continue
                    self._num_drafted += gamma
                    for t in toks:  # accepted drafts past a stop (EOS, a stop token) are never emitted: not counted
                        self._num_draft_accepted += t.drafted
                        if self._emit(req, s, t.token_id, t.logprob, t.drafted):
                            break
        self.mux.flush()  # one hand-over per step to each subscriber, whatever the batch size
        return size

    def _plain_step(self, batch, scales, may_overlap: bool, joining=(),
                    before_read=None) -> list[tuple[int, float] | None]:
        """One step of ``batch``; ``before_read``: called once the step's GPU work is queued and before its tokens
        are read (overlapped steps only); ``joining``: requests whose K/V this iteration completes."""
        try:
            if may_overlap and self._can_overlap(batch, scales):
                return self._overlapped(batch, scales, joining, before_read)
            self._drop_ahead()
            return decode_step(self.model, batch, self.pool, scales, self.config.mixed_scale_mode, self.graphs)
        except Exception as e:  # noqa: BLE001 - a failed step ends only the requests that fail alone
            self._drop_ahead(quiet=True)
            return self._isolated(batch, scales, e)

    def _spec_round(self, rows, scale: int, gamma: int):
        """One speculative round of ``rows``; a failed round is redone row by row (a round rewrites the same K/V
        into the same slots), and a row that fails alone ends its request (None in its place)."""
        try:
            return speculative_round(self.model, rows, self.pool, scale, gamma, self.graphs, self.verify_graphs,
                                     self.config.verify_attention)
        except Exception as batch_error:  # noqa: BLE001
            return self._isolated(rows, [scale] * len(rows), batch_error,
                                  lambda req, s: speculative_round(self.model, [req], self.pool, s, gamma, None, None,
                                                                   self.config.verify_attention)[0])

    def _emit(self, req: DecodeRequest, scale: int, tok: int, lp: float, drafted: bool = False, top=()) -> bool:
        """Hand out one new token of ``req`` (under the lock); True when it ended the request."""
        req.num_cached += 1
        req.out_tokens.append(tok)
        req.next_input = tok
        reason = stop_reason(req, tok, self.eos_id, self.detokenize)
        timeline, started_s = None, 0.0
        if len(req.out_tokens) == 1:
            req.timeline.mark("first_token")
            timeline, started_s = req.timeline.relative_ms("started")
        req.stream.push(TokenEvent(req.request_id, tok, len(req.out_tokens) - 1, scale, reason,
                                   req.timeline.ms_since("started"), lp, timeline, started_s, drafted, tuple(top)))
        if reason:
            self._finalize(req)
        return bool(reason)

    def _isolated(self, batch, scales, batch_error: Exception, run_one=None) -> list:
        """The batch's step failed: run each row alone (a step rewrites the same K/V into the same slots, so a
        row that already ran is redone exactly). A row that fails alone ends its request; None in its place.
        ``run_one(req, scale)``: one row's step (default: a plain decode step)."""
        if run_one is None:
            run_one = lambda req, s: decode_step(self.model, [req], self.pool, [s],  # noqa: E731
                                                 self.config.mixed_scale_mode, None)[0]
        results: list = []
        for req, s in zip(batch, scales):
            try:
                if len(batch) == 1:  # it failed alone already
                    raise batch_error
                results.append(run_one(req, s))
            except NoTokenAllowedError as e:  # the request's constraints, not the worker: INVALID_ARGUMENT, no retry
                log.info("request %s: %s", req.request_id, e)
                with self._lock:
                    self._finalize(req, e)
                results.append(None)  # every row keeps its place: the rows after it get their own tokens
            except Exception as e:  # noqa: BLE001 - this request's own failure
                log.exception("request %s failed in its decode step; the worker goes on serving", req.request_id)
                with self._lock:
                    self._num_step_errors += 1
                    self._finalize(req, RequestFailedError(f"request {req.request_id}: decode step failed "
                                                           f"({type(e).__name__}: {e}); the worker goes on serving"))
                results.append(None)
        return results

    def _warm_marks(self) -> tuple[int, int]:
        return (self.graphs.num_captures if self.graphs is not None else 0), num_tuned()

    # ---------------------------------------------------------------- overlapped steps (DecodeConfig.overlap_steps)
    def _overlapped(self, batch, scales, joining=(), before_read=None) -> list[tuple[int, float]]:
        """Step n's tokens, with step n+1 queued before they are read: for the rows that go on past step n (not
        ending by length) and then ``joining`` (requests whose K/V ``before_read`` completes, as the next
        iteration will admit them). A queued step whose batch or scale no longer holds (a row stopped at a stop
        token, a request was cancelled) is waited for and dropped; the next step redoes its work from the host's
        state (the same K/V into the same slots)."""
        cur = self._ahead if self._ahead is not None and self._ahead.matches(batch, scales) else None
        if cur is None:
            self._drop_ahead()
            cur = launch_step(self.model, batch, self.pool, scales, self.graphs, sample=True)
        else:
            self._num_ahead_used += 1
        self._ahead = None
        try:
            if before_read is not None:  # the chunk: before step n+1, which reads the K/V it completes
                before_read()
            nxt = self._next_batch(batch, scales, joining)
            if nxt is not None:
                rows, carry, row_scales = nxt
                self._ahead = launch_step(self.model, rows, self.pool, row_scales, self.graphs, after=cur,
                                          carry=carry, sample=True)
            return cur.result()
        except Exception:  # the rows are redone one by one: each draws again what it drew here
            self._drop_ahead(quiet=True)
            cur.undraw()
            raise

    def _drop_ahead(self, quiet: bool = False) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return
        self._num_ahead_dropped += 1
        try:
            ahead.wait()
        except Exception:  # noqa: BLE001 - a failing device surfaces in the step that reads it
            if not quiet:
                raise
        finally:
            ahead.undraw()  # the step that redoes its rows draws their uniforms again
