"""Paged prefill attention of packed segments against an independent float64 attention.

CPU: the reference always; the Triton kernel in Triton's interpreter inside a child pytest (small shapes).
CUDA: compiled kernel, 1B-like shapes; skipped without a GPU.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases

pf = importlib.import_module("colm.kernels.prefill_attention")


def test_interpreter_suite():
    pytest.importorskip("triton")
    run_interpreter_cases(__file__)


def _case(specs, hq, hkv, d, block_size, dtype, device, seed=0):
    """Random pools; ``specs`` [(pos0, q_len)] per segment, each prompt's blocks scattered over the pool (listed one
    prompt after the other in ``pages``, with 2 unused entries between); packed q."""
    g = torch.Generator().manual_seed(seed)
    ends = [p + n for p, n in specs]
    per = [-(-e // block_size) for e in ends]
    num_blocks = sum(per) + 5
    perm = torch.randperm(num_blocks, generator=g)
    pages, page0, at = [], [], 0
    for p in per:
        page0.append(len(pages))
        pages += perm[at : at + p].tolist() + [int(perm[-1])] * 2
        at += p
    kp = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    vp = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    n = sum(q for _, q in specs)
    q = torch.randn(n + 3, hq, d, generator=g).to(dtype)  # 3 rows of no segment (a graph's padding)
    offs = np.cumsum([0] + [q for _, q in specs])[:-1]
    segments = torch.tensor([[int(o), q, p, p0] for o, (p, q), p0 in zip(offs, specs, page0)], dtype=torch.int64)
    return [t.to(device) for t in (q, kp, vp, torch.tensor(pages, dtype=torch.int32), segments)]


def _float64(q, kp, vp, pages, segments):
    """Row by row: softmax over keys 0..pos of the row's prompt, gathered token by token from the pool."""
    n, hq, d = q.shape
    bs, hkv = kp.shape[1], kp.shape[2]
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    q, kp, vp, pages = q.double().cpu(), kp.double().cpu(), vp.double().cpu(), pages.cpu()
    for off, qlen, pos0, p0 in segments.tolist():
        keys = [kp[pages[p0 + t // bs], t % bs] for t in range(pos0 + qlen)]  # each [Hkv, D]
        vals = [vp[pages[p0 + t // bs], t % bs] for t in range(pos0 + qlen)]
        K, V = torch.stack(keys), torch.stack(vals)  # [L, Hkv, D]
        for i in range(qlen):
            for h in range(hq):
                kh = h // (hq // hkv)
                sc = (K[: pos0 + i + 1, kh] @ q[off + i, h]) / d ** 0.5
                out[off + i, h] = sc.softmax(0) @ V[: pos0 + i + 1, kh]
    return out


def _rel(a, ref):
    return ((a.double().cpu() - ref).norm() / ref.norm()).item()


SPECS = [(0, 19), (37, 8), (0, 1), (5, 40)]  # first chunks and later chunks (pos0 > 0), tiles cut mid-segment


def test_reference_matches_float64():
    q, kp, vp, pages, segments = _case(SPECS, 4, 2, 16, 4, torch.float32, "cpu")
    out = pf.paged_prefill_attention(q, kp, vp, pages, segments, tiles=None)
    assert _rel(out, _float64(q, kp, vp, pages, segments)) < 1e-5
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))  # rows of no segment: left as they were


def test_plan_tiles_cover_every_row_once():
    tiles = pf.plan_tiles([19, 8, 1, 40], pf.max_tiles(68, 4, 16), block_m=16)
    used = tiles[tiles[:, 0] >= 0]
    assert used.tolist() == [[0, 0], [0, 16], [1, 0], [2, 0], [3, 0], [3, 16], [3, 32]]
    assert (tiles[len(used):, 0] == -1).all()
    with pytest.raises(ValueError, match="more than 3 tiles"):
        pf.plan_tiles([19, 8, 1], 3, block_m=16)


def test_bad_shapes_are_refused():
    q, kp, vp, pages, segments = _case(SPECS, 4, 2, 16, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q must be"):
        pf.paged_prefill_attention(q[0], kp, vp, pages, segments, None)
    with pytest.raises(ValueError, match="query heads"):
        pf.paged_prefill_attention(q[:, :3], kp, vp, pages, segments, None)
    with pytest.raises(ValueError, match="segments must be"):
        pf.paged_prefill_attention(q, kp, vp, pages, segments[:, :3], None)


@interp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_kernel_in_interpreter(dtype, tol):
    q, kp, vp, pages, segments = _case(SPECS, 4, 2, 16, 4, dtype, "cpu", seed=3)
    tiles = torch.from_numpy(pf.plan_tiles(segments[:, 1].tolist(), pf.max_tiles(q.shape[0], 5, 16), block_m=16))
    sentinel = torch.full_like(q, 7.0)
    out = pf.paged_prefill_attention_triton(q, kp, vp, pages, segments, tiles, out=sentinel.clone(),
                                            launch={"block_m": 16, "block_n": 16})
    ref = _float64(q, kp, vp, pages, segments)
    assert _rel(out[:-3], ref[:-3]) < tol
    assert torch.equal(out[-3:], sentinel[-3:])  # padding rows untouched


@interp
def test_kernel_in_interpreter_strided_q_and_int32_plan():
    """q as the model gives it ([1, Hq, N, D] transposed: a strided view), int32 segments and tiles."""
    q, kp, vp, pages, segments = _case([(0, 21), (16, 20)], 4, 1, 16, 8, torch.float32, "cpu", seed=5)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strides of a [Hq, N, D] tensor
    tiles = torch.from_numpy(pf.plan_tiles([21, 20], 6, block_m=16)).int()
    out = pf.paged_prefill_attention_triton(qt, kp, vp, pages, segments.int(), tiles,
                                            launch={"block_m": 16, "block_n": 16})
    assert _rel(out[:-3], _float64(q, kp, vp, pages, segments)[:-3]) < 1e-4


@cuda
def test_kernel_on_cuda_1b_shapes():
    specs = [(0, 700), (512, 512), (0, 64), (1500, 300), (0, 1)]
    q, kp, vp, pages, segments = _case(specs, 16, 8, 64, 16, torch.bfloat16, "cuda", seed=11)
    tiles = torch.from_numpy(pf.plan_tiles(segments[:, 1].tolist(), pf.max_tiles(q.shape[0], 8))).cuda()
    out = pf.paged_prefill_attention(q, kp, vp, pages, segments, tiles)
    ref = pf.paged_prefill_attention_ref(q.float(), kp.float(), vp.float(), pages, segments.cpu())
    assert _rel(out, ref.double().cpu()) < 2e-2
