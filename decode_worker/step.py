"""One continuous-batching decode step: every running sequence advances by one token.

Sequences at different scales share the step in one of two ways (``DecodeConfig.mixed_scale_mode``):

* ``"widest"``: one forward at the batch's widest scale; chain causality makes the first k chains
  of that hidden state exactly the scale-k hidden state, so each sequence's logits come from the
  head's first k chains (``model.logits(h, k)``). Weights are read once per step.
* ``"group"``: one forward per scale over that scale's sequences: fewer FLOPs for small scales,
  chain-1 weights read once per group.

Sampling follows ``colm.sampling`` exactly (greedy argmax on the device; sampled rows drawn where the logits are,
each with a uniform from its request's generator; penalties, logit bias, min_tokens and grammars applied there,
``colm.logits_adjust``), so tokens match the reference generator. A step whose rows are ``queueable`` can be
queued ahead of the host that reads it (``launch_step``).
"""

from __future__ import annotations

import torch

from colm.errors import NoTokenAllowedError
from colm.logits_adjust import adjust_rows
from colm.sampling import _on, draw_rows_tensor, filtered_rows, restore, top_logprobs_rows, uniforms

from colm.decode_worker.graphs import StepHead, head_outputs, mixed_head_outputs
from colm.decode_worker.paged_cache import PagedStepCache


