"""``DecodeEngine``: the full-chain decode worker's core (plain class: no gRPC, no Ray).

Path of a request: ``reserve`` takes blocks for prompt + max_new_tokens from the ``BlockPool`` ->
``begin_kv`` / ``write_kv`` / ``finish_kv`` fill them with the prompt's K/V (all but the last token)
-> ``start_generation`` gives sampling, scale and returns a ``TokenStream`` -> the step loop admits
the request once its KV is complete and feeds the last prompt token at the request's scale (that
step yields token 1), then one token per step in the continuous batch (``decode_worker.step``);
``set_scale`` applies from the next token -> finish / abort / deadline / failure frees the blocks.

The engine is six parts over one state: this module (reservations, generation control, ending requests, the loop
thread), ``scheduler.Scheduler`` (admission; each iteration's batch, speculative rounds and step queued ahead),
``runner.StepRunner`` (an iteration's forward work: plain, overlapped and speculative steps, a failing row isolated;
its tokens handed out), ``kv_intake.KVIntake`` (the KV target a transport's receiver calls: bytes, or grants to a
sender that writes the blocks itself, with the held-block lifetime that needs), ``colocated.ColocatedPrefill``
(with ``DecodeConfig.colocated_prefill``, ``prefill_kv`` gives the prompt's tokens instead of a KV stream and the
step loop computes their chain-1 K/V itself, in chunks under a token budget: one process and one CUDA context serve
both phases, which is what one GPU wants) and ``step_stats.StatsReport`` (``stats``).

Threads: gRPC handlers call the public methods; one loop thread (``start``) runs the steps. All
bookkeeping is under one lock; the forward runs outside it. A running request is ended only by the
loop thread (``cancel`` marks it), so its blocks are never freed under a step that reads them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from colm import checkpoint
from colm.config import servable
from colm.errors import CapacityError, PeerUnavailableError, RequestAbortedError, UnknownRequestError
from colm.graphed_forward import GraphedForward
from colm.host_identity import host_id as current_host_id
from colm.kv_wire import parse_dtype
from colm.model import CoLM
from colm.logits_adjust import make_adjuster, reads_prompt
from colm.sampling import SamplingParams
from colm.scoring import prompt_logprobs
from colm.structured import compile_output

from colm.decode_worker.block_pool import BlockPool, blocks_for, num_blocks_from_memory
from colm.decode_worker.chunk_budget import ChunkBudget
from colm.decode_worker.colocated import ColocatedPrefill
from colm.decode_worker.config import DecodeConfig, check_speculative
from colm.decode_worker.graphs import DecodeGraphs
from colm.decode_worker.kv_intake import KVIntake
from colm.decode_worker.prefill_graphs import PackedPrefillGraphs
from colm.decode_worker.request import DecodeRequest, Reservation, TokenEvent, TokenStream
from colm.decode_worker.runner import StepRunner
from colm.decode_worker.scheduler import Scheduler
from colm.decode_worker.step import LaunchedStep
from colm.decode_worker.step_stats import DecodeStats, StatsReport, StepTimes
from colm.decode_worker.token_mux import MuxStream, Subscription, TokenMux
from colm.decode_worker.verify_graphs import VerifyGraphs
from colm.loop_thread import LoopOwner, LoopThread

log = logging.getLogger("colm.decode")


class DecodeEngine(KVIntake, ColocatedPrefill, Scheduler, StepRunner, StatsReport, LoopOwner):
    loop_owner = "decode engine"  # EngineDeadError's messages name it

    def __init__(self, model: CoLM, config: DecodeConfig | None = None, eos_id: int | None = None,
                 detokenize=None, host_id: str | None = None, tokenizer=None) -> None:
        cfg = model.cfg
        reason = servable(cfg)  # the prefill worker's chain-1 K/V are this model's K/V
        if reason is not None:
            raise ValueError(f"DecodeEngine: {reason}")
        self.model = model.eval()
        self.cfg = cfg
        self.config = config or DecodeConfig()
        self.eos_id = eos_id
        self.detokenize = detokenize
        self.tokenizer = tokenizer  # structured output compiles its grammar for this vocabulary
        self.host_id = host_id or current_host_id()
        self.device = model.inv_freq.device
        if self.device.type == "cuda":
            model.fuse_projections()  # fewer launches per layer (CPU keeps the separate ones: bit-stable tests)
        self.dtype = next(model.parameters()).dtype
        num_blocks = self.config.num_blocks
        if num_blocks == 0:
            if self.device.type != "cuda":
                raise ValueError("DecodeConfig.num_blocks=0 sizes the pool from free GPU memory: give a count on CPU")
            num_blocks = num_blocks_from_memory(cfg, self.config.block_size, self.dtype, self.device,
                                                self.config.gpu_memory_fraction)
        self.pool = BlockPool(cfg, num_blocks, self.config.block_size, self.device, self.dtype)
        self.graphs = (DecodeGraphs(self.model, self.pool, self.config.max_batch_size)
                       if self.config.cuda_graphs and self.device.type == "cuda" else None)
        self.verify_graphs = (VerifyGraphs(self.model, self.pool, self.config.max_batch_size, cfg.max_seq_len,
                                           attention=self.config.verify_attention)
                              if self.config.cuda_graphs and self.device.type == "cuda" else None)
        self.score_graphs = (GraphedForward(self.model, self.config.score_graph_tokens)
                             if self.config.score_graph_tokens and self.device.type == "cuda" else None)
        self._requests: dict[str, DecodeRequest] = {}
        self._running: list[DecodeRequest] = []
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._runner = LoopThread(self._loop, "colm-decode-loop", self._wake, join_timeout_s=10)
        self._runner.on_error.append(self._loop_died)
        self._step_times = StepTimes()
        self._round_times = StepTimes()  # iterations that were one speculative round only, by "scale:gamma"
        self._num_steps = self._num_finished = self._num_failed = self._num_step_errors = 0
        self._num_drafted = self._num_draft_accepted = 0
        self._num_prefix_query_tokens = self._num_prefix_hit_tokens = 0
        self._overlap = self.config.overlap_steps if self.config.overlap_steps is not None else self.graphs is not None
        self._ahead: LaunchedStep | None = None  # overlap_steps: the next step, queued before this one was read
        self._num_ahead_used = self._num_ahead_dropped = 0
        self._last_step_ms, self._last_batch = 0.0, 0
        self._held: list[DecodeRequest] = []  # ended while a cuda_pool sender could write their blocks
        self._pool_export = None  # colm.kv_ipc.StagingExport of the pool, made on the first grant
        self._ready_polling = False  # a request waits only for its sender's ready event: poll, do not idle
        self.mux = TokenMux()  # subscribers (routers) that take their requests' tokens batched, once per step
        self._prefill_queue: collections.deque[DecodeRequest] = collections.deque()  # colocated_prefill, FIFO
        self._computing: dict[bytes, DecodeRequest] = {}  # prefix caching: a block's digest -> who will compute it
        self._prefill_recent: collections.deque = collections.deque(maxlen=32)  # (tokens, seconds) per chunk
        self._num_prefill_chunks = 0
        self.chunk_budget = ChunkBudget(self.config.max_batched_tokens, self.config.tpot_target_ms,
                                        self.config.tpot_min_prompt_tokens)
        self._chunk_allowed = 0  # the prompt tokens the iteration being run was allowed
        self._prefill_scale = cfg.check_scale(self.config.prefill_scale or None)
        # colocated: prompt chunks replay CUDA graphs of the prefill that write the pool
        self.prefill_graphs = (PackedPrefillGraphs(self.model, self.pool, self.config.max_batched_tokens,
                                                   self.config.max_prefill_segments, cfg.max_seq_len,
                                                   scale=self._prefill_scale)
                               if self.config.colocated_prefill and self.config.cuda_graphs and self.device.type == "cuda"
                               else None)
        # (decode tokens, prefill tokens) of recent iterations: the budget's accounting, for stats and tests
        self.iterations: collections.deque = collections.deque(maxlen=4096)

    @classmethod
    def from_checkpoint(cls, path, config: DecodeConfig | None = None, device="cpu", dtype=None,
                        host_id: str | None = None) -> "DecodeEngine":
        from colm.tokenizer import load_checkpoint_tokenizer

        model = checkpoint.load(path, scale=None, device=device, dtype=dtype)
        tok = load_checkpoint_tokenizer(path)
        return cls(model, config, eos_id=getattr(tok, "eos_id", None), detokenize=tok.decode, host_id=host_id,
                   tokenizer=tok)

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "DecodeEngine":
        if self.config.warmup_context and self.graphs is not None:
            t0 = time.perf_counter()
            mixed = self.config.mixed_scale_mode == "widest" and self.cfg.num_chains > 1  # mixed batches' graphs too
            n = self.graphs.warm_up(blocks_for(min(self.config.warmup_context, self.cfg.max_seq_len), self.pool.block_size),
                                    range(1, self.cfg.num_chains + 1), heads=(True, False, "mixed") if mixed else (True, False))
            log.info("captured %d decode graphs up to %d tokens in %.1f s", n, self.config.warmup_context,
                     time.perf_counter() - t0)
        if self.config.warmup_context and self.config.colocated_prefill and self.device.type == "cuda":
            t0 = time.perf_counter()
            n = self._warm_prefill()
            log.info("warmed %d prefill chunk sizes up to %d tokens in %.1f s", n, self.config.max_batched_tokens,
                     time.perf_counter() - t0)
        self._runner.start()
        return self

    def stop(self) -> None:
        self._runner.stop()
        with self._lock:
            for req in list(self._requests.values()):
                self._finalize(req, RequestAbortedError(f"request {req.request_id}: decode engine stopped"))
            if self._pool_export is not None:
                from colm.kv_ipc import release_pool

                release_pool(self._pool_export.ipc_key)
                self._pool_export = None

    def alive(self) -> bool:
        """Not stopped, and the step loop has not ended with an error."""
        return not self._runner.stopping and self._runner.error is None

    def _loop_died(self, exc: BaseException) -> None:
        """Every request ends now with EngineDeadError (the router fails them over), not at its deadline."""
        err = self._runner.dead(self.loop_owner)
        with self._lock:
            for req in list(self._requests.values()):
                try:
                    self._finalize(req, err)
                except Exception:  # noqa: BLE001 - the state the loop died in may be broken: end the stream anyway
                    log.exception("request %s: could not be finalized after the loop ended", req.request_id)
                    if req.stream is not None:
                        req.stream.close(err)

    # ---------------------------------------------------------------- reservation and KV
    def reserve(self, request_id: str, prompt_len: int, max_new_tokens: int,
                timeout_s: float | None = None, prefill_tokens=None, cache_salt: str = "") -> Reservation:
        """Blocks for the prompt and ``max_new_tokens``. ``prefill_tokens`` (colocated_prefill: the prompt but its last
        token, which ``prefill_kv`` then gives again): with prefix caching, the leading blocks an earlier prompt
        computed are taken over and only the rest is allocated; ``cache_salt``: the namespace of that cache."""
        self.check_alive()
        if not request_id or not isinstance(request_id, str):
            raise ValueError(f"request_id={request_id!r}: must be a non-empty string")
        if prompt_len < 1 or max_new_tokens < 1:
            raise ValueError(f"prompt_len={prompt_len}, max_new_tokens={max_new_tokens}: both must be >= 1")
        if prompt_len + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt_len ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len={self.cfg.max_seq_len}")
        n = blocks_for(prompt_len + max_new_tokens - 1, self.pool.block_size)
        ids = digests = None
        if prefill_tokens is not None:  # hashed outside the lock
            ids = self._prefill_ids(request_id, prefill_tokens, prompt_len)
            digests = self._prefix_digests(ids, cache_salt)
        with self._lock:
            self.check_alive()  # again under the lock the dead loop's drain takes: nothing is reserved after it
            if request_id in self._requests:
                raise ValueError(f"request_id={request_id!r} is already reserved")
            if len(self._requests) >= self.config.max_reservations:
                raise CapacityError(f"{len(self._requests)} reservations held (max_reservations)")
            hits = self.pool.match(digests) if digests else []
            try:
                blocks = hits + self.pool.allocate(n - len(hits))  # CapacityError when the pool is full
            except CapacityError:
                self.pool.free(hits)
                raise
            timeout = timeout_s or self.config.reservation_timeout_s
            req = DecodeRequest(request_id, prompt_len, max_new_tokens, blocks, time.monotonic() + timeout)
            if ids is not None:
                req.reserved_tokens, req.prefix_digests, req.cached_blocks = ids, digests, len(hits)
            req.timeline.mark("reserved")
            req.kv_done = prompt_len == 1  # nothing before the last token: no KV to wait for
            self._requests[request_id] = req
            self._wake.notify_all()  # a cuda_pool grant may be waiting for this reservation
        return Reservation(request_id, n, self.pool.block_size, self.host_id)

    def _get(self, request_id: str) -> DecodeRequest:
        req = self._requests.get(request_id)
        if req is None:
            raise UnknownRequestError(f"request {request_id!r} is not reserved on this decode worker")
        return req

    # ---------------------------------------------------------------- generation control
    def start_generation(self, request_id: str, last_token_id: int, params: SamplingParams,
                         scale: int | None = None, kv_timeout_s: float | None = None,
                         subscriber: str | None = None, speculative: int = 0,
                         context_ids: np.ndarray | None = None, prior_output: int = 0) -> TokenStream | MuxStream:
        """Start generating; the events go to the returned ``TokenStream``, or with ``subscriber`` into that
        subscription (``self.mux``), batched per step, and the returned ``MuxStream`` is only a handle.
        ``speculative``: drafts per round by chain 1 (``decode_worker.speculative``) while the request's scale is
        above 1; 0 = plain steps (also for a request whose logits are adjusted: penalties, bias, min_tokens).
        ``context_ids``: the prompt's tokens but the last, which penalties read where this engine does not prefill
        the prompt itself; ``prior_output``: how many of the prompt's last tokens are the request's earlier output
        (a retried attempt), counted as output by the frequency and presence penalties."""
        grammar = bad = None
        if params.structured is not None:  # compiled before the lock: the step loop never waits for a grammar
            try:
                if self.tokenizer is None:
                    raise ValueError("structured_output: this decode engine has no tokenizer to compile it for")
                grammar = compile_output(params.structured, self.tokenizer, self.cfg.vocab_size)
            except ValueError as e:
                bad = e
        with self._wake:
            req = self._get(request_id)
            if req.started:  # a second start (a reused id) is refused without touching the running request
                raise ValueError(f"request {request_id}: generation already started")
            sub = self.mux.get(subscriber) if subscriber else None
            if subscriber and (sub is None or sub.closed):
                exc = PeerUnavailableError(f"request {request_id}: no token subscription {subscriber!r} is open "
                                           "on this decode worker")
                self._fail(req, exc)
                raise exc
            try:
                scale = self.cfg.check_scale(scale)
                if not 0 <= last_token_id < self.cfg.vocab_size:
                    raise ValueError(f"last_token_id={last_token_id}: outside the vocabulary 0..{self.cfg.vocab_size - 1}")
                check_speculative(speculative)
                if bad is not None:
                    raise bad
                if not 0 <= prior_output < req.prompt_len:
                    raise ValueError(f"prior_output={prior_output}: must be in 0..{req.prompt_len - 1}")
                prompt = None
                if reads_prompt(params, prior_output):  # this engine's own prompt (colocated) or the one given
                    head = req.prompt_tokens if req.prompt_tokens is not None else context_ids
                    prompt = np.append(np.asarray(head if head is not None else [], dtype=np.int64), last_token_id)
                    if len(prompt) != req.prompt_len:
                        raise ValueError(f"context_ids: {len(prompt) - 1} tokens given; penalties (and a retried "
                                         f"attempt's grammar) read the prompt, which has {req.prompt_len - 1} "
                                         "before its last")
                    if len(prompt) and not 0 <= prompt.min() <= prompt.max() < self.cfg.vocab_size:
                        raise ValueError(f"context_ids: token ids must be in 0..{self.cfg.vocab_size - 1}")
                adjust = make_adjuster(params, self.cfg.vocab_size, () if prompt is None else prompt, self.eos_id,
                                       prior_output, grammar=grammar)
                if not 1 <= params.max_new_tokens <= req.max_new_tokens:
                    raise ValueError(f"max_new_tokens={params.max_new_tokens}: must be in 1..{req.max_new_tokens} "
                                     "(the reservation's)")
            except ValueError as e:
                self._fail(req, e)  # the router will not reuse a reservation whose start failed
                raise
            if req.switched_scale is not None:  # a switch that came after the reservation, before this start
                scale = req.switched_scale
            req.started, req.params, req.scale, req.last_token_id = True, params, scale, last_token_id
            req.speculative, req.adjust = speculative, adjust
            req.generator = params.make_generator()
            req.stream = MuxStream(request_id, sub) if sub is not None else TokenStream(request_id, self.alive)
            req.timeline.mark("started")
            req.kv_deadline = time.monotonic() + (kv_timeout_s or self.config.kv_timeout_s)
            req.num_cached = req.prompt_len - 1
            req.next_input = last_token_id
            self._wake.notify_all()
            return req.stream

    def set_scale(self, request_id: str, scale: int) -> int:
        scale = self.cfg.check_scale(scale)
        with self._lock:
            req = self._get(request_id)
            req.scale = scale  # read by the next step
            if not req.started:  # reserved, not started yet: start_generation must not undo the switch
                req.switched_scale = scale
        return scale

    def end_subscription(self, sub: Subscription) -> int:
        """The subscriber went away: close its subscription and abort its requests (nobody reads their tokens).
        The number aborted."""
        self.mux.remove(sub)
        with self._wake:
            mine = [r for r in self._requests.values() if isinstance(r.stream, MuxStream) and r.stream.sub is sub]
            for req in mine:
                self._fail(req, RequestAbortedError(f"request {req.request_id}: its token subscriber went away"))
            self._wake.notify_all()
        return len(mine)

    def abort(self, request_id: str, unstarted_only: bool = False) -> bool:
        """End a request and free its blocks. ``unstarted_only``: only a reservation whose generation has not
        started (a refused start must never end a running request that holds the same id)."""
        with self._wake:
            req = self._requests.get(request_id)
            if req is None or (unstarted_only and req.started):
                return False
            self._fail(req, RequestAbortedError(f"request {request_id} aborted"))
            self._wake.notify_all()
            return True

    def _fail(self, req: DecodeRequest, exc: BaseException) -> None:
        if req.running or req.prefilling:
            req.cancel = req.cancel or exc
        else:
            self._finalize(req, exc)

    def _finalize(self, req: DecodeRequest, exc: BaseException | None = None) -> None:
        if self._requests.get(req.request_id) is not req:
            return
        del self._requests[req.request_id]
        if req.prefix_digests:
            self._forget_computing(req, req.prefix_digests)
        if req.running:
            # only the loop (or stop, after it) ends a running request; a step queued ahead for it may still write
            # into its blocks, which a KV transfer could take over as soon as they are free
            if self._ahead is not None and any(r is req for r in self._ahead.batch):
                self._drop_ahead()
            self._running.remove(req)
            req.running = False
        if req.lease is not None and req.lease.holds():
            self._hold(req)  # a cuda_pool / nixl sender's writes may still land in the blocks
        else:
            self.pool.free(req.blocks)
            req.blocks = []
        req.copy_plans.clear()  # slot-index tensors go back now, not when the last reference to req does
        if exc is None:
            self._num_finished += 1
        else:
            self._num_failed += 1
        if req.stream is not None:
            req.stream.close(exc)

    # ---------------------------------------------------------------- the step loop
    def _loop(self) -> None:
        while not self._runner.stopping:
            size = self.step()
            self._runner.beat()  # an iteration ended: progress (stats' stall_s counts from here)
            if size == 0:
                with self._wake:
                    if not self._runner.stopping:
                        self._runner.idle_wait(self.config.kv_ready_poll_s if self._ready_polling
                                               else self.config.idle_wait_s)

    # ---------------------------------------------------------------- read-only
    def score(self, token_ids: list[int], scale: int | None = None) -> list[tuple[float, int, float]]:
        """Per prompt token: (log p given the ones before, most likely token id, its log p); first (0.0, -1, 0.0)."""
        return prompt_logprobs(self.model, list(token_ids), scale, self.score_graphs)

    def kv_dtype(self) -> str:
        from colm.kv_wire import dtype_name

        return dtype_name(self.dtype)


__all__ = ["DecodeEngine", "DecodeConfig", "DecodeStats", "Reservation", "TokenEvent", "TokenStream", "parse_dtype"]
