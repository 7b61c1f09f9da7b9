"""Perplexity of every scale on a held-out token file: the paper's elastic-inference table in miniature.

One backbone forward per batch serves all scales: by chain causality the first k chains of the full
model's final hidden state are the scale-k sub-model's, so the scale-k logits are the head's first
k chains' columns applied to them (``CoLM.logits``). Windows of ``seq_len + 1`` tokens are read in
file order and every target token is scored once.
"""

from __future__ import annotations

import math

import torch

from colm.train.data import PackedLoader, TokenFile


@torch.no_grad()
def perplexity_per_scale(model, token_file: str, seq_len: int = 256, batch_size: int = 8,
                         max_batches: int | None = None, device: str | torch.device = "cpu") -> dict:
    """{"scales": [{"scale", "params", "loss", "ppl"}...], "tokens": n} for ``model`` on ``token_file``."""
    cfg = model.cfg
    seq_len = min(seq_len, cfg.max_seq_len)
    loader = PackedLoader(TokenFile(token_file), seq_len, batch_size)
    n = cfg.num_chains
    sums = torch.zeros(n, dtype=torch.float64)
    count = 0
    model.eval()
    for x, y in loader.sequential_batches(max_batches, device=device):
        hidden = model.hidden(x)  # [b, t, D]
        for k in range(1, n + 1):
            logits = model.logits(hidden, k).float()  # [b, t, V]
            sums[k - 1] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").double().cpu()
        count += y.numel()
    if count == 0:
        raise ValueError(f"{token_file}: too few tokens for one batch of {batch_size} x {seq_len + 1}")
    rows = []
    for k in range(1, n + 1):
        loss = float(sums[k - 1] / count)
        rows.append({"scale": k, "chains": list(cfg.chains[:k]), "params": cfg.num_params(k), "loss": loss,
                     "ppl": math.exp(loss)})
    return {"scales": rows, "tokens": count, "seq_len": seq_len}


def format_table(result: dict) -> str:
    lines = [f"{'scale':>5} {'chains':>14} {'params':>12} {'loss':>8} {'ppl':>10}"]
    for r in result["scales"]:
        lines.append(f"{r['scale']:>5} {str(r['chains']):>14} {r['params']:>12,} {r['loss']:>8.4f} {r['ppl']:>10.3f}")
    lines.append(f"({result['tokens']} tokens, windows of {result['seq_len']})")
    return "\n".join(lines)
