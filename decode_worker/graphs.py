"""CUDA graphs of the decode forward: one captured ``model.hidden`` per (batch bucket, table width, scale).

An eager decode step of a 1B model launches hundreds of small kernels from Python and spends far
longer on that than on reading the weights; a replayed graph launches them all at once. Graphs read
their inputs from static buffers, so a step copies its tokens, positions, block tables, context
lengths and slot mapping into the buffers of its bucket (batch size rounded up to a power of two,
table width likewise) and replays. Padding rows write nowhere (slot -1, which the Triton K/V write
skips) and attend to one token of block 0; their outputs are dropped.

A graph of a batch whose rows share one scale also holds the head (``head_outputs``: logits, log-sum-exp,
argmax, the greedy log-probs packed for one host read), so a greedy step is a replay and one read. A batch of
mixed scales (``mixed_scale_mode: widest``) has graphs of its own, keyed by its widest scale: the forward at that
scale, then every scale's head over all rows and each row's picked by its scale (``mixed_head_outputs``; the
per-row scales are one more row of the staged inputs), so it is a replay and one read too, and its steps can be
queued ahead like single-scale ones. A mixed graph that fails to capture turns off mixed graphs only.

Capture is lazy (first step of a new key; ``warm_up`` captures every key up front instead) and preceded
by eager warm-up runs on the same buffers, which compile and tune every Triton kernel
(``colm.kernels._tuning``) and build the chain-linear kernel's host tables outside the capture:
nothing inside a captured step syncs with the host. All
graphs share one memory pool. A capture that fails turns graphs off for the engine (eager from then
on, with a warning), so a graph problem costs speed, never a request.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import NamedTuple

import numpy as np
import torch

from colm.cuda_graphs import bucket as _bucket, buckets as _buckets, warm_and_capture
from colm.kernels.greedy_head import greedy_head

from colm.decode_worker.paged_cache import PagedStepCache

log = logging.getLogger("colm.decode.graphs")


class _Graph:
    def __init__(self, B: int, W: int, device) -> None:
        # The graph's inputs: one upload of dev_ints per step; tokens, positions and slots are views of
        # it and the int32 context lengths are converted inside the graph (no launches outside it).
        # tokens, positions, ctx, slots, (rows carried from a step queued just before) the row of that step
        # whose greedy token each row takes on the device, and each row's scale (mixed-scale graphs)
        self.dev_ints = torch.zeros(6, B, dtype=torch.int64, device=device)
        self.tokens = self.dev_ints[0, :, None]     # [B, 1]
        self.positions = self.dev_ints[1, :, None]  # [B, 1]
        self.slots = self.dev_ints[3]               # [B]
        self.ctx = torch.ones(B, dtype=torch.int32, device=device)           # [B], from dev_ints[2]
        self.tables = torch.zeros(B, W, dtype=torch.int32, device=device)    # [B, W]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # [B, D_scale], valid after a replay
        self.head: StepHead | None = None  # logits and greedy picks, when the graph includes the head
        # Host staging, pinned so the per-step copies are asynchronous. Two of each, used in turn: with
        # overlapped steps, step n+1 is staged while step n's copies may still be queued (step n-1, which
        # used the other buffer, has been read back by then, so its copies are done).
        pin = torch.device(device).type == "cuda"
        self.host_ints_pair = [torch.zeros(6, B, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self.host_ints = self.host_ints_pair[0]  # the latest fill's dev_ints
        self.host_packed = [torch.zeros(2, B, dtype=torch.float64, pin_memory=pin) for _ in range(2)]
        self.turn = 0  # which of the pairs the next fill / read-back uses
        self.host_tables_pair = [torch.zeros(B, W, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.table_rows_pair: list[list] = [[None] * B for _ in range(2)]  # the block list each host row holds
        self.dev_rows: list = [None] * B  # the block list each row of ``tables`` holds (as of the last upload)


def _table_row(req, width: int) -> np.ndarray:
    """``req``'s block table row [width] (int32, zero-padded), built once per block list and kept on the request."""
    cached = getattr(req, "_table_row", None)
    if cached is None or cached[0] is not req.blocks or cached[1].shape[0] != width:
        row = np.zeros(width, dtype=np.int32)
        row[: len(req.blocks)] = req.blocks
        cached = (req.blocks, row)
        req._table_row = cached
    return cached[1]


class StepHead(NamedTuple):
    """The head of a decode step at one scale, as ``head_outputs`` computes it (inside a graph or eagerly)."""

    logits: torch.Tensor  # [B, V]
    lse: torch.Tensor  # [B] float32: log p(t) = logit(t) - lse
    greedy: torch.Tensor  # [B, 1] argmax token ids
    packed: torch.Tensor  # [2, B] float64: greedy ids (exact in float64) and their log-probs, for one host read


def head_outputs(model, hidden: torch.Tensor, scale: int) -> StepHead:
    """Scale-``scale`` logits of ``hidden [B, D>=scale]`` and everything a greedy step reads back."""
    logits = model.logits(hidden, scale)  # [B, V]
    return StepHead(logits, *greedy_head(logits))  # two launches on CUDA (colm.kernels.greedy_head)


