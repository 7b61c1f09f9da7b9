"""``DecodeEngine``: the full-chain decode worker's core (plain class: no gRPC, no Ray).

Path of a request: ``reserve`` takes blocks for prompt + max_new_tokens from the ``BlockPool`` ->
``begin_kv`` / ``write_kv`` / ``finish_kv`` fill them with the prompt's K/V (all but the last token)
-> ``start_generation`` gives sampling, scale and returns a ``TokenStream`` -> the step loop admits
the request once its KV is complete and feeds the last prompt token at the request's scale (that
step yields token 1), then one token per step in the continuous batch (``decode_worker.step``);
``set_scale`` applies from the next token -> finish / abort / deadline / failure frees the blocks.

The engine is three parts over one state: this module (reservations, generation control, the step loop),
``kv_intake.KVIntake`` (the KV target a transport's receiver calls: bytes, or grants to a sender that writes
the blocks itself, with the held-block lifetime that needs) and ``colocated.ColocatedPrefill`` (with
``DecodeConfig.colocated_prefill``, ``prefill_kv`` gives the prompt's tokens instead of a KV stream and the step
loop computes their chain-1 K/V itself, in chunks under a token budget: one process and one CUDA context serve
both phases, which is what one GPU wants).

Threads: gRPC handlers call the public methods; one loop thread (``start``) runs the steps. All
bookkeeping is under one lock; the forward runs outside it. A running request is ended only by the
loop thread (``cancel`` marks it), so its blocks are never freed under a step that reads them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from colm import checkpoint
from colm.config import servable
from colm.errors import (CapacityError, DeadlineError, NoTokenAllowedError, PeerUnavailableError, RequestAbortedError,
                         RequestFailedError, UnknownRequestError)
from colm.graphed_forward import GraphedForward
from colm.host_identity import host_id as current_host_id
from colm.kernels._tuning import num_tuned
from colm.kv_wire import parse_dtype
from colm.model import CoLM
from colm.logits_adjust import make_adjuster, reads_prompt
from colm.sampling import SamplingParams
from colm.scoring import prompt_logprobs
from colm.structured import compile_output

from colm.decode_worker.block_pool import BlockPool, blocks_for, num_blocks_from_memory
from colm.decode_worker.colocated import ColocatedPrefill
from colm.decode_worker.config import DecodeConfig, check_speculative
from colm.decode_worker.graphs import DecodeGraphs
from colm.decode_worker.kv_intake import KVIntake
from colm.decode_worker.prefill_graphs import PackedPrefillGraphs
from colm.decode_worker.request import DecodeRequest, Reservation, TokenEvent, TokenStream, stop_reason
from colm.decode_worker.speculative import round_gamma, speculative_round
from colm.decode_worker.step import LaunchedStep, decode_step, launch_step, queueable
from colm.decode_worker.step_stats import StepTimes
from colm.decode_worker.token_mux import MuxStream, Subscription, TokenMux
from colm.decode_worker.verify_graphs import VerifyGraphs
from colm.loop_thread import LoopOwner, LoopThread

log = logging.getLogger("colm.decode")


@dataclass
class DecodeStats:
    host_id: str
    num_chains: int
    num_blocks: int
    num_free_blocks: int
    block_size: int
    num_reserved: int
    num_running: int
    num_steps: int
    step_ms_by_scale: dict[int, float] = field(default_factory=dict)  # recent steps only (see step_stats)
    step_batch_by_scale: dict[int, float] = field(default_factory=dict)  # their mean batch size
    last_step_ms: float = 0.0
    last_batch_size: int = 0
    num_finished: int = 0
    num_failed: int = 0
    num_steps_launched_ahead: int = 0  # overlap_steps: steps queued before the previous one was read, and used
    num_steps_dropped: int = 0         # ... and dropped (their batch or scale changed meanwhile)
    num_held_blocks: int = 0           # blocks of ended requests a cuda_pool sender may still write
    num_drafted: int = 0               # chain-1 self-speculative decoding: draft tokens proposed
    num_draft_accepted: int = 0        # ... accepted by the target scale and emitted (none past the request's stop)
    prefills: bool = False             # colocated_prefill: this engine computes its prompts' K/V itself
    num_prefill_queued_tokens: int = 0 # ... prompt tokens not yet scheduled
    prefill_tokens_per_s: float = 0.0  # ... recent chunks' tokens over their iterations' time
    num_prefill_chunks: int = 0        # ... iterations that ran a prompt chunk
    # speculative rounds: recent iterations of one (scale, gamma) round and nothing else, keyed "scale:gamma"
    round_ms_by_scale_gamma: dict[str, float] = field(default_factory=dict)
    round_batch_by_scale_gamma: dict[str, float] = field(default_factory=dict)  # their mean batch size
    num_cached_blocks: int = 0         # prefix caching: blocks holding a cached prompt prefix (held or idle)
    num_prefix_query_tokens: int = 0   # ... prompt tokens looked up in the cache
    num_prefix_hit_tokens: int = 0     # ... and found there (not prefilled)
    stall_s: float = 0.0               # the step loop has made no progress for this long while holding requests
    stall_requests: int = 0            # ... that many (both 0 while it waits for work or holds none)


class DecodeEngine(KVIntake, ColocatedPrefill, LoopOwner):
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

    def step(self) -> int:
        """Admit ready requests and advance every running sequence: one token, or one speculative round (one or
        more tokens) for a request with ``speculative`` at a scale above 1; returns the batch size."""
        with self._lock:
            self._housekeep()
            batch: list[DecodeRequest] = []  # plain steps
            rounds: dict[tuple[int, int], list[DecodeRequest]] = {}  # (scale, gamma) -> its speculative rows
            limit = self.config.speculative_max_batch
            drafting = not limit or len(self._running) <= limit  # past it, speculative rows step plainly
            for r in self._running:
                gamma = round_gamma(r) if drafting else 0
                if gamma:
                    rounds.setdefault((r.scale, gamma), []).append(r)
                else:
                    batch.append(r)
            scales = [r.scale for r in batch]
            size = len(self._running)
            segments = self._take_prefill(batch, rounds) if self.config.colocated_prefill else []
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
            self._end_prefill(segments, failed, dt)
            if not size:
                self.mux.flush()
                return len(segments)
            self._num_steps += 1
            self._last_step_ms, self._last_batch = dt, size
            timed = self._warm_marks() == warmed  # a capture or a tuning is not a step time (nor a round)
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
    def _mixed_ahead(self) -> bool:
        """A batch of mixed scales may be queued ahead: it runs as one forward ("widest"), and as one graph where
        graphs run (a mixed graph that failed to capture leaves such batches to ``decode_step``'s hidden graph)."""
        return self.config.mixed_scale_mode == "widest" and (self.graphs is None or self.graphs.mixed_enabled)

    def _can_overlap(self, batch, scales) -> bool:
        return (self._overlap and (len(set(scales)) == 1 or self._mixed_ahead())
                and all(queueable(r) and r.cancel is None for r in batch))

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

    # ---------------------------------------------------------------- read-only
    def score(self, token_ids: list[int], scale: int | None = None) -> list[tuple[float, int, float]]:
        """Per prompt token: (log p given the ones before, most likely token id, its log p); first (0.0, -1, 0.0)."""
        return prompt_logprobs(self.model, list(token_ids), scale, self.score_graphs)

    def stats(self) -> DecodeStats:
        with self._lock:
            step_ms, step_batch = self._step_times.summary()
            round_ms, round_batch = self._round_times.summary()
            stall_s, stall_requests = self.stall(len(self._requests))
            return DecodeStats(
                host_id=self.host_id, num_chains=self.cfg.num_chains, num_blocks=self.pool.num_blocks,
                num_free_blocks=self.pool.num_free, block_size=self.pool.block_size,
                num_reserved=len(self._requests) - len(self._running), num_running=len(self._running),
                num_steps=self._num_steps,
                step_ms_by_scale=step_ms, step_batch_by_scale=step_batch,
                last_step_ms=self._last_step_ms, last_batch_size=self._last_batch,
                num_finished=self._num_finished, num_failed=self._num_failed,
                num_steps_launched_ahead=self._num_ahead_used, num_steps_dropped=self._num_ahead_dropped,
                num_held_blocks=sum(len(r.blocks) for r in self._held),
                num_drafted=self._num_drafted, num_draft_accepted=self._num_draft_accepted,
                prefills=self.config.colocated_prefill,
                num_prefill_queued_tokens=sum(len(r.prompt_tokens) - r.prefilled for r in self._prefill_queue),
                prefill_tokens_per_s=(sum(n for n, _ in self._prefill_recent) /
                                      max(1e-9, sum(t for _, t in self._prefill_recent)) if self._prefill_recent else 0.0),
                num_prefill_chunks=self._num_prefill_chunks,
                round_ms_by_scale_gamma=round_ms, round_batch_by_scale_gamma=round_batch,
                num_cached_blocks=self.pool.num_cached, num_prefix_query_tokens=self._num_prefix_query_tokens,
                num_prefix_hit_tokens=self._num_prefix_hit_tokens, stall_s=stall_s, stall_requests=stall_requests)

    def kv_dtype(self) -> str:
        from colm.kv_wire import dtype_name

        return dtype_name(self.dtype)


__all__ = ["DecodeEngine", "DecodeConfig", "DecodeStats", "Reservation", "TokenEvent", "TokenStream", "parse_dtype"]
