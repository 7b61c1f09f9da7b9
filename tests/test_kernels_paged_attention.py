"""Paged decode attention and the KV-pool write kernel against float64 references.

CPU: the Triton kernels run in Triton's interpreter inside a child pytest (Triton fixes interpreter
vs compiler at import), small shapes. CUDA: compiled kernels, 1B-like shapes; skipped without a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases

triton = pytest.importorskip("triton")

pa = importlib.import_module("colm.kernels.paged_attention")


def test_interpreter_suite():
    run_interpreter_cases(__file__)


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _paged_case(batch, hq, hkv, d, block_size, lens, dtype, device, extra_blocks=3):
    """Random pools with each sequence's blocks scattered (a shuffled block table)."""
    per_seq = [-(-n // block_size) for n in lens]
    width = max(per_seq) + 1
    num_blocks = sum(per_seq) + extra_blocks
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    pos = 0
    for b, p in enumerate(per_seq):
        tables[b, :p] = perm[pos:pos + p].int()
        tables[b, p:] = perm[-1].int()  # padding entries point at a real (unused) block
        pos += p
    k_pool = torch.randn(num_blocks, block_size, hkv, d).to(dtype).to(device)
    v_pool = torch.randn(num_blocks, block_size, hkv, d).to(dtype).to(device)
    q = torch.randn(batch, hq, d).to(dtype).to(device)
    return q, k_pool, v_pool, tables.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def _mapped_ref(q, kp, vp, bt, cl, head_map, sm_scale=None):
    """float64 attention where query head head_map[j] reads KV head j // group, written head by head
    (independent of the kernels' reference)."""
    b_count, hq, d = q.shape
    hkv = kp.shape[2]
    kv_of = [0] * hq
    for j, h in enumerate(head_map.tolist()):
        kv_of[h] = j // (hq // hkv)
    scale = d ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty(b_count, hq, d, dtype=torch.float64)
    for b in range(b_count):
        n = int(cl[b])
        k = kp[bt[b].long().cpu()].reshape(-1, hkv, d)[:n].double().cpu()
        v = vp[bt[b].long().cpu()].reshape(-1, hkv, d)[:n].double().cpu()
        for h in range(hq):
            w = (k[:, kv_of[h]] @ q[b, h].double().cpu() * scale).softmax(0)  # [n]
            out[b, h] = w @ v[:, kv_of[h]]
    return out


def _check_decode(batch, hq, hkv, d, block_size, lens, dtype, device, launch=None, sm_scale=None, mapped=False,
                  table_width=None):
    q, kp, vp, bt, cl = _paged_case(batch, hq, hkv, d, block_size, lens, dtype, device)
    if table_width is not None:  # a wider table (as a CUDA graph captured for longer contexts holds)
        bt = torch.cat([bt, bt[:, -1:].expand(-1, table_width - bt.shape[1])], 1).contiguous()
    head_map = torch.randperm(hq).int().to(device) if mapped else None
    if device == "cuda":
        torch.full((batch * hq * d * 4,), float("nan"), device=device, dtype=dtype)  # poison the allocator
    out = pa.paged_decode_attention_triton(q, kp, vp, bt, cl, sm_scale, launch=launch, head_map=head_map)
    if mapped:
        ref = _mapped_ref(q, kp, vp, bt, cl, head_map, sm_scale).to(out.device)
        assert _rel(pa.paged_decode_attention_ref(q.double(), kp.double(), vp.double(), bt, cl, sm_scale,
                                                  head_map), ref) < 1e-12
    else:
        ref = pa.paged_decode_attention_ref(q.double(), kp.double(), vp.double(), bt, cl, sm_scale)
    assert not torch.isnan(out).any()
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert _rel(out, ref) < tol, (_rel(out, ref), launch)


def _check_write(t, hkv, d, block_size, num_blocks, dtype, device):
    k = torch.randn(t, hkv, d).to(dtype).to(device)
    v = torch.randn(t, hkv, d).to(dtype).to(device)
    slots = torch.randperm(num_blocks * block_size)[:t].to(torch.int64)
    slots[::3] = -1  # skipped tokens
    slots = slots.to(device)
    kp = torch.randn(num_blocks, block_size, hkv, d).to(dtype).to(device)
    vp = torch.randn(num_blocks, block_size, hkv, d).to(dtype).to(device)
    kp_ref, vp_ref = kp.clone(), vp.clone()
    pa.write_kv_to_pool_triton(k, v, kp, vp, slots)
    pa.write_kv_to_pool_ref(k, v, kp_ref, vp_ref, slots)
    assert torch.equal(kp, kp_ref) and torch.equal(vp, vp_ref)
    written = slots[slots >= 0]
    assert torch.equal(kp.view(-1, hkv, d)[written], k[(slots >= 0)])


# ---------------------------------------------------------------- CPU, Triton interpreter


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_interpreter_decode_matches_float64(dtype, splits):
    torch.manual_seed(splits)
    _check_decode(3, 4, 2, 16, 4, [1, 37, 22], dtype, "cpu", launch={"block_t": 16, "num_splits": splits})


@interp
def test_interpreter_decode_gqa_group8_odd_head_dim_and_scale():
    torch.manual_seed(5)
    _check_decode(2, 8, 1, 24, 8, [19, 40], torch.float16, "cpu", launch={"block_t": 16, "num_splits": 2}, sm_scale=0.3)


@interp
def test_interpreter_decode_splits_follow_each_sequences_length():
    """Splits are cut from each sequence's own length: a table 30 blocks wide and contexts of 3-40 tokens
    still use every split (a split with no tokens gives the merge an empty partial)."""
    torch.manual_seed(12)
    _check_decode(3, 4, 2, 16, 4, [3, 40, 17], torch.bfloat16, "cpu", launch={"block_t": 16, "num_splits": 4},
                  table_width=30)


@interp
@pytest.mark.parametrize("splits", [1, 3])
def test_interpreter_decode_with_head_map(splits):
    """CoLM-Air's chain-local grouping as a head map: q read and o written in the heads' own order."""
    torch.manual_seed(10 + splits)
    _check_decode(2, 8, 2, 16, 4, [9, 30], torch.bfloat16, "cpu", launch={"block_t": 16, "num_splits": splits},
                  mapped=True)


@interp
@pytest.mark.parametrize("preload", ["1", "0"])
def test_interpreter_decode_with_and_without_the_early_first_tile(monkeypatch, preload):
    """The first K/V tile read before the PDL wait (and again when it holds the newest token; the default, which
    the interpreter runs) and the plain loop (COLM_ATTN_PRELOAD=0): the same float64 result, with splits of one
    tile, of several, and empty ones."""
    monkeypatch.setenv("COLM_ATTN_PRELOAD", preload)
    torch.manual_seed(51)
    for lens, splits in (([1, 37, 22], 1), ([3, 40, 17], 4), ([64, 16, 9], 2)):
        _check_decode(3, 8, 2, 16, 4, lens, torch.bfloat16, "cpu", launch={"block_t": 16, "num_splits": splits},
                      mapped=True, table_width=30)


def test_head_map_is_checked():
    q, kp, vp, bt, cl = _paged_case(1, 4, 2, 8, 4, [5], torch.float32, "cpu")
    with pytest.raises(ValueError, match="head_map must be int32 \\[4\\]"):
        pa.paged_decode_attention(q, kp, vp, bt, cl, head_map=torch.arange(4))


@interp
def test_interpreter_write_kv_matches_reference():
    torch.manual_seed(6)
    _check_write(11, 2, 16, 4, 6, torch.bfloat16, "cpu")


def test_dispatch_uses_batched_path_on_cpu():
    torch.manual_seed(7)
    q, kp, vp, bt, cl = _paged_case(2, 4, 2, 8, 4, [5, 9], torch.float32, "cpu")
    assert torch.equal(pa.paged_decode_attention(q, kp, vp, bt, cl),
                       pa.paged_decode_attention_batched(q, kp, vp, bt, cl))
    with pytest.raises(ValueError, match="int32"):
        pa.paged_decode_attention(q, kp, vp, bt.long(), cl)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 3)])