def mixed_head_outputs(model, hidden: torch.Tensor, row_scales: torch.Tensor, scales) -> StepHead:
    """Each row's head at its own scale: ``hidden [B, D_widest]`` of a forward at the batch's widest scale (by
    chain causality its first chains are each smaller scale's hidden state), ``row_scales [B]`` (int64, on the
    device) each row's scale, ``scales`` the scales whose heads to compute (over all rows; a row takes its own)."""
    scales = sorted(scales)
    out = head_outputs(model, hidden, scales[-1])
    for s in scales[:-1]:
        h = head_outputs(model, hidden, s)
        m = row_scales == s  # [B]
        out = StepHead(torch.where(m[:, None], h.logits, out.logits), torch.where(m, h.lse, out.lse),
                       torch.where(m[:, None], h.greedy, out.greedy), torch.where(m[None, :], h.packed, out.packed))
    return out


class DecodeGraphs:
    """Captured decode forwards of ``model`` against ``pool`` for batches of up to ``max_batch`` sequences."""

    def __init__(self, model, pool, max_batch: int, warmup: int = 2) -> None:
        self.model, self.pool = model, pool
        self.device = model.inv_freq.device
        self.max_batch = _bucket(max_batch)
        self.warmup = warmup
        self.enabled = self.device.type == "cuda"
        self._graphs: dict[tuple, _Graph] = {}
        self.mixed_enabled = self.enabled  # off after a mixed-scale graph failed to capture (eager heads then)
        self._pool_handle = torch.cuda.graph_pool_handle() if self.enabled else None
        self._lock = threading.Lock()
        self.num_captures = 0

    def _fill(self, g: _Graph, batch, carry=None, feed: torch.Tensor | None = None, row_scales=None) -> None:
        """Stage ``batch``'s inputs. ``carry``/``feed``: see ``step.launch_step`` (the first len(carry) rows
        one position further, their tokens copied on the device from rows ``carry`` of ``feed`` [B', 1]);
        ``row_scales``: each row's scale (mixed-scale graphs)."""
        g.host_ints = g.host_ints_pair[g.turn]
        ints = g.host_ints.numpy()  # a view of the pinned buffer
        # padding rows: token 0 at slot -1, one context token, scale 1
        ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = 0, 0, 1, -1, 0, 1
        if row_scales is not None:
            ints[5, : len(row_scales)] = row_scales
        n, c, bs = len(batch), len(carry) if carry is not None else 0, self.pool.block_size
        self._fill_tables(g, batch)
        if n:  # whole rows at once: a numpy store per field, not per row and field
            pos = np.fromiter((r.num_cached for r in batch), np.int64, n)
            pos[:c] += 1
            ints[0, :n] = [r.next_input for r in batch]
            ints[1, :n] = pos
            ints[2, :n] = pos + 1
            pages = np.fromiter((r.blocks[p // bs] for r, p in zip(batch, pos.tolist())), np.int64, n)
            ints[3, :n] = pages * bs + pos % bs
        if c:
            ints[4, :c] = carry
        g.dev_ints.copy_(g.host_ints, non_blocking=True)  # one upload: the graph reads its views
        if feed is not None and c:  # the previous step's greedy tokens, still on the device (queued before it)
            if list(carry) == list(range(c)):
                g.dev_ints[0, :c].copy_(feed[:c, 0])
            else:  # rows of that step ended meanwhile: gather the carried ones' tokens
                g.dev_ints[0, :c].copy_(feed[:, 0].index_select(0, g.dev_ints[4, :c]))

    def _fill_tables(self, g: _Graph, batch) -> None:
        """Stage ``batch``'s block tables in this turn's host buffer and upload it if the device's rows differ. A
        row is rebuilt only where the request it holds changed (a request's block list is fixed at reservation),
        from the request's padded row (``_table_row``), all changed rows in one numpy store: rows shift whenever a
        request ends or joins, so most of them change under load."""
        rows, host = g.table_rows_pair[g.turn], g.host_tables_pair[g.turn]
        tables = host.numpy()
        changed = [i for i, r in enumerate(batch) if rows[i] is not r.blocks]
        if changed:
            tables[changed] = np.stack([_table_row(batch[i], tables.shape[1]) for i in changed])
            for i in changed:
                rows[i] = batch[i].blocks
        stale = [i for i in range(len(batch), len(rows)) if rows[i] is not None]
        if stale:
            tables[stale] = 0
            for i in stale:
                rows[i] = None
        if any(a is not b for a, b in zip(rows, g.dev_rows)):
            g.tables.copy_(host, non_blocking=True)
            g.dev_rows = list(rows)

    def _forward(self, g: _Graph, scale: int, head: bool | str = False) -> torch.Tensor:
        """The captured step: the forward at ``scale``; ``head`` True: its head; "mixed": every row's head at its
        own scale (``scale`` is the widest; the rows' scales are ``dev_ints[5]``)."""
        g.ctx.copy_(g.dev_ints[2])  # int64 -> int32, inside the graph
        cache = PagedStepCache(self.pool, g.tables, g.ctx, g.slots, length=0)
        out = self.model.hidden(g.tokens, scale=scale, cache=cache, positions=g.positions)[:, 0]  # [B, D_scale]
        if head == "mixed":
            g.head = mixed_head_outputs(self.model, out, g.dev_ints[5], range(1, scale + 1))
        elif head:
            g.head = head_outputs(self.model, out, scale)
        return out

    @torch.no_grad()
    def hidden(self, batch, scale: int) -> torch.Tensor | None:
        """Final hidden states [len(batch), D_scale] of one decode step, or None when graphs do not apply."""
        g = self._replay(batch, scale, head=False)
        return None if g is None else g.out[: len(batch)]

    @torch.no_grad()
    def step_head(self, batch, scale: int, carry=None, feed: torch.Tensor | None = None,
                  read_async: bool = False, row_scales=None):
        """One decode step with the head inside the graph (every row at ``scale``; or, with ``row_scales``, each
        row at its own, ``scale`` their widest): its ``StepHead`` sliced to ``len(batch)`` rows, or None when
        graphs do not apply. A greedy step then costs one replay and one device->host read of ``packed``; the
        logits stay for rows that sample.

        ``read_async``: also queue that read into a pinned buffer and return (head, (buffer, event)): the
        graph's outputs are overwritten by its next replay, which overlapped steps queue before reading
        this one. ``carry``/``feed``: see ``step.launch_step``."""
        mixed = row_scales is not None and len(set(row_scales)) > 1  # off mixed graphs: _graph gives None
        g = self._replay(batch, scale, head="mixed" if mixed else True, carry=carry, feed=feed,
                         row_scales=row_scales if mixed else None)
        if g is None:
            return None
        n, h = len(batch), g.head
        head = StepHead(h.logits[:n], h.lse[:n], h.greedy[:n], h.packed[:, :n])
        if not read_async:
            return head
        host = g.host_packed[g.turn]
        host.copy_(h.packed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        g.turn ^= 1
        return head, (host, event)

    def _replay(self, batch, scale: int, head: bool | str, carry=None, feed: torch.Tensor | None = None,
                row_scales=None) -> _Graph | None:
        if not self.enabled or len(batch) > self.max_batch:
            return None
        B = _bucket(len(batch))
        W = _bucket(max(len(r.blocks) for r in batch), 16)
        with self._lock:
            g = self._graph(B, W, scale, head, batch)
            if g is None:
                return None
            self._fill(g, batch, carry, feed, row_scales)
            g.graph.replay()
            return g

    def _graph(self, B: int, W: int, scale: int, head: bool | str, batch) -> _Graph | None:
        """The graph of key (B, W, scale, head), captured now if new (staged with ``batch``: real rows, or
        none: every row padding, which writes no K/V); None when capturing failed (graphs are off then; after a
        mixed-scale graph's failure, mixed graphs only)."""
        key = (B, W, scale, head)
        g = self._graphs.get(key)
        if g is None:
            if head == "mixed" and not self.mixed_enabled:
                return None
            g = _Graph(B, W, self.device)
            self._fill(g, batch)
            try:
                self._capture(g, scale, head)
            except Exception as e:  # noqa: BLE001 - fall back to eager for good
                torch.cuda.synchronize(self.device)
                if head == "mixed":
                    log.warning("CUDA graph capture failed for a mixed-scale batch %d, width %d, widest scale %d "
                                "(%s): mixed-scale heads run eager", B, W, scale, e)
                    self.mixed_enabled = False
                    return None
                log.warning("CUDA graph capture failed for batch %d, width %d, scale %d (%s): decode runs eager",
                            B, W, scale, e)
                self.enabled = False
                return None
            self._graphs[key] = g
        return g

    def warm_up(self, max_blocks_per_seq: int, scales, heads=(True, False)) -> int:
        """Capture every graph a batch of up to ``max_batch`` sequences of up to ``max_blocks_per_seq``
        blocks can meet (batch and width buckets x ``scales`` x ``heads``: True, False and "mixed", whose scale is
        the widest of a mixed batch), before serving: captures and
        the kernel tuning inside them then never stall a running request (first TTFTs, first batch sizes).
        Returns the number of graphs captured now."""
        if not self.enabled:
            return 0
        before = self.num_captures
        keys = itertools.product(heads, scales, _buckets(max_blocks_per_seq, 16), _buckets(self.max_batch))
        with torch.no_grad(), self._lock:
            for head, scale, W, B in keys:
                if head == "mixed" and (scale == 1 or B == 1 or not self.mixed_enabled):
                    continue  # a mixed batch has two rows or more, and its widest scale is 2 or more
                if self._graph(B, W, scale, head, []) is None and not self.enabled:  # graphs are off
                    break
        return self.num_captures - before

    def _capture(self, g: _Graph, scale: int, head: bool | str) -> None:
        # Re-running the step in the warm-up is harmless: it writes the same K/V into the same slots. Thread-local
        # capture: gRPC threads may copy K/V into the pool meanwhile; that must not break it.
        g.graph, g.out = warm_and_capture(lambda: self._forward(g, scale, head), self.device, self._pool_handle,
                                          self.warmup)
        self.num_captures += 1
