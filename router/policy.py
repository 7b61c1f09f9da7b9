"""Scale-by-budget policy: a live latency model per scale and the choice of a request's scale.

Workers report what they measured (``WorkerReport``: prefill throughput and queued tokens; decode
step time per scale over its recent steps and their batch size, free KV blocks). ``LatencyModel`` smooths those into
per-scale estimates (exponentially weighted; finished requests' observed/predicted ratios correct them,
as medians, see ``LatencyModel``), and predicts for a new request

    TTFT(k)  = prefill queue wait + prompt / prefill rate + KV hand-off + one decode step at scale k
    TPOT(k)  = decode step time at scale k with the request added to the running batch

``ScalePolicy.choose`` gives each request the largest scale whose prediction fits its budget; when
none fits it degrades to the smallest scale or rejects, as the request asks. ``ScalePolicy.rebalance``
lowers the scale of running requests whose per-token budget is no longer met (CoLM-Air switches
scale without recomputation). The class is plain (no I/O, no clock of its own) so tests can feed it
synthetic reports.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence

from colm.decode_worker.config import MAX_GAMMA


class OnMiss(str, Enum):
    """What to do when no scale meets a request's budget."""

    DEGRADE = "degrade"  # serve at the smallest scale anyway
    REJECT = "reject"  # fail with RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Budget:
    """A request's latency budget; ``None`` fields are unconstrained."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    deadline_ms: float | None = None  # end-to-end, for the whole generation
    on_miss: OnMiss = OnMiss.DEGRADE

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "deadline_ms"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
                raise ValueError(f"budget.{name}={v!r}: must be a positive number of milliseconds")
        object.__setattr__(self, "on_miss", OnMiss(self.on_miss))

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.deadline_ms is None


def _by_scale_gamma(d) -> dict[tuple[int, int], float]:
    """{"scale:gamma": value} (a worker's round figures) as {(scale, gamma): value}; malformed keys are dropped."""
    out = {}
    for key, value in dict(d).items():
        k, _, g = str(key).partition(":")
        if k.isdigit() and g.isdigit():
            out[(int(k), int(g))] = float(value)
    return out


@dataclass(frozen=True)
class WorkerReport:
    """What one worker measured recently. Times in milliseconds."""

    worker_id: str
    role: str  # "prefill" | "decode"
    queued_tokens: int = 0  # prefill: prompt tokens waiting or running
    prefill_tokens_per_s: float | None = None  # prefill: measured throughput
    num_running: int = 0  # decode: sequences in the batch
    num_waiting: int = 0  # decode: admitted but not yet running
    step_ms: dict[int, float] = field(default_factory=dict)  # decode: recent step time per scale
    step_batch: dict[int, float] = field(default_factory=dict)  # decode: batch size of those steps (else num_running)
    free_blocks: int = 0
    total_blocks: int = 0
    transfer_ms_per_mtoken: float | None = None  # KV hand-off time per million prompt tokens
    transfer_bytes: int = 0  # KV bytes handed over so far (worker total)
    transfer_s: float = 0.0  # time spent on those hand-offs
    prefills: bool = False  # decode: colocated, it computes its prompts' K/V itself (queued_tokens and
                            # prefill_tokens_per_s are then its own prefill's; there is no hand-off)
    drafted: int = 0  # decode: chain-1 draft tokens proposed so far (worker total)
    draft_accepted: int = 0  # decode: of those, accepted by the target scale
    round_ms: dict[tuple[int, int], float] = field(default_factory=dict)  # decode: recent speculative round time
    round_batch: dict[tuple[int, int], float] = field(default_factory=dict)  # by (scale, gamma), and its batch
    block_size: int = 0  # decode: tokens per KV block of its pool
    prefix_query_tokens: int = 0  # decode, colocated: prompt tokens looked up in its prefix cache (worker total)
    prefix_hit_tokens: int = 0  # ... and found there
    stall_s: float = 0.0  # the worker's engine loop has made no progress for this long while holding requests
    stall_requests: int = 0  # ... that many (placement takes it out past router.worker_stall_s)

    @classmethod
    def of_decode(cls, worker_id: str, s) -> "WorkerReport":
        """A decode worker's report from its stats (``DecodeStats``, or the proto message of the same fields)."""
        return cls(worker_id, "decode", num_running=s.num_running, num_waiting=s.num_reserved,
                   step_ms={int(k): v for k, v in s.step_ms_by_scale.items()},
                   step_batch={int(k): v for k, v in s.step_batch_by_scale.items()},
                   free_blocks=s.num_free_blocks, total_blocks=s.num_blocks, prefills=s.prefills,
                   queued_tokens=s.num_prefill_queued_tokens, prefill_tokens_per_s=s.prefill_tokens_per_s or None,
                   transfer_ms_per_mtoken=0.0 if s.prefills else None,
                   drafted=s.num_drafted, draft_accepted=s.num_draft_accepted,
                   round_ms=_by_scale_gamma(s.round_ms_by_scale_gamma),
                   round_batch=_by_scale_gamma(s.round_batch_by_scale_gamma),
                   block_size=s.block_size, prefix_query_tokens=s.num_prefix_query_tokens, prefix_hit_tokens=s.num_prefix_hit_tokens,
                   stall_s=s.stall_s, stall_requests=s.stall_requests)

    @classmethod
    def of_prefill(cls, worker_id: str, s, **transfer) -> "WorkerReport":
        """A prefill worker's report from its stats (``PrefillStats``, or the proto message of the same fields);
        ``transfer``: the router's own KV hand-off counts for it (``transfer_bytes``, ``transfer_s``,
        ``transfer_ms_per_mtoken``)."""
        return cls(worker_id, "prefill", queued_tokens=s.num_queued_tokens, prefill_tokens_per_s=s.tokens_per_s or None,
                   stall_s=s.stall_s, stall_requests=s.stall_requests, **transfer)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role={self.role!r}: must be 'prefill' or 'decode'")
        for name in ("queued_tokens", "num_running", "num_waiting", "free_blocks", "total_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        object.__setattr__(self, "step_ms", {int(k): float(v) for k, v in self.step_ms.items()})
        object.__setattr__(self, "step_batch", {int(k): float(v) for k, v in self.step_batch.items()})


@dataclass(frozen=True)
class PolicyConfig:
    """Priors (used until workers report) and smoothing."""

    num_scales: int
    param_counts: tuple[int, ...]  # parameters of the scale-k sub-model, k = 1..num_scales
    kv_sharing: bool = True
    alpha: float = 0.3  # weight of a new measurement in the moving average
    prior_step_ms_full: float = 20.0  # decode step of the full model, batch 1, before any report
    prior_prefill_tokens_per_s: float = 20000.0
    prior_transfer_ms_per_mtoken: float = 0.0
    per_seq_step_fraction: float = 0.02  # extra step time per sequence added, as a fraction of the step
    headroom: float = 1.0  # predictions are multiplied by this before comparing with a budget
    # Chain-1 self-speculative decoding chosen by the policy (CoLM-Air): "off", or "auto": a request that does not ask
    # for drafts gets gamma drafts per round when the predicted time per token of rounds beats plain steps at its
    # scale by ``speculative_margin``, with at most ``speculative_max_batch`` sequences per decode worker (a round
    # holds up the plain rows of its batch: speculation pays at small batches, vLLM disables it by batch size too).
    speculative: str = "off"
    speculative_gammas: tuple[int, ...] = (2, 4)
    speculative_max_batch: int = 8
    speculative_margin: float = 0.1
    prior_draft_acceptance: float = 0.7  # share of drafts accepted, until workers report drafts
    verify_step_factor: float = 2.0  # a verify over gamma + 1 positions costs this many plain steps (H200, batch 1:
                                     # 0.98-1.06 ms paged against 0.55-0.59 ms steps for gamma 1-4)
    # A measured round time that no decode worker has reported for this long, while they step, is forgotten and
    # the rounds are priced again: one slow figure must not keep speculation unchosen, and so unmeasured, for good.
    round_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.speculative not in ("off", "auto"):
            raise ValueError(f"speculative={self.speculative!r}: must be 'off' or 'auto'")
        if not self.speculative_gammas or any(not 1 <= g <= MAX_GAMMA for g in self.speculative_gammas):
            raise ValueError(f"speculative_gammas={self.speculative_gammas}: need drafts per round in 1..{MAX_GAMMA}")
        if self.speculative_max_batch < 1 or not 0 <= self.speculative_margin < 1:
            raise ValueError(f"speculative_max_batch={self.speculative_max_batch}, speculative_margin="
                             f"{self.speculative_margin}: need >= 1 and in [0, 1)")
        if self.round_ttl_s <= 0:
            raise ValueError(f"round_ttl_s={self.round_ttl_s}: must be > 0")
        if not 0 <= self.prior_draft_acceptance <= 1 or self.verify_step_factor <= 0:
            raise ValueError(f"prior_draft_acceptance={self.prior_draft_acceptance}, verify_step_factor="
                             f"{self.verify_step_factor}: need [0, 1] and > 0")
        if self.num_scales < 1:
            raise ValueError(f"num_scales={self.num_scales}: must be >= 1")
        if len(self.param_counts) != self.num_scales or any(p <= 0 for p in self.param_counts):
            raise ValueError(f"param_counts={self.param_counts}: need {self.num_scales} positive counts")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: must be in (0, 1]")
        if self.headroom < 1:
            raise ValueError(f"headroom={self.headroom}: must be >= 1")
        for name in ("prior_step_ms_full", "prior_prefill_tokens_per_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")

    @classmethod
    def from_model(cls, cfg, **kw) -> "PolicyConfig":
        n = cfg.num_chains
        return cls(num_scales=n, param_counts=tuple(cfg.num_params(k) for k in range(1, n + 1)),
                   kv_sharing=cfg.kv_sharing, **kw)


CORRECTION_WINDOW = 16  # finished requests whose observed/predicted ratios make a correction factor


def _clamped_median(ratios) -> float:
    return min(10.0, max(0.5, statistics.median(ratios)))


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class LatencyModel:
    """Smoothed per-scale latency estimates built from worker reports."""

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self.step_ms: dict[int, float] = {}  # scale -> smoothed step time at the batch it was measured
        self.step_batch: dict[int, float] = {}  # scale -> smoothed batch size of those measurements
        self.prefill_tps: float | None = None
        self.transfer_ms_per_mtoken: float | None = None
        # Observed / predicted latency of finished requests (router and network overheads, and how the
        # step time really grows with the batch, which the workers' step times do not show): the median of
        # the last few ratios multiplies every prediction. A median, not a moving average: one request that
        # met a CUDA graph capture or a kernel tuning (hundreds of ms) must not price a scale out. The ratios
        # are shared by all scales: a TTFT is chain-1 prefill and the KV transfer (the same at every scale of
        # CoLM-Air) plus one step, and every scale's tokens come out of the same decode batch; each scale's
        # own cost is in its measured step time. A per-scale factor never recovers once its scale is no
        # longer chosen (measured on an H100: scale 2 went unserved for a whole load test).
        self._ttft_ratios: collections.deque = collections.deque(maxlen=CORRECTION_WINDOW)
        self._tpot_ratios: collections.deque = collections.deque(maxlen=CORRECTION_WINDOW)
        self.ttft_correction = 1.0
        self.tpot_correction = 1.0
        self.prefill_queue: dict[str, int] = {}  # worker -> queued tokens (latest)
        self.decode_scales: dict[str, set[int]] = {}  # worker -> scales its latest report measured
        self.decode_load: dict[str, int] = {}  # worker -> running + waiting (latest)
        self.draft_acceptance: float | None = None  # smoothed share of drafts accepted (from workers' counters)
        self.round_ms: dict[tuple[int, int], float] = {}  # (scale, gamma) -> smoothed round time at its batch
        self.round_batch: dict[tuple[int, int], float] = {}
        self._round_seen: dict[tuple[int, int], float] = {}  # (scale, gamma) -> clock() of its last report
        self._drafts: dict[str, tuple[int, int]] = {}  # worker -> (drafted, accepted) at its last report
        self.clock = time.monotonic

    def observe(self, r: WorkerReport) -> None:
        a = self.cfg.alpha
        if r.role == "prefill" or r.prefills:
            self.prefill_queue[r.worker_id] = r.queued_tokens
            if r.prefill_tokens_per_s:
                self.prefill_tps = _ewma(self.prefill_tps, r.prefill_tokens_per_s, a)
        if r.role == "decode":
            self.decode_load[r.worker_id] = r.num_running + r.num_waiting
            measured = set()
            for k, ms in r.step_ms.items():
                if 1 <= k <= self.cfg.num_scales and ms > 0:
                    measured.add(k)
                    self.step_ms[k] = _ewma(self.step_ms.get(k), ms, a)
                    batch = r.step_batch.get(k, r.num_running)
                    self.step_batch[k] = _ewma(self.step_batch.get(k), max(1.0, batch), a)
            self.decode_scales[r.worker_id] = measured
            self._drop_unmeasured_scales()
            now = self.clock()
            for key, ms in r.round_ms.items():
                if ms > 0:
                    self.round_ms[key] = _ewma(self.round_ms.get(key), ms, a)
                    self.round_batch[key] = _ewma(self.round_batch.get(key), max(1.0, r.round_batch.get(key, 1.0)), a)
                    self._round_seen[key] = now
            self._expire_rounds(now)
            before = self._drafts.get(r.worker_id)
            self._drafts[r.worker_id] = (r.drafted, r.draft_accepted)
            if before is not None and r.drafted > before[0] and r.draft_accepted >= before[1]:
                share = (r.draft_accepted - before[1]) / (r.drafted - before[0])
                self.draft_acceptance = _ewma(self.draft_acceptance, min(1.0, share), a)
        if r.transfer_ms_per_mtoken is not None:
            self.transfer_ms_per_mtoken = _ewma(self.transfer_ms_per_mtoken, r.transfer_ms_per_mtoken, a)

    def observe_request(self, predicted_ttft_ms: float, ttft_ms: float, predicted_tpot_ms: float,
                        tpot_ms: float | None) -> None:
        """Feedback from a finished request: what was predicted (uncorrected, at the scale it was served
        at) vs what the client saw."""
        if predicted_ttft_ms > 0 and ttft_ms > 0:
            self._ttft_ratios.append(ttft_ms / predicted_ttft_ms)
            self.ttft_correction = _clamped_median(self._ttft_ratios)
        if tpot_ms and predicted_tpot_ms > 0:
            self._tpot_ratios.append(tpot_ms / predicted_tpot_ms)
            self.tpot_correction = _clamped_median(self._tpot_ratios)

    def _drop_unmeasured_scales(self) -> None:
        """A scale that no decode worker measured lately (workers report recent steps only) loses its
        estimate and is priced from the scales that ran, by parameter count (``base_step_ms``): an old
        slow figure must not keep a scale out of every budget, unchosen and so never measured again.
        Where no scale was measured lately (idle workers), the last estimates stay."""
        live = set().union(*self.decode_scales.values()) if self.decode_scales else set()
        if not live:  # idle workers: nothing fresher than what is known
            return
        for k in [k for k in self.step_ms if k not in live]:
            del self.step_ms[k], self.step_batch[k]

    def _expire_rounds(self, now: float) -> None:
        """Round times not reported for ``round_ttl_s`` while decode workers step are dropped (see PolicyConfig);
        with idle workers they stay, as step times do."""
        if not any(self.decode_scales.values()):
            return
        for key in [k for k, t in self._round_seen.items() if now - t > self.cfg.round_ttl_s]:
            del self.round_ms[key], self.round_batch[key], self._round_seen[key]

    def forget(self, worker_id: str) -> None:
        self.prefill_queue.pop(worker_id, None)
        self.decode_load.pop(worker_id, None)
        self._drafts.pop(worker_id, None)
        if self.decode_scales.pop(worker_id, None) is not None:
            self._drop_unmeasured_scales()

    # ---- predictions ---------------------------------------------------------------------------
    def base_step_ms(self, scale: int) -> float:
        """Step time at scale k and batch 1: measured if reported, else scaled from a measured scale
        by parameter count (decode is bound by reading weights), else the prior."""
        c = self.cfg
        f = c.per_seq_step_fraction
        if scale in self.step_ms:
            return self.step_ms[scale] / (1 + f * (self.step_batch[scale] - 1))
        for k in sorted(self.step_ms, key=lambda k: abs(k - scale)):
            return self.base_step_ms(k) * c.param_counts[scale - 1] / c.param_counts[k - 1]
        return c.prior_step_ms_full * c.param_counts[scale - 1] / c.param_counts[-1]

    def decode_batch(self) -> float:
        """Sequences per decode worker now (mean over workers)."""
        if not self.decode_load:
            return 0.0
        return sum(self.decode_load.values()) / len(self.decode_load)

    def tpot_ms(self, scale: int, batch: float | None = None, corrected: bool = True) -> float:
        b = (self.decode_batch() + 1) if batch is None else batch
        raw = self.base_step_ms(scale) * (1 + self.cfg.per_seq_step_fraction * (max(1.0, b) - 1))
        return raw * (self.tpot_correction if corrected else 1.0)

    def speculative_tpot_ms(self, scale: int, gamma: int, batch: float | None = None) -> float:
        """Predicted time per token of rounds of ``gamma`` chain-1 drafts verified at ``scale``: a round is gamma
        scale-1 steps and a verify (``verify_step_factor`` plain steps at ``scale``), and emits 1 + gamma x (share of
        drafts accepted) tokens on average (the measured share, else the prior). A round time the workers measured
        for (scale, gamma) replaces the sum, carried to the batch as step times are (``per_seq_step_fraction``)."""
        acc = self.draft_acceptance if self.draft_acceptance is not None else self.cfg.prior_draft_acceptance
        if (scale, gamma) in self.round_ms:
            f, b = self.cfg.per_seq_step_fraction, (self.decode_batch() + 1) if batch is None else batch
            base = self.round_ms[(scale, gamma)] / (1 + f * (self.round_batch[(scale, gamma)] - 1))
            round_ms = base * (1 + f * (max(1.0, b) - 1))
        else:
            round_ms = gamma * self.tpot_ms(1, batch, corrected=False) + \
                self.cfg.verify_step_factor * self.tpot_ms(scale, batch, corrected=False)
        return round_ms / (1.0 + gamma * acc)

    def ttft_ms(self, scale: int, prompt_tokens: int, corrected: bool = True) -> float:
        return self._ttft_raw(scale, prompt_tokens) * (self.ttft_correction if corrected else 1.0)

    def _ttft_raw(self, scale: int, prompt_tokens: int) -> float:
        tps = self.prefill_tps or self.cfg.prior_prefill_tokens_per_s
        queued = min(self.prefill_queue.values()) if self.prefill_queue else 0
        transfer = self.transfer_ms_per_mtoken
        if transfer is None:
            transfer = self.cfg.prior_transfer_ms_per_mtoken
        return 1000.0 * (queued + prompt_tokens) / tps + transfer * prompt_tokens / 1e6 + self.tpot_ms(scale, corrected=False)


@dataclass(frozen=True)
class Decision:
    scale: int
    ttft_ms: float  # predicted
    tpot_ms: float  # predicted
    degraded: bool  # no scale met the budget; served at the smallest scale
    speculative: int = 0  # chain-1 drafts per round the policy chose (``speculative: auto``); 0: plain steps


class BudgetUnmet(Exception):
    """No scale meets the budget and the request asked to be rejected (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class RunningRequest:
    """What ``rebalance`` needs to know about a request being decoded."""

    request_id: str
    scale: int
    budget: Budget
    pinned: bool = False


class ScalePolicy:
    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self.model = LatencyModel(cfg)

    def observe(self, reports: Iterable[WorkerReport]) -> None:
        for r in reports:
            self.model.observe(r)

    def speculation(self, scale: int) -> tuple[int, float]:
        """(gamma, predicted TPOT) at ``scale``: the drafts per round that beat plain steps by the margin (the
        fewest-ms one among ``speculative_gammas``), or (0, the plain TPOT) when speculation is off, the model has
        no shared KV, the scale is 1, the decode batch is past ``speculative_max_batch``, or rounds do not pay."""
        c, m = self.cfg, self.model
        plain = m.tpot_ms(scale)
        if c.speculative != "auto" or not c.kv_sharing or scale == 1 or m.decode_batch() + 1 > c.speculative_max_batch:
            return 0, plain
        best, best_ms = 0, plain * (1 - c.speculative_margin)
        for g in c.speculative_gammas:
            ms = m.speculative_tpot_ms(scale, g) * m.tpot_correction
            if ms < best_ms:
                best, best_ms = g, ms
        return (best, best_ms) if best else (0, plain)

    def fits(self, scale: int, budget: Budget, prompt_tokens: int, max_new_tokens: int) -> tuple[bool, float, float]:
        ok, ttft, tpot, _ = self._fits(scale, budget, prompt_tokens, max_new_tokens)
        return ok, ttft, tpot

    def _fits(self, scale: int, budget: Budget, prompt_tokens: int, max_new_tokens: int):
        """(fits, TTFT, TPOT, gamma): the TPOT of speculative rounds where the policy would choose them."""
        h = self.cfg.headroom
        ttft = self.model.ttft_ms(scale, prompt_tokens)
        gamma, tpot = self.speculation(scale)
        ok = True
        if budget.ttft_ms is not None and ttft * h > budget.ttft_ms:
            ok = False
        if budget.tpot_ms is not None and tpot * h > budget.tpot_ms:
            ok = False
        if budget.deadline_ms is not None and (ttft + tpot * max(0, max_new_tokens - 1)) * h > budget.deadline_ms:
            ok = False
        return ok, ttft, tpot, gamma

    def choose(self, budget: Budget, prompt_tokens: int, max_new_tokens: int, pinned_scale: int | None = None,
               max_scale: int | None = None) -> Decision:
        """The largest scale (<= max_scale) whose predicted latency fits ``budget``."""
        top = self.cfg.num_scales if max_scale is None else min(max_scale, self.cfg.num_scales)
        if pinned_scale is not None:
            if not 1 <= pinned_scale <= self.cfg.num_scales:
                raise ValueError(f"scale={pinned_scale}: must be in 1..{self.cfg.num_scales}")
            ok, ttft, tpot, gamma = self._fits(pinned_scale, budget, prompt_tokens, max_new_tokens)
            if not ok and budget.on_miss is OnMiss.REJECT:
                raise BudgetUnmet(f"pinned scale {pinned_scale} is predicted at TTFT {ttft:.1f} ms, TPOT {tpot:.1f} ms: "
                                  "over budget", self.retry_after_s())
            return Decision(pinned_scale, ttft, tpot, degraded=False, speculative=gamma)
        for k in range(top, 0, -1):
            ok, ttft, tpot, gamma = self._fits(k, budget, prompt_tokens, max_new_tokens)
            if ok:
                return Decision(k, ttft, tpot, degraded=False, speculative=gamma)
        ttft, tpot = self.model.ttft_ms(1, prompt_tokens), self.model.tpot_ms(1)
        if budget.on_miss is OnMiss.REJECT:
            raise BudgetUnmet(f"no scale meets the budget (scale 1 predicted at TTFT {ttft:.1f} ms, TPOT {tpot:.1f} ms)",
                              self.retry_after_s())
        return Decision(1, ttft, tpot, degraded=True)

    def rebalance(self, running: Sequence[RunningRequest]) -> dict[str, int]:
        """New scales for running requests whose per-token budget the current batch breaks.

        Only CoLM-Air can lower a running request's scale for free, so other models get no changes.
        Returns {request_id: new_scale} for the requests to move (never raises a scale)."""
        if not self.cfg.kv_sharing:
            return {}
        changes: dict[str, int] = {}
        h = self.cfg.headroom
        for r in running:
            if r.pinned or r.budget.tpot_ms is None or r.scale == 1:
                continue
            if self.model.tpot_ms(r.scale, self.model.decode_batch()) * h <= r.budget.tpot_ms:
                continue
            k = r.scale - 1
            while k > 1 and self.model.tpot_ms(k, self.model.decode_batch()) * h > r.budget.tpot_ms:
                k -= 1
            changes[r.request_id] = k
        return changes

    def retry_after_s(self) -> float:
        """A hint for a rejected client: about the time the current decode batch needs to drain a bit."""
        return round(max(0.05, self.model.tpot_ms(1) * max(1.0, self.model.decode_batch()) / 1000.0), 3)

    def estimates(self) -> dict[int, dict[str, float]]:
        """Per-scale predictions for a 128-token prompt (ListScales)."""
        return {k: {"ttft_ms": self.model.ttft_ms(k, 128), "tpot_ms": self.model.tpot_ms(k)}
                for k in range(1, self.cfg.num_scales + 1)}
