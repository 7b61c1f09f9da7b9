"""One chunk of the colocated engine's chain-1 prefill: packed prompt segments into the paged pool.

The segments of one step (``prefill_schedule.Segment``: positions [start, end) of a request's
prompt) run as ONE packed sequence of N tokens through chain 1 of the decode engine's own full
model (``prefill_worker.forward.chain1_layers``: with CoLM-Air's shared KV these are the full
model's K/V). At each layer the N tokens' K and V go straight into their slots of the pool (one
write), then each segment attends causally on its own: a segment that starts a prompt over its own
keys, a later chunk of a long prompt over the keys of its prompt so far, read back from the pool.
The GEMMs see all N tokens at once; only attention is per segment. Nothing is padded.
"""

from __future__ import annotations

import numpy as np
import torch

from colm.kernels.paged_attention import write_kv_to_pool
from colm.prefill_worker.forward import chain1_embed, chain1_layers, chunk_attention, scale_layers

from colm.decode_worker.prefill_schedule import Segment


@torch.no_grad()
def run_prefill_chunk(model, pool, segments: list[Segment], scale: int = 1) -> None:
    """``scale`` 1: chain 1 (CoLM-Air's shared K/V; the last layer's attention and FFN are skipped). A wider scale
    runs that sub-model over the prompt (the same K/V, at what a dense model's prefill costs: the baseline)."""
    device = model.inv_freq.device
    # every index the chunk needs, uploaded in ONE copy from pinned memory (a copy from pageable memory waits for
    # the stream: the decode step queued ahead would stall the host here): [tokens | positions | slots | contexts]
    tokens = np.concatenate([s.request.prompt_tokens[s.start : s.end] for s in segments])  # [N]
    n = len(tokens)
    positions = np.concatenate([np.arange(s.start, s.end) for s in segments])  # [N]
    prompt_slots = [pool.slots(s.request.blocks, 0, s.end).numpy() for s in segments]  # each [end]: 0..end-1
    slots = np.concatenate([a[s.start :] for s, a in zip(segments, prompt_slots)])  # [N]: this chunk's
    ctxs = [a if s.start else None for s, a in zip(segments, prompt_slots)]  # a later chunk attends to all of it
    host = torch.from_numpy(np.concatenate([tokens, positions, slots] + [c for c in ctxs if c is not None]))
    if device.type == "cuda":
        dev = host.pin_memory().to(device, non_blocking=True)
    else:
        dev = host
    tok, pos, slots = dev[:n][None], dev[n : 2 * n][None], dev[2 * n : 3 * n]  # [1, N], [1, N], [N]
    # each segment: (offset in the packed chunk, its length, its first position, slots of its prompt so far or None)
    parts, off, at = [], 0, 3 * n
    for s, c in zip(segments, ctxs):
        ctx = None
        if c is not None:
            ctx, at = dev[at : at + len(c)], at + len(c)
        parts.append((off, s.num_tokens, s.start, ctx))
        off += s.num_tokens

    def attend(li, q, k, v):
        # q [1, Hq, N, hd]; k, v [1, Hkv, N, hd] (RoPE applied)
        kp, vp = pool.k[li], pool.v[li]
        write_kv_to_pool(k[0].transpose(0, 1), v[0].transpose(0, 1), kp, vp, slots)
        hkv, hd = k.shape[1], k.shape[3]
        group = q.shape[1] // hkv
        outs = []
        for a, length, start, ctx in parts:
            qs = q[:, :, a : a + length]
            if ctx is None:  # a prompt's first chunk: its own keys
                outs.append(chunk_attention(qs, k[:, :, a : a + length], v[:, :, a : a + length], 0, group))
            else:  # a later chunk: the prompt's keys so far, from the pool (this chunk's were just written)
                keys = kp.reshape(-1, hkv, hd)[ctx].transpose(0, 1)[None].to(q.dtype)  # [1, Hkv, start + length, hd]
                vals = vp.reshape(-1, hkv, hd)[ctx].transpose(0, 1)[None].to(q.dtype)
                outs.append(chunk_attention(qs, keys, vals, start, group))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    if scale == 1:
        x, cos, sin = chain1_embed(model, tok, pos)
        chain1_layers(model, x, cos, sin, lambda li, q, k, v, last: (attend(li, q, k, v), None)[last])
        return
    scale_layers(model, tok, pos, scale, attend)
