"""Chain-1 self-speculative decoding: the model drafts with its own chain 1 over the request's own KV.

In CoLM-Air every scale attends to the K/V that chain 1 computes, so a draft step at scale 1 writes exactly
the K/V the full model would write: drafting leaves nothing to recompute. One round of a request at scale
k > 1 with ``gamma`` drafts:

1. draft: ``gamma`` single-token steps at scale 1 (batched over the round's requests) from the request's
   next input x, giving d_1..d_gamma (greedy: argmax, each step fed the previous pick on the device and the
   whole round queued before one read; sampling: drawn from the scale-1 distribution q with the request's own
   generator, q kept, a read per step);
2. verify: one scale-k forward over the gamma + 1 positions [x, d_1, .., d_gamma] (``PagedExtendCache``),
   giving the target distributions p_1..p_{gamma+1};
3. accept (``accept_greedy`` / ``accept_sampled``): greedy keeps the longest prefix of drafts equal to the
   target's argmax, then the target's own token at the first mismatch (or after the last draft); sampling
   uses the speculative-sampling rule (accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), else draw
   from the residual max(0, p_i - q_i) normalised and stop; all accepted: draw from p_{gamma+1}), so
   the tokens are distributed exactly as scale-k sampling's;
4. the round emits n + 1 tokens (n drafts accepted); the request's cached length moves by n + 1, and the
   K/V written for rejected positions lie past it, rewritten before they are ever attended to.

Greedy rounds therefore give the same tokens as plain scale-k decoding. The number of drafts is capped so a
round never emits past ``max_new_tokens`` (nor writes past the request's reserved blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm.sampling import SamplingParams, draw, filtered_probs

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.paged_cache import PagedExtendCache, PagedVerifyCache


@dataclass
class _Cursor:
    """A request's position during drafting (what a decode step reads: blocks, num_cached, next_input)."""
    blocks: list[int]
    num_cached: int
    next_input: int


@dataclass(frozen=True)
class SpecToken:
    token_id: int
    logprob: float   # under the target scale's (unfiltered) distribution, as plain steps report it
    drafted: bool    # a chain-1 draft the target accepted (False: the target's own token)


def round_gamma(req) -> int:
    """Drafts this round for ``req`` (0: a plain step): its ``speculative`` capped by the tokens left."""
    if not req.speculative or req.adjust is not None or req.params.top_logprobs:  # most rows: the first test
        return 0  # adjusted logits depend on each accepted token, top log-probs are read per step: plain steps
    left = req.params.max_new_tokens - len(req.out_tokens)
    return max(0, min(req.speculative, left - 1)) if req.scale > 1 else 0


def accept_greedy(drafts: list[int], target: list[int]) -> int:
    """Drafts d_1..d_g and the target's argmax a_0..a_g (a_i follows d_i; a_0 follows x): how many drafts hold."""
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return n


