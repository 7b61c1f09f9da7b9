"""Prompt scoring: per-token log-probabilities and the most likely token at each position.

Used by the decode worker's ``Score`` call and the router's in-process backends for OpenAI-style
``echo`` + ``logprobs`` (lm-eval's ``local-completions`` reads both the token's log-probability and
whether it was the greedy choice).
"""

from __future__ import annotations

import torch

from colm.model import CoLM


@torch.no_grad()
def prompt_logprobs(model: CoLM, token_ids: list[int], scale: int | None = None,
                    graphs=None) -> list[tuple[float, int, float]]:
    """Per token t: (log p(token_t | tokens_<t), most likely token id, its log p) at ``scale``.

    The first token has nothing predicting it: (0.0, -1, 0.0). ``graphs``: a ``colm.graphed_forward.GraphedForward``
    of ``model`` to run the forward from (it falls back to eager where no graph applies)."""
    cfg = model.cfg
    scale = cfg.check_scale(scale)
    if not token_ids or len(token_ids) > cfg.max_seq_len:
        raise ValueError(f"score: need 1..{cfg.max_seq_len} tokens, got {len(token_ids)}")
    if min(token_ids) < 0 or max(token_ids) >= cfg.vocab_size:
        raise ValueError(f"score: token ids must be in 0..{cfg.vocab_size - 1}")
    ids = torch.tensor([list(token_ids)], device=model.inv_freq.device)
    hidden = model.hidden(ids, scale) if graphs is None else graphs.hidden(ids, scale)  # [1, t, D_k]
    logp = torch.log_softmax(model.logits(hidden, scale)[0, :-1].float(), dim=-1)  # [t-1, V]
    picked = logp.gather(1, ids[0, 1:, None])[:, 0]
    top_lp, top_id = logp.max(dim=-1)
    rows = zip(picked.cpu().tolist(), top_id.cpu().tolist(), top_lp.cpu().tolist())
    return [(0.0, -1, 0.0)] + [(a, int(b), c) for a, b, c in rows]
