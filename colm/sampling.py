"""Token sampling shared by reference generation and the decode engine.

``SamplingParams`` is validated once; ``sample_next`` turns one row of logits into a token id with
a per-request ``torch.Generator`` (seeded), so the same seed gives the same tokens anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from colm.structured import StructuredOutput

# Temperatures below this divide logits into inf/NaN in float32 (1e-45 did, failing a whole decode batch);
# above the upper bound every distribution is uniform to float32 precision.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
# OpenAI's range for presence_penalty / frequency_penalty; repetition_penalty divides positive logits, so it is
# bounded as the temperature is; logit_bias values as OpenAI bounds them, at most this many ids per request
MAX_PENALTY = 2.0
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-2, 100.0
MAX_LOGIT_BIAS, MAX_BIAS = 1024, 100.0
MAX_ALLOWED_TOKEN_IDS = 65536  # allowed_token_ids: at most this many ids
MAX_TOP_LOGPROBS = 20  # the most likely tokens reported per generated token (OpenAI's and vLLM's default limit)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    # logit adjustments (``colm.logits_adjust``), applied to the model's logits before temperature, top-k, top-p
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); ids distinct, kept sorted
    min_tokens: int = 0  # EOS and stop tokens are masked, and no stop rule ends the output, before this many tokens
    # the output held to a JSON schema, regex, grammar or choice (``colm.structured``); None = free text
    structured: StructuredOutput | None = None
    # report this many of the most likely tokens (and their log-probs under the model) with every generated token
    top_logprobs: int = 0
    min_p: float = 0.0  # sampling keeps the tokens at least min_p times as likely as the most likely one (0 = off)
    allowed_token_ids: tuple[int, ...] = ()  # every other token is masked (empty = all allowed)

    def __post_init__(self) -> None:
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)!r}: must be integers >= 0")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 0")
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ValueError(f"temperature={t!r}: must be 0 (greedy) or a number in "
                             f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: must be a number in (0, 1]")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed={self.seed!r}: must be a 64-bit integer or null")
        if not all(isinstance(s, str) for s in self.stop_strings):
            raise ValueError("stop_strings: every stop must be a string")
        if any(s == "" for s in self.stop_strings):
            raise ValueError("stop_strings: empty string is not allowed")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos={self.ignore_eos!r}: must be true or false")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise ValueError(f"{name}={v!r}: must be a number in [{-MAX_PENALTY}, {MAX_PENALTY}] (0 = off)")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or not MIN_REPETITION_PENALTY <= r <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty={r!r}: must be a number in [{MIN_REPETITION_PENALTY}, "
                             f"{MAX_REPETITION_PENALTY}] (1 = off)")
        bias = tuple(self.logit_bias)
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} token ids (got {len(bias)})")
        for pair in bias:
            if not (isinstance(pair, tuple) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0):
                raise ValueError(f"logit_bias: {pair!r} is not a (token id >= 0, bias) pair")
            b = pair[1]
            if not _is_number(b) or not math.isfinite(b) or not -MAX_BIAS <= b <= MAX_BIAS:
                raise ValueError(f"logit_bias[{pair[0]}]={b!r}: must be a number in [{-MAX_BIAS}, {MAX_BIAS}]")
        if len({t for t, _ in bias}) != len(bias):
            raise ValueError("logit_bias: a token id appears twice")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise ValueError("structured_output: must be a StructuredOutput or null")
            if self.ignore_eos or self.min_tokens:
                raise ValueError("structured_output: cannot be combined with ignore_eos or min_tokens (the grammar "
                                 "decides where the output ends)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r}: must be a number in [0, 1] (0 = off)")
        allowed = tuple(self.allowed_token_ids)
        if len(allowed) > MAX_ALLOWED_TOKEN_IDS or not all(_is_int(t) and t >= 0 for t in allowed):
            raise ValueError(f"allowed_token_ids: at most {MAX_ALLOWED_TOKEN_IDS} integers >= 0")
        object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(int(t) for t in allowed))))
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs={self.top_logprobs!r}: must be an integer in 0..{MAX_TOP_LOGPROBS}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens={self.min_tokens!r}: must be an integer in 0..max_new_tokens "
                             f"({self.max_new_tokens})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Penalties, a logit bias, a minimum length or structured output change the logits before a token is
        picked (on the host, ``colm.logits_adjust``)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.min_tokens or self.structured is not None or self.allowed_token_ids)

    @property
    def penalizes(self) -> bool:
        """A penalty reads the request's context (the prompt, and the output so far)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the model's own logits, and no top log-probs to report: the engines pick it on the device."""
        return self.greedy and not self.adjusts_logits and not self.top_logprobs

    def make_generator(self, device="cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [V] (any dtype) -> token id: the argmax (greedy), else ``sample_rows``' draw for this one row."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    return sample_rows(logits[None], [params], [generator])[0]


def _on(values, dtype, device) -> torch.Tensor:
    """``values`` (host numbers) as a tensor on ``device``; on a GPU through pinned memory without waiting for the
    stream (a plain copy from pageable memory waits for every queued kernel, which a step queued ahead must not)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def filtered_rows(logits: torch.Tensor, params) -> torch.Tensor:
    """The distribution each row of logits [H, V] (any device and dtype) is sampled from under ``params[i]``:
    [H, V] float32, zero outside the kept tokens, renormalised (vLLM's order of filters):

    scores = logits / temperature; min-p keeps the tokens at least min_p times as likely as the most likely; top-k
    the tokens scoring at least the k-th highest score; top-p the tokens at least as likely as the last token of the
    smallest most-likely-first prefix whose mass reaches top_p.

    Every filter is a threshold on values, so tokens of equal probability are kept or dropped together and no
    tie order enters the result (bf16 logits tie often, and ``topk`` orders ties differently across devices and
    shapes). The thresholds come from the values alone: the k-th score from ``topk``; top-p's, on the host, from
    ``topk`` of m = 256, 1024, ... probabilities (a sorted prefix of the full order) until it holds top_p of the mass
    (no sort of the vocabulary: a sort of 128k tokens took 12 ms on a CPU); on a GPU from one sort of each row, so
    that nothing here waits for the device (a step is queued ahead of the host that reads it)."""
    H, V = logits.shape
    dev = logits.device
    scores = logits.float() / _on([p.temperature for p in params], torch.float32, dev)[:, None]  # [H, V]
    if any(p.min_p for p in params):
        pr = torch.softmax(scores, dim=-1)
        thr = _on([p.min_p for p in params], torch.float32, dev)[:, None] * pr.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(pr < thr, float("-inf"))
    ks = [p.top_k if p.top_k and p.top_k < V else 0 for p in params]
    if any(ks):
        kth = torch.topk(scores, max(ks), dim=-1).values  # [H, kmax], highest first
        k = _on([[max(x, 1)] for x in ks], torch.int64, dev)  # [H, 1]
        cut = torch.where(_on([[x > 0] for x in ks], torch.bool, dev), kth.gather(1, k - 1), float("-inf"))
        scores = scores.masked_fill(scores < cut, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [H, V]
    tps = [p.top_p for p in params]
    if any(tp < 1.0 for tp in tps):
        top_p = _on([[tp] for tp in tps], torch.float32, dev)  # [H, 1]
        if dev.type == "cuda":
            vals = torch.sort(probs, dim=-1, descending=True).values  # [H, V]
        else:
            m = min(256, V)
            while True:
                vals = torch.topk(probs, m, dim=-1).values  # [H, m], most likely first
                if m == V or bool((vals.sum(-1, keepdim=True) >= top_p).all()):
                    break
                m = min(4 * m, V)
        keep = ((torch.cumsum(vals, dim=-1) - vals) < top_p).sum(-1, keepdim=True).clamp_min(1)  # [H, 1]
        cut = torch.where(top_p < 1.0, vals.gather(1, keep - 1), 0.0)  # the last kept probability
        probs = probs.masked_fill(probs < cut, 0.0)
        probs = torch.where(top_p < 1.0, probs / probs.sum(-1, keepdim=True), probs)  # others: as they were
    return probs


def uniforms(generators) -> list[float]:
    """One float64 uniform in [0, 1) from each generator (None: the global one), in order: a row's draw."""
    return [float(torch.rand((), dtype=torch.float64, generator=g)) for g in generators]


def sample_rows(logits: torch.Tensor, params, generators) -> list[int]:
    """One token per row of logits [H, V] (any device and dtype), row i drawn from ``filtered_rows``' distribution
    under ``params[i]`` (temperature > 0) with ``generators[i]``: the whole batch in a fixed number of tensor
    operations where the logits are, reading back only the H tokens. Each draw is one float64 uniform from the
    row's generator (``uniforms``, on the host) against the running sum of the row's probabilities in id order.
    The reference generator samples through this function too (one row), so its tokens are the engines' own.

    A row whose distribution is not finite (NaN logits) is a ValueError, and then no generator has moved: the
    caller may redo the rows that can be drawn, each drawing as it would have."""
    states = [g.get_state() if g is not None else None for g in generators]
    try:
        u = _on(uniforms(generators), torch.float64, logits.device)  # [H]
        out = draw_rows(filtered_rows(logits, params), u)
        bad = [i for i, t in enumerate(out) if t < 0]
        if bad:
            raise ValueError(f"sampling row {bad[0]}: its distribution is not finite (NaN or infinite logits)")
        return out
    except Exception:
        restore(generators, states)
        raise


def restore(generators, states) -> None:
    """Put each generator back to its saved state (``g.get_state()``; None for no generator)."""
    for g, st in zip(generators, states):
        if g is not None:
            g.set_state(st)


def draw_rows_tensor(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i of probs [H, n] (non-negative) inverted at u[i] in [0, 1) against its float64 running sum: the first
    index whose running sum passes u[i] times the row's total; -1 for a row whose total is not finite and positive.
    [H] int64 where ``probs`` is, nothing read back."""
    cdf = probs.double().cumsum(dim=-1)  # [H, n]
    total = cdf[:, -1]
    pick = torch.searchsorted(cdf, (u * total)[:, None], right=True)[:, 0].clamp_max(probs.shape[-1] - 1)
    return torch.where(torch.isfinite(total) & (total > 0), pick, -1)


def draw_rows(probs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """``draw_rows_tensor``, read: one read of the H indices."""
    return draw_rows_tensor(probs, u).tolist()


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """An index of ``probs`` [n] (non-negative, any sum > 0) drawn with its probability: one float64 uniform from
    ``generator`` (torch.multinomial took 3 ms for a 128k vocabulary here)."""
    i = draw_rows(probs[None].cpu(), torch.tensor(uniforms([generator]), dtype=torch.float64))[0]
    if i < 0:
        raise ValueError("draw: the distribution is not finite")
    return i


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely tokens of logits [V] and their log-probs under the model (unfiltered), most likely
    first."""
    return top_logprobs_rows(logits[None], [k])[0]


def top_logprobs_rows(logits: torch.Tensor, ks, lse: torch.Tensor | None = None) -> list[tuple[tuple[int, float], ...]]:
    """``top_logprobs`` of each row of logits [H, V] (any device), row i's ``ks[i]`` most likely: one ``topk``.
    ``lse`` [H] float32: the rows' log-sum-exp as the step computed it, so that a token's value here is bit-equal
    to its log-prob reported beside it (logit - lse); else ``log_softmax``."""
    if not any(ks):
        return [()] * len(ks)
    lps = torch.log_softmax(logits.float(), dim=-1) if lse is None else logits.float() - lse.float()[:, None]
    vals, ids = lps.topk(max(ks), dim=-1)  # [H, kmax]
    return [tuple(zip(t[:k], v[:k])) for k, t, v in zip(ks, ids.tolist(), vals.tolist())]


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """``filtered_rows`` of one row: [V] float32."""
    return filtered_rows(logits[None], [params])[0]