def accept_sampled(drafts: list[int], q: torch.Tensor, p: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """The speculative-sampling rule. q [g, V]: the draft distributions d_i was drawn from; p [g + 1, V]: the
    target's. Returns (n accepted, the token that follows them), distributed as sampling from p alone."""
    for i, d in enumerate(drafts):
        ratio = float(p[i, d]) / float(q[i, d])  # q[i, d] > 0: d was drawn from q_i
        if float(torch.rand((), generator=generator)) < ratio:
            continue
        residual = (p[i] - q[i]).clamp_min(0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]  # p == q on the support: any rejection is a p-draw
        return i, draw(dist, generator)
    return len(drafts), draw(p[len(drafts)], generator)


@torch.no_grad()
def draft(model, rows, pool, gamma: int, graphs=None) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """``gamma`` scale-1 steps of ``rows`` (DecodeRequests); per row its drafts and, for sampling rows, their
    distributions q [gamma, V] (float32, CPU). Writes chain-1 K/V at positions num_cached..num_cached+gamma-1."""
    from colm.decode_worker.step import _step_tensors

    device = model.inv_freq.device
    cursors = [_Cursor(r.blocks, r.num_cached, r.next_input) for r in rows]
    drafts: list[list[int]] = [[] for _ in rows]
    qs: list[list[torch.Tensor]] = [[] for _ in rows]
    for _ in range(gamma):
        h = graphs.hidden(cursors, 1) if graphs is not None else None
        if h is None:
            tokens, positions, cache = _step_tensors(cursors, pool, device)
            h = model.hidden(tokens, scale=1, cache=cache, positions=positions)[:, 0]  # [B, D_1]
        logits = model.logits(h, 1)  # [B, V]
        picks = torch.argmax(logits, dim=-1).tolist()
        for i, r in enumerate(rows):
            if not r.params.greedy:
                q = filtered_probs(logits[i].cpu(), r.params)
                qs[i].append(q)
                picks[i] = draw(q, r.generator)
            drafts[i].append(picks[i])
            cursors[i].num_cached += 1
            cursors[i].next_input = picks[i]
    return drafts, [torch.stack(q) if q else None for q in qs]


@torch.no_grad()
def draft_greedy(model, rows, pool, gamma: int, graphs=None) -> torch.Tensor:
    """Greedy drafts [B, gamma] (int64, on the model's device) of ``rows``, queued with no host read between the
    steps: each scale-1 step takes the previous step's pick on the device (``step.launch_step`` with
    ``after``), and the host waits for step j - 1 only once step j is queued (the graphs' staging buffers are
    double-buffered), so the GPU runs the gamma steps back to back. Writes the same chain-1 K/V as ``draft``."""
    from colm.decode_worker.step import launch_step

    cursors = [_Cursor(r.blocks, r.num_cached, r.next_input) for r in rows]
    scales = [1] * len(rows)
    picks, launched, previous = [], None, None
    for j in range(gamma):
        # step j > 0 runs each row one position past its cursor, so the cursors trail the steps by one. All steps
        # share one graph key (the rows and their blocks do not change within a round), so a capture, which stages
        # the cursors as they are, can only happen at step 0, where they are exact.
        launched = launch_step(model, cursors, pool, scales, graphs, after=launched)
        picks.append(launched.head.greedy.clone())  # [B, 1]: a graph's output is overwritten by its next replay
        if previous is not None:
            previous.wait()
        previous = launched
        if j:
            for c in cursors:
                c.num_cached += 1
    return torch.cat(picks, dim=1)


@torch.no_grad()
def verify(model, rows, pool, drafts: list[list[int]], scale: int, graphs=None,
           attention: str = DecodeConfig.verify_attention) -> torch.Tensor:
    """Scale-``scale`` logits [B, g + 1, V] over [x, d_1..d_g] of every row (all rows have g drafts).
    ``graphs``: a ``decode_worker.verify_graphs.VerifyGraphs`` to replay the forward from (CUDA), or None;
    ``attention``: ``DecodeConfig.verify_attention`` of the eager forward."""
    tokens = torch.tensor([[r.next_input, *d] for r, d in zip(rows, drafts)], device=model.inv_freq.device)
    return verify_tokens(model, rows, pool, tokens, scale, graphs, attention)


@torch.no_grad()
def verify_tokens(model, rows, pool, tokens: torch.Tensor, scale: int, graphs=None,
                  attention: str = DecodeConfig.verify_attention) -> torch.Tensor:
    """``verify`` of ``tokens`` [B, g + 1] (each row's x, then its drafts), a tensor on the model's device."""
    if graphs is not None:
        out = graphs.logits(rows, tokens, scale)
        if out is not None:
            return out
    kind = PagedVerifyCache if attention == "paged" else PagedExtendCache
    cache = kind.build(pool, rows, tokens.shape[1], tokens.device)
    hidden = model.hidden(tokens, scale=scale, cache=cache, positions=cache.positions)  # [B, g + 1, D_k]
    return model.logits(hidden, scale)


def speculative_round(model, rows, pool, scale: int, gamma: int, graphs=None, verify_graphs=None,
                      verify_attention: str = DecodeConfig.verify_attention) -> list[list[SpecToken]]:
    """One round for ``rows`` (all at ``scale`` with ``gamma`` drafts); the tokens each row emits, in order.
    ``graphs`` / ``verify_graphs``: CUDA graphs of the draft steps (``DecodeGraphs``) and of the verify;
    ``verify_attention``: the eager verify's (``DecodeConfig.verify_attention``)."""
    if all(r.params.greedy for r in rows):  # drafts and verify queued together, read once
        first = torch.tensor([[r.next_input] for r in rows], device=model.inv_freq.device)  # [B, 1], before any step
        tokens = torch.cat([first, draft_greedy(model, rows, pool, gamma, graphs)], dim=1)  # [B, g + 1]
        logits = verify_tokens(model, rows, pool, tokens, scale, verify_graphs, verify_attention).float()
        drafts, qs = tokens[:, 1:].tolist(), [None] * len(rows)
    else:
        drafts, qs = draft(model, rows, pool, gamma, graphs)
        logits = verify(model, rows, pool, drafts, scale, verify_graphs, verify_attention).float()  # [B, g + 1, V]
    logp = torch.log_softmax(logits, dim=-1)
    best = torch.argmax(logits, dim=-1)  # [B, g + 1]: the target's tokens and their log-probs, read once per round
    target, target_lp = best.tolist(), logp.gather(-1, best[..., None])[..., 0].tolist()
    out: list[list[SpecToken]] = []
    for i, r in enumerate(rows):
        params: SamplingParams = r.params
        if params.greedy:  # the accepted drafts are the target's own tokens: their log-probs are read already
            n = accept_greedy(drafts[i], target[i])
            toks, lps = target[i][: n + 1], target_lp[i][: n + 1]
        else:
            p = torch.stack([filtered_probs(logits[i, j].cpu(), params) for j in range(gamma + 1)])
            n, nxt = accept_sampled(drafts[i], qs[i], p, r.generator)
            toks = drafts[i][:n] + [nxt]
            lps = logp[i, torch.arange(n + 1, device=logp.device), torch.tensor(toks, device=logp.device)].tolist()
        out.append([SpecToken(t, lp, j < n) for j, (t, lp) in enumerate(zip(toks, lps))])
    return out
