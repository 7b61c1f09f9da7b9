"""The decode worker's stats: ``DecodeStats`` (what ``DecodeEngine.stats`` reports, and the Stats RPC carries),
assembled from the engine's state by ``StatsReport`` (a mixin of ``DecodeEngine``), and the recent decode step
times per scale in it, as the router's latency model reads them.

``StepTimes.record`` keeps each step's wall time and batch size under the widest scale it ran; a step
during which a CUDA graph was captured or a kernel was tuned is left out by the caller (hundreds of
milliseconds, once per shape, nothing like the next step). ``summary`` gives, per scale, the median
step time and the mean batch size of the steps of the last ``window_s`` seconds. A scale with no step
that recent is not reported at all, so the router prices it from the scales that ran (by parameter
count) instead of from an old figure: one slow early measurement would otherwise keep a scale priced
out of every budget, and with no traffic at that scale nothing would ever correct it.
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field

STEP_STATS_WINDOW_S = 30.0  # steps older than this no longer describe the worker
STEP_STATS_MAX_SAMPLES = 64  # per scale


class StepTimes:
    def __init__(self, window_s: float = STEP_STATS_WINDOW_S, max_samples: int = STEP_STATS_MAX_SAMPLES) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError(f"window_s={window_s}, max_samples={max_samples}: must be > 0 and >= 1")
        self.window_s = window_s
        self._samples: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=max_samples))  # scale -> (time s, step ms, batch size)

    def record(self, scale, step_ms: float, batch: int, now: float | None = None) -> None:
        """``scale``: the key the step is kept under (a scale; speculative rounds use "scale:gamma")."""
        self._samples[scale].append((time.monotonic() if now is None else now, float(step_ms), int(batch)))

    def summary(self, now: float | None = None) -> tuple[dict[int, float], dict[int, float]]:
        """({scale: median step ms}, {scale: mean batch size}) over the steps of the last ``window_s``."""
        now = time.monotonic() if now is None else now
        ms_by_scale, batch_by_scale = {}, {}
        for scale, d in self._samples.items():
            recent = [(ms, b) for t, ms, b in d if now - t <= self.window_s]
            if recent:
                ms_by_scale[scale] = statistics.median(ms for ms, _ in recent)
                batch_by_scale[scale] = sum(b for _, b in recent) / len(recent)
        return ms_by_scale, batch_by_scale


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
    prefill_budget_tokens: int = 0     # ... the prompt tokens the next iteration may take while rows decode
    # speculative rounds: recent iterations of one (scale, gamma) round and nothing else, keyed "scale:gamma"
    round_ms_by_scale_gamma: dict[str, float] = field(default_factory=dict)
    round_batch_by_scale_gamma: dict[str, float] = field(default_factory=dict)  # their mean batch size
    num_cached_blocks: int = 0         # prefix caching: blocks holding a cached prompt prefix (held or idle)
    num_prefix_query_tokens: int = 0   # ... prompt tokens looked up in the cache
    num_prefix_hit_tokens: int = 0     # ... and found there (not prefilled)
    stall_s: float = 0.0               # the step loop has made no progress for this long while holding requests
    stall_requests: int = 0            # ... that many (both 0 while it waits for work or holds none)


class StatsReport:
    """``DecodeEngine.stats``: a part of the engine (a mixin over its state) that assembles its ``DecodeStats``."""

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
                prefill_budget_tokens=(self.chunk_budget.tokens(decoding=True)
                                       if self.config.colocated_prefill else 0),
                round_ms_by_scale_gamma=round_ms, round_batch_by_scale_gamma=round_batch,
                num_cached_blocks=self.pool.num_cached, num_prefix_query_tokens=self._num_prefix_query_tokens,
                num_prefix_hit_tokens=self._num_prefix_hit_tokens, stall_s=stall_s, stall_requests=stall_requests)
