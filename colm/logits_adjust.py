"""A request's logit adjustments: penalties, logit bias and a minimum length, applied before a token is picked.

Every generator applies them through ``LogitsAdjuster`` / ``adjust_rows`` (the reference generator
``colm.generate``, the decode engine, the router's in-process backend), where the logits are (a grammar's mask is
filled on the host), to float32 logits, in this order (vLLM's):

0. structured output (``colm.structured``): every token its grammar does not allow next gets -inf, and so does
   every token outside ``allowed_token_ids`` (vLLM) when it is given;
1. ``logit_bias``: each listed token's bias is added to its logit (OpenAI);
2. ``min_tokens``: while fewer tokens than that are out, EOS and the stop tokens get -inf;
3. ``repetition_penalty`` r (the CTRL / transformers rule): every token of the prompt or of the output so far
   has its logit divided by r where positive, multiplied by r where negative;
4. ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI): a token that appeared c times in the output so
   far loses f * c + p * (c > 0).

Temperature, top-k and top-p then act on the result (``colm.sampling``); a greedy request takes its argmax. The
log-prob reported per token stays the model's own (vLLM's default), not the adjusted distribution's.

The counts, the context's distinct tokens and the grammar's place grow by the tokens appended since the last call;
an adjuster holds them as id arrays on the host, and each step touches only those entries of the logits. A request resumed elsewhere after a failure carries its earlier output at the end of its
prompt: ``prior_output`` says how many of the prompt's last tokens are output, so they count as output here too
(and the grammar has read them).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from colm.sampling import SamplingParams, _on
from colm.stopping import stop_token_set
from colm.structured import OutputMatcher, compile_output


def reads_prompt(params: SamplingParams, prior_output: int = 0) -> bool:
    """Whether the adjustments read the prompt: penalties do, and a grammar reads the earlier output a retried
    attempt's prompt ends with."""
    return params.penalizes or (params.structured is not None and prior_output > 0)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """ValueError when ``logit_bias`` or ``allowed_token_ids`` names a token outside the vocabulary."""
    for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                      ("allowed_token_ids", params.allowed_token_ids)):
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary 0..{vocab_size - 1}")