@pytest.mark.parametrize("mapped", [False, True])
def test_batched_cpu_path_matches_references(hq, hkv, mapped):
    """The whole-batch CPU path against the per-sequence reference (float64 and float32) and the head-by-head
    float64 attention above: contexts from 1 token to several blocks, one block exactly full, shuffled tables
    whose unused entries hold block ids past the pool (the path must not read them), a scale of its own."""
    torch.manual_seed(11 + hq + hkv)
    lens = [1, 7, 8, 23, 3]
    q, kp, vp, bt, cl = _paged_case(len(lens), hq, hkv, 16, 8, lens, torch.float64, "cpu")
    clean = bt.clone()  # the head-by-head reference reads whole table rows
    for b, n in enumerate(lens):
        bt[b, -(-n // 8):] = 10_000 + b  # past the pool: an index error if read
    head_map = torch.randperm(hq).int() if mapped else None
    got = pa.paged_decode_attention_batched(q, kp, vp, bt, cl, sm_scale=0.3, head_map=head_map)
    ref = pa.paged_decode_attention_ref(q, kp, vp, bt, cl, 0.3, head_map)
    assert got.dtype == torch.float64 and torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    if mapped:
        assert torch.allclose(got, _mapped_ref(q, kp, vp, clean, cl, head_map, 0.3), rtol=1e-10, atol=1e-10)
    q32, kp32, vp32 = q.float(), kp.float(), vp.float()
    got32 = pa.paged_decode_attention_batched(q32, kp32, vp32, bt, cl, head_map=head_map)
    ref64 = pa.paged_decode_attention_ref(q32.double(), kp32.double(), vp32.double(), bt, cl, head_map=head_map)
    assert got32.dtype == torch.float32 and _rel(got32, ref64) < 1e-5


def test_batched_cpu_path_half_pools_and_empty_rows():
    """bf16 pools are read in float32 as the reference reads them; a sequence with no context gets zeros (the
    reference's result) and leaves the others' outputs unchanged; a batch of only empty rows is all zeros."""
    torch.manual_seed(12)
    q, kp, vp, bt, cl = _paged_case(3, 4, 2, 8, 4, [5, 1, 9], torch.bfloat16, "cpu")
    full = pa.paged_decode_attention_batched(q, kp, vp, bt, cl)
    ref = pa.paged_decode_attention_ref(q, kp, vp, bt, cl)
    assert full.dtype == torch.bfloat16 and torch.allclose(full.float(), ref.float(), rtol=1e-2, atol=1e-2)
    cl0 = cl.clone()
    cl0[1] = 0
    out = pa.paged_decode_attention_batched(q, kp, vp, bt, cl0)
    assert torch.count_nonzero(out[1]) == 0
    assert torch.equal(out[0], full[0]) and torch.equal(out[2], full[2])
    assert torch.count_nonzero(pa.paged_decode_attention_batched(q, kp, vp, bt, torch.zeros_like(cl))) == 0


def test_reference_matches_dense_attention():
    """The reference itself against SDPA on the gathered contiguous cache."""
    torch.manual_seed(8)
    q, kp, vp, bt, cl = _paged_case(2, 4, 2, 8, 4, [5, 9], torch.float64, "cpu")
    out = pa.paged_decode_attention_ref(q, kp, vp, bt, cl)
    for b, n in enumerate(cl.tolist()):
        k = kp[bt[b].long()].reshape(-1, 2, 8)[:n].transpose(0, 1).repeat_interleave(2, 0)  # [Hq, n, D]
        v = vp[bt[b].long()].reshape(-1, 2, 8)[:n].transpose(0, 1).repeat_interleave(2, 0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0]
        assert torch.allclose(out[b], ref, atol=1e-12)


# ---------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_cuda_decode_1b_shape(dtype, block_size):
    torch.manual_seed(block_size)
    lens = torch.randint(1, 3000, (9,)).tolist() + [1, 4096]
    _check_decode(len(lens), 32, 8, 64, block_size, lens, dtype, "cuda")


@cuda
@pytest.mark.parametrize("launch", [{"num_splits": 1}, {"num_splits": 7}, {"block_t": 128, "num_warps": 8},
                                    {"block_t": 32, "num_stages": 2}])
def test_cuda_decode_launch_variants(launch):
    torch.manual_seed(11)
    _check_decode(5, 32, 8, 64, 16, [1, 17, 500, 2049, 1234], torch.bfloat16, "cuda", launch=launch)


@cuda
def test_cuda_decode_head_dim_128_group_2():
    torch.manual_seed(12)
    _check_decode(4, 16, 8, 128, 32, [33, 1000, 7, 64], torch.bfloat16, "cuda")


@cuda
@pytest.mark.parametrize("launch", [None, {"num_splits": 1}])
def test_cuda_decode_head_map(launch):
    torch.manual_seed(23)
    _check_decode(3, 32, 8, 64, 16, [7, 300, 2049], torch.bfloat16, "cuda", launch=launch, mapped=True)


def test_fresh_tokens_is_checked():
    q, kp, vp, bt, cl = _paged_case(1, 4, 2, 8, 4, [5], torch.float32, "cpu")
    with pytest.raises(ValueError, match="fresh_tokens=0, must be at least 1"):
        pa.paged_decode_attention_triton(q, kp, vp, bt, cl, fresh_tokens=0)


@cuda
def test_cuda_decode_preloaded_tile_sees_the_token_its_predecessor_writes(monkeypatch):
    """With the first tile read early, the newest token's K/V written by the launch just before is the one
    attended: the newest slots rewritten before each attention launch in one stream, many times, each result
    against float64 (the decode step's own chain, RoPE launched with PDL before attention, is checked by the engine's
    GPU tests)."""
    monkeypatch.setenv("COLM_ATTN_PRELOAD", "1")
    torch.manual_seed(61)
    lens = [1, 40, 64, 65, 700, 2049]
    q, kp, vp, bt, cl = _paged_case(len(lens), 32, 8, 64, 16, lens, torch.bfloat16, "cuda")
    newest = torch.tensor([int(bt[i, (n - 1) // 16]) * 16 + (n - 1) % 16 for i, n in enumerate(lens)],
                          dtype=torch.int64, device="cuda")
    for _ in range(20):
        k_new = torch.randn(len(lens), 8, 64, device="cuda").to(torch.bfloat16) * 4
        v_new = torch.randn(len(lens), 8, 64, device="cuda").to(torch.bfloat16) * 4
        pa.write_kv_to_pool_triton(k_new, v_new, kp, vp, newest)
        out = pa.paged_decode_attention_triton(q, kp, vp, bt, cl)
        ref = pa.paged_decode_attention_ref(q.double(), kp.double(), vp.double(), bt, cl)
        assert _rel(out, ref) < 1e-2


@cuda
def test_cuda_write_kv():
    torch.manual_seed(13)
    _check_write(300, 8, 64, 16, 40, torch.bfloat16, "cuda")
