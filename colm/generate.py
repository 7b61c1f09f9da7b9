"""Single-process reference generation: the oracle every serving path is tested against.

One sequence, one contiguous KV cache: prefill the prompt at the first step's scale, then one token
at a time. ``scale_schedule`` maps a generated-token index to the scale used to produce it, so a
scale switch mid-generation (CoLM-Air) is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from colm.kv_cache import ContiguousKVCache
from colm.logits_adjust import make_adjuster
from colm.model import CoLM
from colm.sampling import SamplingParams, sample_next
from colm.stopping import StopChecker


@dataclass
class GenerationResult:
    token_ids: list[int]
    finish_reason: str  # "length" | "stop"
    scales: list[int]


@torch.no_grad()
def generate(model: CoLM, prompt_ids: Sequence[int], params: SamplingParams, scale: int | None = None,
             scale_schedule: Callable[[int], int] | None = None, eos_id: int | None = None,
             decode: Callable[[list[int]], str] | None = None, tokenizer=None) -> GenerationResult:
    """Generate up to ``params.max_new_tokens`` tokens after ``prompt_ids``.

    Token i (0-based) is produced at ``scale_schedule(i)`` if given, else ``scale``. Stops at EOS
    (unless ``params.ignore_eos``), a stop token, or a stop string (needs ``decode``). Penalties, logit bias,
    ``min_tokens`` and structured output (which needs ``tokenizer``) act as ``colm.logits_adjust`` says.
    """
    cfg = model.cfg
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: need at least one prompt token")
    total = len(prompt_ids) + params.max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) exceeds max_seq_len={cfg.max_seq_len}")
    schedule = scale_schedule or (lambda i: cfg.check_scale(scale))
    device = model.inv_freq.device
    dtype = next(model.parameters()).dtype
    cache = ContiguousKVCache(cfg, 1, total, device=device, dtype=dtype)
    gen = params.make_generator()
    adjust = make_adjuster(params, cfg.vocab_size, prompt_ids, eos_id, tokenizer=tokenizer)
    stopper = StopChecker(params, eos_id, decode if params.stop_strings else None)
    out: list[int] = []
    scales: list[int] = []
    step_input = torch.tensor([list(prompt_ids)], device=device)
    for i in range(params.max_new_tokens):
        s = cfg.check_scale(schedule(i))
        logits = model(step_input, scale=s, cache=cache)[0, -1]  # [V]
        # adjusted and sampled where the logits are, as the decode engine adjusts and samples its rows
        tok = sample_next(adjust(logits, out) if adjust is not None else logits, params, gen)
        out.append(tok)
        scales.append(s)
        reason = stopper.add(tok)
        if reason:
            return GenerationResult(out, reason, scales)
        step_input = torch.tensor([[tok]], device=device)
    return GenerationResult(out, "length", scales)
