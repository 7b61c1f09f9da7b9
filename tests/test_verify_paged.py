"""The speculative verify through the paged decode kernel (``PagedVerifyCache``: each of the T queries a decode row
of its own) against the gather + masked-SDPA forward (``PagedExtendCache``): the same logits for a batch of
sequences with different contexts, the same K/V written into the pool (to float32 rounding), at every scale, with random inputs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from colm.decode_worker.block_pool import BlockPool
from colm.decode_worker.paged_cache import PagedExtendCache, PagedVerifyCache
from conftest import make_model


@pytest.mark.parametrize("name", ["tiny-air", "tiny-air-3chain"])
@pytest.mark.parametrize("num_new", [1, 3, 5])
def test_paged_verify_equals_the_gathered_forward(name, num_new):
    torch.manual_seed(num_new)
    model = make_model(name)
    cfg = model.cfg
    pool = BlockPool(cfg, num_blocks=32, block_size=4, device="cpu", dtype=torch.float32)
    for layer in range(cfg.n_layers):
        pool.k[layer].normal_()
        pool.v[layer].normal_()
    starts = [3, 9, 1]  # cached tokens per sequence: blocks end mid-block and on a boundary
    rows = [SimpleNamespace(blocks=pool.allocate(-(-(s + num_new) // 4) + 1), num_cached=s) for s in starts]
    tokens = torch.randint(0, cfg.vocab_size, (len(rows), num_new))
    other = BlockPool(cfg, num_blocks=32, block_size=4, device="cpu", dtype=torch.float32)  # the same contents
    for layer in range(cfg.n_layers):
        other.k[layer].copy_(pool.k[layer])
        other.v[layer].copy_(pool.v[layer])
    for scale in range(1, cfg.num_chains + 1):
        ext = PagedExtendCache.build(pool, rows, num_new, "cpu")
        ver = PagedVerifyCache.build(other, rows, num_new, "cpu")
        assert torch.equal(ext.positions, ver.positions) and torch.equal(ext.slot_mapping, ver.slot_mapping)
        with torch.no_grad():
            want = model.logits(model.hidden(tokens, scale=scale, cache=ext, positions=ext.positions), scale)
            got = model.logits(model.hidden(tokens, scale=scale, cache=ver, positions=ver.positions), scale)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for layer in range(cfg.n_layers):
            # layer 0's K/V are the same computation; later layers' differ by the attention's rounding
            torch.testing.assert_close(other.k[layer], pool.k[layer], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(other.v[layer], pool.v[layer], rtol=1e-4, atol=1e-4)


def test_paged_verify_rows_see_only_their_own_past():
    """Row (b, t)'s context is start_b + t + 1 tokens of b's blocks: a later draft never leaks into an earlier query."""
    model = make_model("tiny-air")
    pool = BlockPool(model.cfg, num_blocks=8, block_size=4, device="cpu", dtype=torch.float32)
    rows = [SimpleNamespace(blocks=pool.allocate(3), num_cached=5)]
    c = PagedVerifyCache.build(pool, rows, 4, "cpu")
    assert c.context_lens.tolist() == [6, 7, 8, 9]
    assert c.block_tables.shape == (4, 3) and all(r == rows[0].blocks for r in c.block_tables.tolist())
    assert c.slot_mapping.tolist() == [pool.slots(rows[0].blocks, 5, 9).tolist()]


def test_verify_attention_is_checked():
    from colm.decode_worker.config import DecodeConfig

    assert DecodeConfig(verify_attention="paged").verify_attention == "paged"
    with pytest.raises(ValueError, match="verify_attention='sdpa': allowed are"):
        DecodeConfig(verify_attention="sdpa")
