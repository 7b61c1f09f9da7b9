"""The colocated engine's prefill: the decode engine computes its own requests' chain-1 K/V.

``ColocatedPrefill`` is a part of ``DecodeEngine`` (a mixin over its state) used when
``DecodeConfig.colocated_prefill`` is on: ``prefill_kv`` queues a reserved request's prompt (all but the last
token); each loop iteration takes the chunks the token budget leaves after the decode rows (``prefill_schedule``),
runs them packed through chain 1 into the requests' blocks (``chunked_prefill``) after the decode step's tokens were
read, and marks a request's KV done once its last chunk ran. A request whose chunk is in the forward is only marked
when it is aborted (``prefilling``); the loop finalizes it after the forward. Prefix caching (``prefix_cache``): a
prompt's cached leading blocks are taken over, and a prompt whose next block another queued prompt computes waits
for it.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import torch

from colm.errors import RequestFailedError

from colm.decode_worker import chunked_prefill
from colm.decode_worker.block_pool import blocks_for
from colm.decode_worker.prefill_schedule import Segment, take_chunk
from colm.decode_worker.prefix_cache import MAX_CACHE_SALT, block_hashes

log = logging.getLogger("colm.decode")


class ColocatedPrefill:
    def prefill_kv(self, request_id: str, token_ids, cache_salt: str = "") -> None:
        """colocated_prefill: compute the K/V of ``token_ids`` (the prompt but its last token) in this engine's own
        step loop; the request is admitted once they are all in its blocks. With prefix caching the leading blocks
        an earlier prompt computed are taken over (at ``reserve`` when it was given the tokens, else here) and only
        the rest is prefilled; a prompt wholly cached is ready at once."""
        with self._wake:
            req = self._get(request_id)
            try:
                if not self.config.colocated_prefill:
                    raise ValueError("this decode worker does not prefill prompts itself (colocated_prefill is off)")
                ids = self._prefill_ids(request_id, token_ids, req.prompt_len)
                if req.layout is not None or req.prompt_tokens is not None:
                    raise ValueError(f"request {request_id}: its KV was already given")
                if req.reserved_tokens is not None and not np.array_equal(ids, req.reserved_tokens):
                    raise ValueError(f"request {request_id}: the prompt tokens differ from those given at reserve")
                digests = req.prefix_digests  # matched at reserve, or hashed now (a bad cache_salt fails the request)
                if digests is None:
                    digests = self._prefix_digests(ids, cache_salt)
            except ValueError as e:
                self._fail(req, e)
                raise
            req.prompt_tokens, req.prefix_digests = ids, digests
            if req.prefix_digests:
                self._num_prefix_query_tokens += len(ids)
                self._num_prefix_hit_tokens += req.cached_blocks * self.pool.block_size  # found at reserve
            req.timeline.mark("kv_header")
            if not len(ids):  # a one-token prompt: nothing to compute (reserve marked its K/V done)
                return
            if not self._take_over_cached(req):
                self._claim(req)  # the blocks it will compute, unless an earlier request computes them already
                self._prefill_queue.append(req)
            self._wake.notify_all()

    def _take_over_cached(self, req) -> bool:
        """Before ``req``'s own chunks begin: the cached blocks that continue its cached prefix replace its own
        (reserved, never written), and its prefill moves past them. True when nothing is left to compute (its K/V
        are done)."""
        bs = self.pool.block_size
        hits = self.pool.match(req.prefix_digests[req.cached_blocks:])
        if hits:
            a, b = req.cached_blocks, req.cached_blocks + len(hits)
            fresh = req.blocks[a:b]
            req.blocks = req.blocks[:a] + hits + req.blocks[b:]  # a new list: tables cached per list see the change
            self.pool.free(fresh)
            req.cached_blocks = b
            self._num_prefix_hit_tokens += len(hits) * bs
        req.prefilled = req.cached_blocks * bs  # the chunks start after the cached blocks
        if req.prefilled < len(req.prompt_tokens):
            return False
        req.kv_done = True
        req.timeline.mark("kv_done")
        return True

    def _ready_to_prefill(self, req) -> bool:
        """Whether ``take_chunk`` may schedule ``req`` now (under the lock). A prompt whose next block an earlier
        request is computing waits for it (prefix caching: one computation per shared block, even for prompts that
        arrive together), takes over every block registered meanwhile, and is ready once nobody live computes the
        block it needs next. A prompt wholly cached that way is done (``kv_done``) and leaves the queue."""
        if not req.prefix_digests or req.prefilled != req.cached_blocks * self.pool.block_size:
            return True  # no cache, or its own chunks have begun
        if self._take_over_cached(req):
            return False  # wholly cached now: done, and ``live`` drops it from the queue
        if req.cached_blocks < len(req.prefix_digests):
            other = self._computing.get(req.prefix_digests[req.cached_blocks])
            if other is not None and other is not req and self._computes(other):
                return False
        self._claim(req)  # it computes them now: prompts behind it wait for it
        return True

    def _computes(self, req) -> bool:
        """``req`` is live and will go on prefilling (not ended, not cancelled)."""
        return self._requests.get(req.request_id) is req and req.cancel is None

    def _claim(self, req) -> None:
        """``req`` computes its uncached full blocks, except those a live earlier request computes."""
        for d in req.prefix_digests[req.cached_blocks:]:
            other = self._computing.get(d)
            if other is None or not self._computes(other):
                self._computing[d] = req

    def _forget_computing(self, req, digests) -> None:
        """``req`` no longer computes the blocks of ``digests`` (cached now, or it ended)."""
        for d in digests:
            if self._computing.get(d) is req:
                del self._computing[d]

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (later prompts compute theirs again; requests holding cached blocks keep them
        until they end). The number of idle cached blocks that became plain free blocks."""
        return self.pool.clear_cache()

    def _prefill_ids(self, request_id: str, token_ids, prompt_len: int) -> np.ndarray:
        """The prompt's tokens but the last as int64 [prompt_len - 1], or ValueError naming what is wrong."""
        try:
            ids = np.asarray(token_ids, dtype=np.int64)  # [n]
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"request {request_id}: prompt token ids must be integers ({e})") from None
        if ids.ndim != 1 or len(ids) != prompt_len - 1:
            raise ValueError(f"request {request_id}: {list(ids.shape)} prompt tokens to prefill, the "
                             f"reservation needs {prompt_len - 1} (the prompt but its last token)")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"request {request_id}: prompt token ids must be in 0..{self.cfg.vocab_size - 1}")
        return ids

    def _prefix_digests(self, ids: np.ndarray, cache_salt: str = "") -> list[bytes]:
        """The digests of ``ids``' full blocks, or [] where prefix caching is off."""
        if not (self.config.prefix_caching and self.config.colocated_prefill):
            return []
        if not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT:
            raise ValueError(f"cache_salt: must be a string of at most {MAX_CACHE_SALT} characters")
        return block_hashes(ids, self.pool.block_size, cache_salt)

    def _take_prefill(self, batch, rounds) -> list:
        """This iteration's prompt chunks (under the lock): what the budget leaves after the decode rows (``batch``:
        one token each; ``rounds``: (scale, gamma) -> rows, gamma + 1 tokens each)."""
        decode_tokens = len(batch) + sum(len(rows) * (g + 1) for (_, g), rows in rounds.items())
        if not self._prefill_queue:
            if decode_tokens:  # an iteration that found nothing to do is none
                self.iterations.append((decode_tokens, 0))
            return []
        # the fixed budget counts the rows' tokens too; the adaptive one (chunk_budget) is the prompt's share alone
        self._chunk_allowed = min(self.chunk_budget.tokens(decoding=bool(decode_tokens)),
                                  self.config.max_batched_tokens - decode_tokens)
        segments = take_chunk(self._prefill_queue, self._chunk_allowed,
                              self.config.max_prefill_segments,
                              lambda r: self._computes(r) and not r.kv_done,
                              self._ready_to_prefill)
        for s in segments:
            s.request.prefilling = True
            s.request.timeline.mark("prefill_first_chunk")
        self.iterations.append((decode_tokens, sum(s.num_tokens for s in segments)))
        return segments

    def _warm_prefill(self) -> int:
        """Run a prompt chunk of every power-of-two size up to ``max_batched_tokens`` once (the kernels tune per
        size bucket: no request meets a tuning), into blocks taken and given back here; the sizes run."""
        n = min(self.config.max_batched_tokens, self.cfg.max_seq_len)
        blocks = self.pool.allocate(blocks_for(n, self.pool.block_size))
        try:
            dummy = types.SimpleNamespace(prompt_tokens=np.zeros(n, dtype=np.int64), blocks=blocks)
            sizes = sorted({min(1 << i, n) for i in range(n.bit_length() + 1)})
            for size in sizes:
                chunked_prefill.run_prefill_chunk(self.model, self.pool, [Segment(dummy, 0, size)], self._prefill_scale)
                if size < n:  # a later chunk of a prompt (attention over keys read back from the pool)
                    chunked_prefill.run_prefill_chunk(self.model, self.pool, [Segment(dummy, size, min(n, 2 * size))],
                                                      self._prefill_scale)
            if self.prefill_graphs is not None:
                log.info("captured %d colocated prefill graphs", self.prefill_graphs.warm_up())
            torch.cuda.synchronize(self.device)
        finally:
            self.pool.free(blocks)
        return len(sizes)

    def _run_prefill(self, segments) -> dict:
        """The chunk's forward (outside the lock); a failed chunk is redone segment by segment (each writes the
        same K/V into the same slots), and a segment that fails alone fails its request: {request: error}."""
        try:
            self._forward_chunk(segments)
            return {}
        except Exception as batch_error:  # noqa: BLE001 - a failed chunk ends only the requests that fail alone
            failed = {}
            for s in segments:
                try:
                    if len(segments) == 1:
                        raise batch_error
                    chunked_prefill.run_prefill_chunk(self.model, self.pool, [s], self._prefill_scale)
                except Exception as e:  # noqa: BLE001
                    log.exception("request %s failed in its prefill chunk; the worker goes on serving",
                                  s.request.request_id)
                    failed[s.request] = RequestFailedError(
                        f"request {s.request.request_id}: prefill failed ({type(e).__name__}: {e}); the worker "
                        "goes on serving")
            return failed

    def _forward_chunk(self, segments) -> None:
        """The chunk replays a ``prefill_graphs`` graph when one takes it, else runs eagerly (``chunked_prefill``)."""
        if self.prefill_graphs is None or not self.prefill_graphs.run(segments):
            chunked_prefill.run_prefill_chunk(self.model, self.pool, segments, self._prefill_scale)

    def _end_prefill(self, segments, failed: dict, ms: float, steer: bool = False) -> None:
        """After the chunk (under the lock): complete prompts are ready, ended or failed requests are finalized;
        with ``steer`` (rows ran in the iteration, and no graph capture or kernel tuning), its time ``ms`` steers the
        next iterations' prompt budget."""
        if segments:
            tokens = sum(s.num_tokens for s in segments)
            self._num_prefill_chunks += 1
            self._prefill_recent.append((tokens, ms / 1000.0))
            self.chunk_budget.observe(ms, steer, tokens, self._chunk_allowed)
        for s in segments:
            req = s.request
            req.prefilling = False
            exc = failed.get(req) or req.cancel
            if exc is not None:
                self._finalize(req, exc)
                continue
            if self._requests.get(req.request_id) is not req:
                continue
            if req.prefix_digests:  # the full blocks this chunk completed: later prompts may take them over already
                done = min(len(req.prefix_digests), s.end // self.pool.block_size)
                self.pool.register(req.blocks[:done], req.prefix_digests[:done])
                self._forget_computing(req, req.prefix_digests[:done])
            if s.end == len(req.prompt_tokens):
                req.kv_done = True
                req.timeline.mark("prefill_last_chunk")
                req.timeline.mark("kv_done")
