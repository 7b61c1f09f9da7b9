"""The greedy head kernel (``colm.kernels.greedy_head``) against a float64 computation of its own.

CPU: the kernels in Triton's interpreter (child pytest): ragged vocabularies, ties for the max inside
a chunk and across chunks, bf16 and fp32 logits. CUDA: the 1B vocabulary at batch 1 and 8, and the
decode head (``head_outputs``) built on it.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases

triton = pytest.importorskip("triton")
gh = importlib.import_module("colm.kernels.greedy_head")


def test_interpreter_suite():
    run_interpreter_cases(__file__)


def _logits(b, v, dtype, device, ties=True):
    x = (torch.randn(b, v) * 4).to(dtype)
    if ties and v > 3 * gh.BLOCK // 2:
        top = x.max().item() + 1.0
        x[0, gh.BLOCK + 3] = top  # a tie across chunks: the first (lower) index must win
        x[0, v - 2] = top
        if b > 1:
            x[1, 7] = top  # a tie inside one chunk
            x[1, 5] = top
    return x.to(device)


def _check(b, v, dtype, device):
    x = _logits(b, v, dtype, device)
    lse, greedy, packed = gh.greedy_head_triton(x)
    x64 = x.double().cpu()
    want_lse = torch.logsumexp(x64, -1)
    want = torch.tensor([int(torch.nonzero(r == r.max())[0]) for r in x64])  # first index of the max
    assert greedy[:, 0].cpu().tolist() == want.tolist()
    assert torch.allclose(lse.double().cpu(), want_lse, rtol=2e-6, atol=2e-6)
    assert packed.dtype == torch.float64 and packed.shape == (2, b)
    assert packed[0].cpu().tolist() == want.double().tolist()
    want_lp = x64.gather(1, want[:, None])[:, 0] - want_lse
    assert torch.allclose(packed[1].cpu(), want_lp, rtol=2e-6, atol=2e-6)
    ref = gh.greedy_head_ref(x)  # and the eager path it replaces
    assert torch.equal(ref[1], greedy) and torch.allclose(ref[0], lse, rtol=2e-6, atol=2e-6)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,v", [(2, 3 * 4096 + 77), (1, 100), (3, 4096)])
def test_interpreter_greedy_head_matches_float64(dtype, b, v):
    torch.manual_seed(b * 1000 + v)
    _check(b, v, dtype, "cpu")


@interp
def test_interpreter_greedy_head_rejects_strided_logits():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="unit column stride"):
        gh.greedy_head_triton(x.t())


def test_cpu_dispatch_is_the_reference():
    x = torch.randn(2, 50)
    for got, want in zip(gh.greedy_head(x), gh.greedy_head_ref(x)):
        assert torch.equal(got, want)


@cuda
@pytest.mark.parametrize("b", [1, 8])
def test_cuda_greedy_head_1b_vocabulary(b):
    torch.manual_seed(b)
    _check(b, 128256, torch.bfloat16, "cuda")
