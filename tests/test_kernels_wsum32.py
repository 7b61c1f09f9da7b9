"""The wsum32 checksum kernel (``colm.kernels.wsum32``) against the torch reference and against the definition
computed word by word in Python integers, on fresh random words of ragged sizes with the int16 extremes.

CPU: the kernel in Triton's interpreter (child pytest); the reference everywhere. CUDA: the kernel on the GPU, and
``kv_wire.wsum32`` of a 64 MiB device tensor equal to the reference.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases

triton = pytest.importorskip("triton")
k = importlib.import_module("colm.kernels.wsum32")
SIZES = [1, 5, 4096, 4097, 70001]


def test_interpreter_suite():
    run_interpreter_cases(__file__)


def by_hand(words: torch.Tensor) -> int:
    return sum((int(x) & 0xFFFF) * (i % 65521 + 1) for i, x in enumerate(words.tolist())) % 2**32


def random_words(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + n)
    words = torch.randint(-2**15, 2**15, (n,), dtype=torch.int16, generator=g)  # [n]
    if n > 3:
        words[:2] = torch.tensor([-2**15, 2**15 - 1], dtype=torch.int16)  # the extremes
        words[-1] = -1  # 0xFFFF: the largest unsigned word
    return words


@pytest.mark.parametrize("n", SIZES)
def test_reference_equals_the_definition(n):
    words = random_words(n)
    assert k.wsum32_ref(words) == by_hand(words)


@interp
@pytest.mark.parametrize("n", SIZES)
def test_kernel_in_interpreter(n):
    words = random_words(n)
    assert k.wsum32_triton(words) == by_hand(words)


@cuda
@pytest.mark.parametrize("n", SIZES)
def test_kernel_on_cuda(n):
    words = random_words(n)
    assert k.wsum32_triton(words.cuda()) == by_hand(words)


@cuda
def test_large_device_buffer_equals_reference():
    from colm.kv_wire import wsum32

    data = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, device="cuda")
    assert wsum32(data) == k.wsum32_ref(data.view(torch.int16)) == k.wsum32_ref(data.cpu().view(torch.int16))
