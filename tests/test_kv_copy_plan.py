"""``DecodeEngine.write_kv``'s per-request copy plans: made once per token range (not per layer), kept on
the request, pool contents byte-identical to a per-token reference for consecutive and scattered blocks,
and never reused by a later request that gets the same (freed) blocks in another order."""

from __future__ import annotations

import random

import pytest
import torch

from colm.decode_worker import kv_intake as engine_mod
from colm.decode_worker.block_pool import MAX_SLICE_RUNS
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import TransferError
from colm.kv_wire import KVLayout
from conftest import make_model

BS = 4


@pytest.fixture
def engine():
    return DecodeEngine(make_model("tiny-air"), DecodeConfig(num_blocks=64, block_size=BS))


def _order_free_list(pool, order: list[int]) -> None:
    """Make the next ``allocate`` pop the free blocks in ``order`` (all free blocks, each once)."""
    assert sorted(order) == sorted(pool._free)
    held = pool.allocate(pool.num_free)
    pool.free(sorted(held, key=order.index))  # free pushes in reverse, so allocate pops in this order


def _counting(pool):
    """Count ``pool.copy_plan`` calls (the uncached work) on this pool."""
    calls = []
    plan = pool.copy_plan

    def counted(blocks, start, end):
        calls.append((start, end))
        return plan(blocks, start, end)

    pool.copy_plan = counted
    return calls


def _chunks(L, T, bounds, layer_outer=False):
    """(layer_start, layer_end, token_start, token_end) per chunk: every layer of every token range once."""
    ranges = list(zip(bounds[:-1], bounds[1:]))
    assert ranges[0][0] == 0 and ranges[-1][1] == T
    if layer_outer:  # the gRPC bytes path cuts each layer's put into token pieces
        return [(l, l + 1, a, b) for l in range(L) for a, b in ranges]
    return [(l, l + 1, a, b) for a, b in ranges for l in range(L)]  # the prefill: chunk by chunk, layer by layer


def _stream(de, rid, prompt_len, chunks, seed):
    """Reserve ``rid`` and write random K/V in ``chunks``; returns the request and its K/V [L, T, 2, Hkv, hd]."""
    cfg = de.cfg
    T = prompt_len - 1
    de.reserve(rid, prompt_len, 1)
    de.begin_kv(rid, KVLayout(cfg.n_layers, T, cfg.n_kv_heads, cfg.head_dim, "float32"))
    full = torch.randn(cfg.n_layers, T, 2, cfg.n_kv_heads, cfg.head_dim, generator=torch.Generator().manual_seed(seed))
    for seq, (l0, l1, t0, t1) in enumerate(chunks):
        de.write_kv(rid, l0, l1, t0, t1, full[l0:l1, t0:t1].clone(), seq=seq)
    return de._requests[rid], full


def _assert_pool_holds(de, blocks, full):
    """Byte-identical to the per-token reference: token p of layer l at slot ``pool.slot(blocks, p)``."""
    pool = de.pool
    L, T = full.shape[:2]
    slots = torch.tensor([pool.slot(blocks, p) for p in range(T)])
    k = pool.k.view(L, -1, *pool.k.shape[3:])[:, slots]  # [L, T, Hkv, hd]
    v = pool.v.view(L, -1, *pool.v.shape[3:])[:, slots]
    assert torch.equal(k.view(torch.int32), full[:, :, 0].contiguous().view(torch.int32))
    assert torch.equal(v.view(torch.int32), full[:, :, 1].contiguous().view(torch.int32))


@pytest.mark.parametrize("layer_outer", [False, True])
def test_kv_copy_plan_consecutive_blocks_once_per_range(engine, layer_outer):
    de = engine
    calls = _counting(de.pool)
    req, full = _stream(de, "c", 31, _chunks(de.cfg.n_layers, 30, [0, 7, 16, 30], layer_outer), seed=1)
    assert req.blocks == sorted(req.blocks) and len(de.pool.runs(req.blocks, 0, 30)) == 1
    assert sorted(calls) == [(0, 7), (7, 16), (16, 30)]  # one plan per token range, not one per layer
    assert all(p.slots is None and len(p.runs) == 1 for p in req.copy_plans.values())  # slice copies
    _assert_pool_holds(de, req.blocks, full)
    de.finish_kv("c", 30)
    de.abort("c")
    assert not req.copy_plans and de.pool.num_free == de.pool.num_blocks  # freed with the request


