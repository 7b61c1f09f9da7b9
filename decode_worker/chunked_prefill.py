"""One chunk of the colocated engine's chain-1 prefill: packed prompt segments into the paged pool.

The segments of one iteration (``prefill_schedule.Segment``: positions [start, end) of a request's prompt) run as
ONE packed sequence of N tokens through chain 1 of the decode engine's own full model
(``prefill_worker.forward.chain1_layers``: with CoLM-Air's shared KV these are the full model's K/V). At each
layer the N tokens' K and V go into their slots of the pool (one write; slot -1, padding, is skipped), then ONE
attention launch (``kernels.prefill_attention``) lets every segment attend causally over its prompt so far, read
back from the pool: a prompt's first chunk over its own keys, a later chunk over the earlier ones too.

Every index the chunk needs is laid out by ``pack`` in one int64 array (``ChunkLayout``: tokens, positions,
slots, segments, tiles, pages) and uploaded in one copy; ``forward`` runs the chunk from its device views
(``ChunkInputs``). Eager, the layout fits the chunk exactly (``ChunkLayout.exact``); a CUDA graph
(``prefill_graphs``) has a fixed layout, padded, whose static inputs each replay refills: one graph per token
count serves any mix of segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from colm.kernels.paged_attention import write_kv_to_pool
from colm.kernels.prefill_attention import BLOCK_M, max_tiles, paged_prefill_attention, plan_tiles
from colm.prefill_worker.forward import chain1_embed, chain1_layers, scale_layers

from colm.decode_worker.block_pool import blocks_for
from colm.decode_worker.prefill_schedule import Segment


@dataclass(frozen=True)
class ChunkLayout:
    """Sizes of a chunk's index array: ``tokens`` rows (packed, padded), ``segments``, attention ``tiles`` and
    ``pages`` (every segment's block list, one after the other)."""
    tokens: int
    segments: int
    tiles: int
    pages: int

    @property
    def size(self) -> int:
        return 3 * self.tokens + 4 * self.segments + 2 * self.tiles + self.pages

    @classmethod
    def exact(cls, segments: list[Segment], block_size: int) -> "ChunkLayout":
        n = sum(s.num_tokens for s in segments)
        return cls(n, len(segments), max_tiles(n, len(segments), BLOCK_M),
                   sum(blocks_for(s.end, block_size) for s in segments))

    def fits(self, segments: list[Segment], block_size: int) -> bool:
        need = ChunkLayout.exact(segments, block_size)
        return need.tokens <= self.tokens and need.segments <= self.segments and need.pages <= self.pages


@dataclass(frozen=True)
class ChunkInputs:
    """A chunk's indices on the device (views of one int64 buffer laid out by a ``ChunkLayout``)."""
    tokens: torch.Tensor     # [N] token ids (padding: 0)
    positions: torch.Tensor  # [N] prompt positions (padding: 0)
    slots: torch.Tensor      # [N] pool slots (padding: -1, not written)
    segments: torch.Tensor   # [S, 4] (first row, rows, first position, first page); unused: rows 0
    tiles: torch.Tensor      # [T, 2] (segment, first row in it); unused: segment -1
    pages: torch.Tensor      # [P] block ids

    @classmethod
    def of(cls, buf: torch.Tensor, layout: ChunkLayout) -> "ChunkInputs":
        return cls(*split(buf, layout))


def split(buf, layout: ChunkLayout) -> tuple:
    """(tokens, positions, slots, segments [S, 4], tiles [T, 2], pages): views of ``buf`` [layout.size], a tensor or
    a numpy array (``pack`` fills the host array through them)."""
    n, s, t = layout.tokens, layout.segments, layout.tiles
    a = 3 * n
    b = a + 4 * s
    return (buf[:n], buf[n : 2 * n], buf[2 * n : a], buf[a:b].reshape(s, 4), buf[b : b + 2 * t].reshape(t, 2),
            buf[b + 2 * t : layout.size])


def pack(pool, segments: list[Segment], layout: ChunkLayout) -> np.ndarray:
    """The chunk's index array [layout.size] (int64) on the host; ``layout`` must fit the segments."""
    out = np.zeros(layout.size, dtype=np.int64)
    tok, pos, slots, seg, tiles, pages = split(out, layout)  # numpy views: filled in place
    slots[:] = -1
    row = page = 0
    for i, s in enumerate(segments):
        n, used = s.num_tokens, blocks_for(s.end, pool.block_size)
        tok[row : row + n] = s.request.prompt_tokens[s.start : s.end]
        pos[row : row + n] = np.arange(s.start, s.end)
        slots[row : row + n] = pool.slots(s.request.blocks, s.start, s.end).numpy()
        seg[i] = (row, n, s.start, page)
        pages[page : page + used] = s.request.blocks[:used]
        row, page = row + n, page + used
    tiles[:] = plan_tiles([s.num_tokens for s in segments], layout.tiles, BLOCK_M)
    return out


def upload(host: np.ndarray, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """``host`` on ``device`` in one copy (from pinned memory on CUDA: a copy from pageable memory waits for the
    stream, so the decode step queued ahead would stall the host here); into ``out`` if given."""
    src = torch.from_numpy(host)
    if device.type == "cuda":
        src = src.pin_memory()
    if out is None:
        return src.to(device, non_blocking=True)
    out.copy_(src, non_blocking=True)
    return out


@torch.no_grad()
def forward(model, pool, inp: ChunkInputs, scale: int = 1) -> None:
    """The chunk's prefill into the pool. ``scale`` 1: chain 1 (CoLM-Air's shared K/V; the last layer's attention and
    FFN are skipped). A wider scale runs that sub-model (the same K/V, at what a dense model's prefill costs: the
    baseline)."""
    tok, pos = inp.tokens[None], inp.positions[None]  # [1, N]

    def attend(li, q, k, v, last=False):
        # q [1, Hq, N, hd]; k, v [1, Hkv, N, hd] (RoPE applied)
        kp, vp = pool.k[li], pool.v[li]
        write_kv_to_pool(k[0].transpose(0, 1), v[0].transpose(0, 1), kp, vp, inp.slots)
        if last:
            return None
        o = paged_prefill_attention(q[0].transpose(0, 1), kp, vp, inp.pages, inp.segments, inp.tiles)  # [N, Hq, hd]
        return o.transpose(0, 1)[None]

    if scale == 1:
        x, cos, sin = chain1_embed(model, tok, pos)
        chain1_layers(model, x, cos, sin, attend)
        return
    scale_layers(model, tok, pos, scale, attend)


def run_prefill_chunk(model, pool, segments: list[Segment], scale: int = 1) -> None:
    """``segments`` packed and run eagerly (their exact layout)."""
    layout = ChunkLayout.exact(segments, pool.block_size)
    device = model.inv_freq.device
    forward(model, pool, ChunkInputs.of(upload(pack(pool, segments, layout), device), layout), scale)
