"""A decode request's state, its token stream, and the stop rules.

Path of a request through the decode engine: ``reserve`` creates a ``DecodeRequest`` holding its
blocks -> the KV stream fills them (``written`` marks every (layer, token) cell exactly once;
``copy_plans`` keeps where each chunk token range lands, so its later layers reuse it) ->
``start_generation`` attaches sampling, scale and a ``TokenStream`` -> once ``kv_done`` and
started, the step loop admits it to the running batch; each step appends one token -> finish,
abort, deadline or failure ends it and frees the blocks (the stream gets the final event or the
exception).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from colm.decode_worker.block_pool import CopyPlan
from colm.errors import RequestAbortedError
from colm.kv_wire import KVLayout
from colm.logits_adjust import LogitsAdjuster
from colm.sampling import SamplingParams
from colm.stopping import StopChecker
from colm.timeline import Timeline

_END = object()


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    index: int
    scale: int
    finish_reason: str  # "" while running; "stop" | "length" on the last token
    time_ms: float
    logprob: float
    # first event only: the request's milestones on this worker (``DecodeRequest.timeline``) in ms after
    # start_generation (negative: before it), and that moment on this host's monotonic clock
    timeline_ms: dict[str, float] | None = None
    monotonic_s: float = 0.0
    drafted: bool = False  # chain-1 self-speculative decoding: a draft token the target scale accepted
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their log-probs, if asked for


@dataclass(frozen=True, eq=False)
class KVGrant:
    """``DecodeEngine.grant_kv``'s answer: the blocks a cuda_pool sender may write (in token order). Hand it
    back to ``end_external_writes`` once the sender's stream has ended."""
    blocks: tuple[int, ...]
    request: "DecodeRequest"

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class Reservation:
    request_id: str
    num_blocks: int
    block_size: int
    host_id: str


class TokenStream:
    """Iterator of ``TokenEvent``s; raises the request's failure (aborted, deadline, transfer error)."""

    def __init__(self, request_id: str, alive: Callable[[], bool], poll_s: float = 0.25) -> None:
        self.request_id = request_id
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._alive = alive
        self._poll_s = poll_s
        self._done = False

    def push(self, item) -> None:
        self._q.put(item)

    def close(self, exc: BaseException | None = None) -> None:
        self._q.put(exc if exc is not None else _END)

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._q.get(timeout=self._poll_s)
                break
            except queue.Empty:
                if not self._alive():
                    self._done = True
                    raise RequestAbortedError(f"request {self.request_id}: decode engine stopped") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason:
            self._done = True
            self._q.put(_END)
        return item


@dataclass(eq=False)
class DecodeRequest:
    request_id: str
    prompt_len: int
    max_new_tokens: int
    blocks: list[int]
    deadline: float                            # time.monotonic() after which the reservation is freed
    layout: KVLayout | None = None
    written: np.ndarray | None = None          # [layers, tokens] bool: cells of K/V received
    next_chunk_seq: int = 0
    copy_plans: dict[tuple[int, int], CopyPlan] = field(default_factory=dict)  # (token_start, token_end) -> plan
    kv_done: bool = False
    started: bool = False
    last_token_id: int = 0
    params: SamplingParams | None = None
    scale: int = 1
    # a switch (``set_scale``) that came between the reservation and ``start_generation``: the scale it starts at
    switched_scale: int | None = None
    speculative: int = 0                       # drafts per round by chain 1 (decode_worker.speculative); 0 = off
    generator: torch.Generator | None = None
    adjust: LogitsAdjuster | None = None        # penalties, logit bias, min_tokens (None: the logits as they are)
    stream: TokenStream | None = None
    kv_deadline: float = float("inf")
    out_tokens: list[int] = field(default_factory=list)
    num_cached: int = 0                        # positions whose K/V are in the pool
    next_input: int = 0                        # token fed to the next step
    running: bool = False
    cancel: BaseException | None = None        # set by abort/failure while running; the step loop ends it
    stopper: StopChecker | None = None  # the stop rules (and, with stop strings, the output's text), from token 1
    # cuda_pool, nixl: a sender holds a grant to write into ``blocks`` itself, under this lease (``grant_kv``;
    # ``colm.kv.lease``): if the request ends while it holds them, the blocks stay out of the free list until it
    # lets them go
    lease: object | None = None
    # cuda_pool with a ready event (``DecodeConfig.kv_ready_wait``): the sender's event that completes once its
    # writes into ``blocks`` have run (a CUDA event opened from its IPC handle; the loop polls ``query()``).
    # Cleared once seen complete.
    kv_ready: object | None = None
    # colocated_prefill: the prompt's tokens but the last, whose K/V this engine computes itself, the first
    # ``prefilled`` of them scheduled so far; ``prefilling`` while a chunk of them is in the loop's forward (an
    # abort then only marks ``cancel``: the blocks must not be freed under that forward)
    prompt_tokens: np.ndarray | None = None
    prefilled: int = 0
    # prefix caching (colocated_prefill): the tokens given at reserve (prefill_kv must give the same), the digests of
    # their full blocks (``prefix_cache.block_hashes``) and how many leading blocks were cached ones
    reserved_tokens: np.ndarray | None = None
    prefix_digests: list[bytes] | None = None
    cached_blocks: int = 0
    prefilling: bool = False
    # reserved, kv_header, kv_first_chunk, kv_last_chunk (a KV stream's; colocated: prefill_first_chunk,
    # prefill_last_chunk of its own prefill), kv_done, kv_ready, started (start_generation; TokenEvent.time_ms counts
    # from it), admitted (joined the batch), first_token. The first TokenEvent carries them.
    timeline: Timeline = field(default_factory=Timeline)


def stop_reason(req: DecodeRequest, token: int, eos_id: int | None,
                detokenize: Callable[[list[int]], str] | None) -> str:
    """``token`` (just appended to ``req.out_tokens``) ends the request: "stop" | "length" | "". The rules are
    ``colm.stopping.StopChecker``'s, as everywhere; the text is decoded only when there are stop strings."""
    p = req.params
    if req.stopper is None:
        req.stopper = StopChecker(p, eos_id, detokenize if p.stop_strings else None)
        for t in req.out_tokens[:-1]:
            req.stopper.add(t)
    return req.stopper.add(token)