def test_kv_copy_plan_scattered_blocks_match_reference(engine):
    de = engine
    order = list(range(de.pool.num_blocks))
    random.Random(0).shuffle(order)
    _order_free_list(de.pool, order)
    calls = _counting(de.pool)
    chunks = _chunks(de.cfg.n_layers, 57, [0, 5, 41, 57])
    req, full = _stream(de, "s", 58, chunks, seed=2)
    assert req.blocks == order[: len(req.blocks)]
    assert len(de.pool.runs(req.blocks, 5, 41)) > MAX_SLICE_RUNS
    plan = req.copy_plans[(5, 41)]
    assert plan.slots is not None and plan.slots.tolist() == de.pool.slots(req.blocks, 5, 41).tolist()
    assert sorted(calls) == [(0, 5), (5, 41), (41, 57)]
    _assert_pool_holds(de, req.blocks, full)
    # the uncached path (a fresh plan for every chunk) writes the same bytes
    ref = DecodeEngine(de.model, DecodeConfig(num_blocks=64, block_size=BS))
    _order_free_list(ref.pool, order)
    ref._copy_plan = lambda r, a, b: ref.pool.copy_plan(r.blocks, a, b)
    _stream(ref, "s", 58, chunks, seed=2)
    assert torch.equal(ref.pool.k.view(torch.int32), de.pool.k.view(torch.int32))
    assert torch.equal(ref.pool.v.view(torch.int32), de.pool.v.view(torch.int32))


def test_kv_copy_plan_not_reused_by_next_request_on_same_blocks(engine):
    de = engine
    order = list(range(de.pool.num_blocks))
    random.Random(1).shuffle(order)
    _order_free_list(de.pool, order)
    chunks = _chunks(de.cfg.n_layers, 40, [0, 3, 40])
    a, _ = _stream(de, "a", 41, chunks, seed=3)
    a_blocks, a_plan = list(a.blocks), a.copy_plans[(3, 40)]
    assert a_plan.slots is not None
    de.finish_kv("a", 40)
    de.abort("a")  # frees a's blocks and drops its plans
    assert not a.copy_plans
    # the next request gets exactly a's blocks, in another order, and sends the same token ranges
    _order_free_list(de.pool, a_blocks[::-1] + [x for x in order if x not in a_blocks])
    b, full = _stream(de, "a", 41, chunks, seed=4)  # same request id too
    assert b is not a and b.blocks == a_blocks[::-1]
    b_plan = b.copy_plans[(3, 40)]
    assert b_plan is not a_plan and b_plan.slots.tolist() == de.pool.slots(b.blocks, 3, 40).tolist()
    assert b_plan.slots.tolist() != a_plan.slots.tolist()
    _assert_pool_holds(de, b.blocks, full)


def test_kv_copy_plans_bounded_and_validation_unchanged(engine, monkeypatch):
    de = engine
    monkeypatch.setattr(engine_mod, "MAX_COPY_PLANS", 4)
    T = 12
    req, full = _stream(de, "t", T + 1, _chunks(de.cfg.n_layers, T, list(range(T + 1)), layer_outer=True), seed=5)
    assert 0 < len(req.copy_plans) <= 4
    _assert_pool_holds(de, req.blocks, full)
    de.finish_kv("t", T)
    # a chunk overlapping received K/V still fails the request (and frees its blocks) as before
    de.abort("t")
    _stream(de, "o", 9, [(0, 1, 0, 4)], seed=6)
    with pytest.raises(TransferError, match="overlaps"):
        de.write_kv("o", 0, 1, 2, 6, torch.zeros(1, 4, 2, de.cfg.n_kv_heads, de.cfg.head_dim), seq=1)
    assert "o" not in de._requests and de.pool.num_free == de.pool.num_blocks