class LogitsAdjuster:
    """The adjustments of one request's ``SamplingParams`` and the context they read (prompt, output so far), held
    sparsely on the host: the ids each adjustment touches (a logit bias's tokens, the allowed ids, the stop tokens,
    the context's distinct tokens, the output's counts), never a vocabulary-sized row. ``adjust_rows`` applies many
    requests' adjusters to a batch of rows where the logits are; calling one adjusts one row."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] | np.ndarray = (),
                 stop_ids: Iterable[int] = (), prior_output: int = 0, grammar=None) -> None:
        """``grammar``: the request's compiled structured output (``colm.structured.compile_output``), if any."""
        check_token_ids(params, vocab_size)
        self.params = params
        self.bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)  # distinct (a sorted mapping)
        self.bias_values = np.array([v for _, v in params.logit_bias], dtype=np.float32)
        self.allowed = np.unique(np.asarray(params.allowed_token_ids, dtype=np.int64)) if params.allowed_token_ids \
            else None
        self.stop_ids = np.array(sorted(t for t in set(stop_ids) if 0 <= t < vocab_size), dtype=np.int64)
        self._counts: dict[int, int] = {}  # token -> times it appeared in the output
        self._out = None  # (output ids sorted, their counts as float32): ``_counts`` as arrays, rebuilt on change
        prompt = np.asarray(prompt_ids, dtype=np.int64)
        self._seen = np.unique(prompt) if params.penalizes else prompt[:0]  # tokens of the prompt or output, sorted
        if params.penalizes and prior_output:
            self._count(prompt[len(prompt) - prior_output:].tolist())
        self.matcher = None
        if params.structured is not None:
            if grammar is None:
                raise ValueError("structured_output: no compiled grammar given")
            self.matcher = OutputMatcher(grammar, vocab_size)
            for t in prompt[len(prompt) - prior_output:].tolist() if prior_output else ():
                self.matcher.accept(t)
        self._folded = 0  # tokens of the output counted so far

    def _count(self, tokens: list[int]) -> None:
        for t in tokens:
            self._counts[t] = self._counts.get(t, 0) + 1
            at = int(np.searchsorted(self._seen, t))
            if at == len(self._seen) or self._seen[at] != t:
                self._seen = np.insert(self._seen, at, t)
        self._out = None

    def context(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the distinct tokens of the prompt and output, sorted; the distinct output tokens, sorted; their counts
        as float32)."""
        if self._out is None:
            out = np.array(sorted(self._counts), dtype=np.int64)
            self._out = (out, np.array([self._counts[t] for t in out.tolist()], dtype=np.float32))
        return (self._seen, *self._out)

    def fold(self, out_tokens: Sequence[int]) -> None:
        """Count the tokens appended to ``out_tokens`` (this generation's output) since the last call, and feed
        them to the grammar."""
        if len(out_tokens) <= self._folded:
            return
        new = [int(t) for t in out_tokens[self._folded:]]
        self._folded = len(out_tokens)  # first: a token the grammar refuses is not folded in twice on a retry
        if self.params.penalizes:
            self._count(new)
        if self.matcher is not None:
            for t in new:
                self.matcher.accept(t)

    def __call__(self, logits: torch.Tensor, out_tokens: Sequence[int]) -> torch.Tensor:
        """logits: [V] (any dtype and device) of the token after ``out_tokens`` (this generation's output so
        far) -> [V] float32, adjusted, where the logits are."""
        return adjust_rows(logits[None], [self], [out_tokens])[0]


def adjust_rows(logits: torch.Tensor, adjusters, outs, pending: torch.Tensor | None = None,
                has_pending=None) -> torch.Tensor:
    """logits [A, V] (any dtype and device), row i of the request whose adjuster is ``adjusters[i]`` and whose
    output so far is ``outs[i]`` -> [A, V] float32 adjusted, where the logits are, in the module docstring's order.
    Each adjustment gathers the (row, token) entries it touches for all rows at once (index lists built on the
    host from the adjusters' sparse state, one copy each), computes them and scatters them back: work in the
    context's length, not the vocabulary's, and a row comes out exactly as it would alone. A grammar row's mask is
    filled on the host (xgrammar's bitmask) and applied here (on a GPU through a byte table; on the host by
    xgrammar).

    ``pending`` [A] (int64, on the device) with ``has_pending[i]``: row i's output has one more token than
    ``outs[i]``, known only on the device (a step queued before the previous one was read): it counts as output
    here without a read. Its entry joins the repetition and the count penalties' entries (where it repeats an entry
    already there, both compute the same value); a grammar row cannot have one (its matcher needs the token)."""
    dev, (A, V) = logits.device, logits.shape
    for a, out in zip(adjusters, outs):
        a.fold(out)
    has_pending = list(has_pending) if pending is not None else [False] * A
    if any(h and a.matcher is not None for a, h in zip(adjusters, has_pending)):
        raise ValueError("adjust_rows: a grammar row's token must be read before its next step is adjusted")
    num_out = [len(out) + h for out, h in zip(outs, has_pending)]  # tokens out before this step's
    x = logits.float().clone()  # [A, V]

    def pending_rows(pred) -> tuple[list[int], torch.Tensor | None]:
        """The rows with a pending token where ``pred(row)``, and their indices on the device (None if none)."""
        add = [i for i in range(A) if has_pending[i] and pred(i)]
        return add, (_on(add, torch.int64, dev) if add else None)

    def with_pending(e, at):
        """Entries ``e`` (rows, ids; or None) and the pending token of each row ``at`` (or None: none to add)."""
        if at is None:
            return e
        extra = (at, pending.index_select(0, at))
        return extra if e is None else (torch.cat([e[0], extra[0]]), torch.cat([e[1], extra[1]]))

    def entries(per_row) -> tuple[torch.Tensor, torch.Tensor] | None:
        """per_row: one id array per row (or None) -> (rows, ids) [N] int64 on the device, or None if empty."""
        ids = [np.asarray(i, dtype=np.int64) for i in per_row]
        n = sum(len(i) for i in ids)
        if not n:
            return None
        rows = np.repeat(np.arange(len(ids), dtype=np.int64), [len(i) for i in ids])
        return _on(rows, torch.int64, dev), _on(np.concatenate(ids), torch.int64, dev)

    def flat(per_row) -> torch.Tensor:
        return _on(np.concatenate([np.asarray(v, dtype=np.float32) for v in per_row]), torch.float32, dev)

    grammar = [i for i, a in enumerate(adjusters) if a.matcher is not None]
    if grammar and dev.type == "cpu":  # xgrammar applies its bitmask to a host row in place
        for i in grammar:
            adjusters[i].matcher.mask(x[i])
    elif grammar:
        words = np.concatenate([adjusters[i].matcher.fill() for i in grammar])  # [G, W] int32, on the host
        refused = _refused(_on(words.view(np.uint8), torch.uint8, dev), V)  # [G, V] bool
        if len(grammar) == A:
            x.masked_fill_(refused, float("-inf"))
        else:
            at = _on(grammar, torch.int64, dev)
            x.index_copy_(0, at, x.index_select(0, at).masked_fill(refused, float("-inf")))
    keep = [i for i, a in enumerate(adjusters) if a.allowed is not None]
    if keep:  # every token but the allowed ones -> -inf: the kept entries saved, the rows filled, put back
        e = entries([a.allowed if a.allowed is not None else () for a in adjusters])
        kept = x[e]
        x.index_fill_(0, _on(keep, torch.int64, dev), float("-inf"))
        x.index_put_(e, kept)
    e = entries([a.bias_ids for a in adjusters])
    if e is not None:
        x.index_put_(e, x[e] + flat([a.bias_values for a in adjusters]))
    e = entries([a.stop_ids if n < a.params.min_tokens else () for a, n in zip(adjusters, num_out)])
    if e is not None:
        x.index_put_(e, torch.full((), float("-inf"), device=dev))
    rep = [a.params.repetition_penalty != 1 for a in adjusters]
    e = with_pending(entries([a.context()[0] if r else () for a, r in zip(adjusters, rep)]),
                     pending_rows(rep.__getitem__)[1])
    if e is not None:
        hit = x[e]
        rp = _on([a.params.repetition_penalty for a in adjusters], torch.float32, dev)[e[0]]  # [N]
        x.index_put_(e, torch.where(hit > 0, hit / rp, hit * rp))
    pen = [bool(a.params.frequency_penalty or a.params.presence_penalty) for a in adjusters]
    ctx = [a.context() if p else (None, (), ()) for a, p in zip(adjusters, pen)]
    e = entries([c[1] for c in ctx])
    counts = None if e is None else flat([c[2] for c in ctx])  # [N], all > 0
    add, at = pending_rows(pen.__getitem__)
    if add:  # the pending token: its count one more than in the output read so far (0 if absent)
        mine = torch.full((A,), -1, dtype=torch.int64, device=dev)
        mine.index_copy_(0, at, pending.index_select(0, at))
        prev = torch.zeros(A, device=dev)
        if e is not None:
            same = (e[1] == mine[e[0]]).float()  # [N]: the entry of a row's pending token
            prev.index_add_(0, e[0], counts * same)
            counts = counts + same
        e = with_pending(e, at)
        extra = prev.index_select(0, at) + 1.0
        counts = extra if counts is None else torch.cat([counts, extra])
    if e is not None:
        f = _on([a.params.frequency_penalty for a in adjusters], torch.float32, dev)[e[0]]
        p = _on([a.params.presence_penalty for a in adjusters], torch.float32, dev)[e[0]]
        x.index_put_(e, x[e] - f * counts - p)
    return x


_REFUSED_BITS = torch.tensor([[not (b >> j) & 1 for j in range(8)] for b in range(256)])  # [256, 8] bool
_TABLES: dict[torch.device, torch.Tensor] = {}  # _REFUSED_BITS on each device used


def _refused(mask_bytes: torch.Tensor, n: int) -> torch.Tensor:
    """A grammar bitmask as bytes [G, 4 W] (little-endian int32 words: bit j of byte k is token 8 k + j, set when
    the token is allowed) -> [G, n] bool, True for the tokens it refuses: one table lookup per byte."""
    table = _TABLES.get(mask_bytes.device)
    if table is None:
        table = _TABLES[mask_bytes.device] = _REFUSED_BITS.to(mask_bytes.device)
    return table[mask_bytes.long()].reshape(mask_bytes.shape[0], -1)[:, :n]


def make_adjuster(params: SamplingParams, vocab_size: int, prompt_ids: Sequence[int] | np.ndarray = (),
                  eos_id: int | None = None, prior_output: int = 0, tokenizer=None,
                  grammar=None) -> LogitsAdjuster | None:
    """The request's ``LogitsAdjuster``, or None when its parameters adjust nothing. The tokens ``min_tokens``
    masks are the ones that would stop it: its stop tokens, and EOS unless ``ignore_eos``. Structured output
    takes its compiled ``grammar``, or compiles it for ``tokenizer``."""
    if not params.adjusts_logits:
        return None
    if params.structured is not None and grammar is None:
        if tokenizer is None:
            raise ValueError("structured_output: this generator has no tokenizer to compile it for")
        grammar = compile_output(params.structured, tokenizer, vocab_size)
    return LogitsAdjuster(params, vocab_size, prompt_ids, stop_token_set(params, eos_id), prior_output, grammar)