def _step_tensors(batch, pool, device, carry=None, feed: torch.Tensor | None = None):
    """Inputs of one eager step. ``carry``/``feed``: the step after one that is queued but not read yet (see
    ``launch_step``)."""
    width = max(len(r.blocks) for r in batch)
    tables = torch.zeros(len(batch), width, dtype=torch.int32)
    for i, r in enumerate(batch):
        tables[i, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
    c = len(carry) if carry is not None else 0
    pos = [r.num_cached + (i < c) for i, r in enumerate(batch)]
    slots = [pool.slot(r.blocks, p) for r, p in zip(batch, pos)]
    tokens = torch.tensor([[r.next_input] for r in batch], device=device)  # [B, 1]
    if c:  # carried rows take the queued step's tokens, on the device
        tokens = torch.cat([feed[torch.tensor(list(carry), device=feed.device)], tokens[c:]])
    positions = torch.tensor([[p] for p in pos], device=device)  # [B, 1]
    cache = PagedStepCache(pool, tables.to(device), torch.tensor([p + 1 for p in pos], dtype=torch.int32, device=device),
                           torch.tensor(slots, dtype=torch.int64, device=device), length=max(pos))
    return tokens, positions, cache


def _hidden(model, batch, pool, scale, device, graphs=None):
    if graphs is not None:
        h = graphs.hidden(batch, scale)  # CUDA graph replay; None when graphs do not apply
        if h is not None:
            return h
    tokens, positions, cache = _step_tensors(batch, pool, device)
    return model.hidden(tokens, scale=scale, cache=cache, positions=positions)[:, 0]  # [B, D_scale]


@torch.no_grad()
def decode_step(model, batch, pool, scales: list[int], mode: str = "widest", graphs=None) -> list[tuple[int, float]]:
    """Run one step for ``batch`` (DecodeRequests) at ``scales`` (one per row); returns (token, logprob) per row.
    ``graphs``: a ``decode_worker.graphs.DecodeGraphs`` to replay the forward from (CUDA), or None (eager)."""
    device = model.inv_freq.device
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(scales):
        groups.setdefault(s, []).append(i)
    if graphs is not None and (len(groups) == 1 or mode == "widest"):
        # forward and head(s) in one replay (mixed scales: each row's head at its own); None when graphs do not apply
        head = graphs.step_head(batch, max(scales), row_scales=scales)
        if head is not None:
            return _picks(head, batch)
    if mode == "widest" or len(groups) == 1:
        hidden = _hidden(model, batch, pool, max(scales), device, graphs)
        per_group = {s: (idx, hidden[idx] if len(groups) > 1 else hidden) for s, idx in groups.items()}
    else:
        per_group = {s: (idx, _hidden(model, [batch[i] for i in idx], pool, s, device, graphs))
                     for s, idx in groups.items()}
    out: list[tuple[int, float] | None] = [None] * len(batch)
    for s, (idx, h) in per_group.items():
        for j, pick in enumerate(_picks(head_outputs(model, h, s), [batch[i] for i in idx])):
            out[idx[j]] = pick
    return out  # type: ignore[return-value]


class LaunchedStep:
    """A step whose GPU work is queued (``launch_step``); ``result`` waits for it."""

    def __init__(self, batch, scales, head: StepHead, read=None, tokens: torch.Tensor | None = None,
                 drawn=None) -> None:
        self.batch, self.scales, self.head = list(batch), list(scales), head
        self._read = read  # (host [2, B] float64 (pinned on a GPU), CUDA event or None) of the queued read-back
        self.tokens = head.greedy if tokens is None else tokens  # [B, 1] on the device: what the next step feeds
        self._drawn = drawn  # (generators, their states before this step drew): the sampled rows'
        self._event = None
        if read is None and head.packed.is_cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def matches(self, batch, scales) -> bool:
        return len(batch) == len(self.batch) and all(a is b for a, b in zip(batch, self.batch)) and \
            list(scales) == self.scales

    def wait(self) -> None:
        event = self._read[1] if self._read is not None else self._event
        if event is not None:
            event.synchronize()

    def undraw(self) -> None:
        """This step's tokens will not be used (dropped, or it failed): its sampled rows' generators go back to
        where they were, so the step that redoes them draws the same uniforms."""
        if self._drawn is not None:
            restore(*self._drawn)
            self._drawn = None

    def result(self) -> list[tuple[int, float]]:
        if self._read is None:
            return _picks(self.head, self.batch)
        host, event = self._read
        if event is not None:
            event.synchronize()
        return _drawable(_greedy_picks(host[:, : len(self.batch)]))


@torch.no_grad()
def launch_step(model, batch, pool, scales, graphs=None, after: LaunchedStep | None = None, carry=None,
                sample: bool = False) -> LaunchedStep:
    """Queue one step of ``batch`` (row i at ``scales[i]``; mixed scales run as ``mixed_scale_mode: widest`` does:
    one forward at the widest, each row's head at its own) without reading its tokens back. With ``sample`` the
    rows (all ``queueable``) are picked on the device by ``_pick_tokens``, counting the token ``after`` gave each
    carried row (not read yet); ``LaunchedStep.undraw`` gives the sampled rows' uniforms back if the step is
    dropped. Without ``sample`` every row takes the argmax of the model's own logits (a speculative round's
    drafts).

    ``after``: the step queued just before and not read yet, so the host can launch step n+1 before it reads
    step n (the engine's ``overlap_steps``). The first ``len(carry)`` rows of ``batch`` are rows ``carry`` of
    ``after.batch`` (default: all of them, in order): each runs one position further and takes ``after``'s
    token on the device. Rows after them are new to the batch (a prompt that just completed): they feed
    their own next input at their own position."""
    if after is not None and carry is None:
        carry = range(len(batch))
    feed = None if after is None else after.tokens  # [B', 1]
    carry = list(carry) if after is not None else None
    scales = list(scales)
    widest, mixed = max(scales), len(set(scales)) > 1
    picks = sample and any(not r.params.greedy or r.adjust is not None for r in batch)  # not all plain argmax
    if picks and after is not None and any(r.adjust is not None for r in batch):
        # the carried rows' tokens of the step before, output not read yet: the adjustments count them
        pending = torch.cat([feed[_on(carry, torch.int64, feed.device), 0],
                             torch.full((len(batch) - len(carry),), -1, dtype=torch.int64, device=feed.device)])
        has_pending = [j < len(carry) for j in range(len(batch))]
    else:
        pending, has_pending = None, None
    if graphs is not None:
        launched = graphs.step_head(batch, widest, carry=carry, feed=feed, read_async=not picks, row_scales=scales)
        if launched is not None:
            if picks:
                return _drawn(batch, scales, launched, pending, has_pending)
            head, read = launched
            return LaunchedStep(batch, scales, head, read)
    tokens, positions, cache = _step_tensors(batch, pool, model.inv_freq.device, carry, feed)
    hidden = model.hidden(tokens, scale=widest, cache=cache, positions=positions)[:, 0]  # [B, D_widest]
    if not mixed:
        head = head_outputs(model, hidden, widest)
    else:
        row_scales = torch.tensor(scales, dtype=torch.int64, device=hidden.device)  # [B]
        head = mixed_head_outputs(model, hidden, row_scales, set(scales))
    return _drawn(batch, scales, head, pending, has_pending) if picks else LaunchedStep(batch, scales, head)


def queueable(r) -> bool:
    """A row whose token can be picked on the device inside a step queued ahead: no top log-probs to report and no
    grammar (its matcher needs each token on the host); greedy or sampled, adjusted or not."""
    return not r.params.top_logprobs and (r.adjust is None or r.adjust.matcher is None)


NO_TOKEN = -2  # a row's pick when its adjustments left every token at -inf (-1: a distribution not finite)


def _pick_tokens(head: StepHead, rows, pending=None, has_pending=None) -> tuple[torch.Tensor, tuple | None]:
    """Each row's token where the logits are: ([B] int64, (the sampled rows' generators, their states before this
    draw) or None). Adjusted rows are adjusted together (``colm.logits_adjust.adjust_rows``, counting ``pending``:
    each carried row's token of the step before, not read yet); greedy rows take the argmax; sampled rows draw
    together (``colm.sampling``'s filters and draw, as ``sample_rows``), each with one uniform from its generator.
    A row whose distribution is not finite draws -1; an adjusted row that allows no token picks ``NO_TOKEN``."""
    dev, B = head.logits.device, len(rows)
    draws = [j for j, r in enumerate(rows) if not r.params.greedy]
    adj = [j for j, r in enumerate(rows) if r.adjust is not None]
    toks = head.greedy[:, 0].clone()  # [B]
    x = at = None
    if adj:
        at = _on(adj, torch.int64, dev)  # [A]
        x = adjust_rows(head.logits.index_select(0, at), [rows[j].adjust for j in adj],
                        [rows[j].out_tokens for j in adj], None if pending is None else pending.index_select(0, at),
                        None if has_pending is None else [has_pending[j] for j in adj])  # [A, V] float32
        toks.index_copy_(0, at, x.argmax(dim=-1))  # the greedy ones keep it; the sampled ones draw below
    drawn = None
    if draws:
        logits = head.logits if x is None else head.logits.float().index_copy(0, at, x)  # [B, V]: adjusted replaced
        gens = [rows[j].generator for j in draws]
        states = [g.get_state() if g is not None else None for g in gens]
        u = _on(uniforms(gens), torch.float64, dev)  # [S]
        params = [rows[j].params for j in draws]
        if len(draws) == B:
            toks = draw_rows_tensor(filtered_rows(logits, params), u)
        else:
            idx = _on(draws, torch.int64, dev)  # [S]
            toks.index_copy_(0, idx, draw_rows_tensor(filtered_rows(logits.index_select(0, idx), params), u))
        drawn = (gens, states)
    if x is not None:  # adjusted rows that allow no token: their argmax names a refused token, their draw fails
        none = torch.isneginf(x).all(dim=-1)  # [A]
        toks.index_copy_(0, at, torch.where(none, torch.full_like(toks[:1], NO_TOKEN), toks.index_select(0, at)))
    return toks, drawn


def _packed(head: StepHead, toks: torch.Tensor) -> torch.Tensor:
    """[2, B] float64: the tokens ``toks`` [B] and the model's own log-probs of them (a -1 read as token 0)."""
    lps = head.logits.gather(1, toks.clamp_min(0)[:, None])[:, 0].float() - head.lse  # [B]
    return torch.stack([toks.double(), lps.double()])


def _drawable(picks: list) -> list:
    """``picks`` ((token, ...) per row), or ValueError when a row drew -1 (its distribution was not finite), or
    ``NoTokenAllowedError`` when its constraints allowed no token (``NO_TOKEN``)."""
    bad = [i for i, (t, *_) in enumerate(picks) if t < 0]
    if bad:
        if picks[bad[0]][0] == NO_TOKEN:
            raise NoTokenAllowedError(
                "no token is allowed at this output position: the request's constraints (allowed_token_ids, a "
                "grammar, regex, JSON schema or choice, min_tokens with the end-of-sequence and stop ids) exclude "
                f"every token (row {bad[0]} of its step)")
        raise ValueError(f"sampling row {bad[0]}: its distribution is not finite (NaN or infinite logits)")
    return picks


def _drawn(batch, scales, head: StepHead, pending=None, has_pending=None) -> LaunchedStep:
    """The launched step of ``head`` with its tokens picked on the device (``_pick_tokens``); tokens and log-probs
    read back in one queued copy. A row that drew -1 raises when read; its next input is token 0 meanwhile (the
    step queued after it is dropped: its batch no longer holds)."""
    toks, drawn = _pick_tokens(head, batch, pending, has_pending)
    packed = _packed(head, toks)  # [2, B]
    if packed.is_cuda:
        host = torch.empty(packed.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        read = (host, event)
    else:
        read = (packed, None)
    return LaunchedStep(batch, scales, head, read, tokens=toks.clamp_min(0)[:, None], drawn=drawn)


def _picks(head: StepHead, rows) -> list[tuple]:
    """(token, log-prob, top log-probs) per row from the step's head, read now. Plain greedy rows read the
    device's argmax (``packed``); otherwise every row is picked on the device (``_pick_tokens``) and read in one
    copy; a row that cannot be drawn is a ValueError with every generator as it was. The top log-probs of the
    rows that ask for them come from one ``topk`` over their rows. The third item: (token id, log-prob) pairs,
    empty unless asked for (absent on the all-greedy path)."""
    if all(r.params.plain_greedy for r in rows):
        return _greedy_picks(head.packed)
    toks, drawn = _pick_tokens(head, rows)
    try:
        picks = _drawable(_greedy_picks(_packed(head, toks)))
    except ValueError:
        if drawn is not None:
            restore(*drawn)
        raise
    tops: list[tuple] = [()] * len(rows)
    want = [j for j, r in enumerate(rows) if r.params.top_logprobs]
    if want:
        for j, top in zip(want, top_logprobs_rows(head.logits[want], [rows[j].params.top_logprobs for j in want],
                                                  head.lse[want])):
            tops[j] = top
    return [(t, lp, top) for (t, lp), top in zip(picks, tops)]


def _greedy_picks(packed: torch.Tensor) -> list[tuple[int, float]]:
    """(token, log-prob) per row of ``packed`` [2, B] float64 (one read to the host; float64 holds every
    token id exactly)."""
    both = packed.tolist()
    return [(int(t), lp) for t, lp in zip(both[0], both[1])]
