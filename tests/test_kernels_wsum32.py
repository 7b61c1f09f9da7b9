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


def random_segments(n_words: int, seed: int):
    """Ranges of a buffer of ``n_words`` words in 3 groups, some longer than a block, some empty groups' neighbours."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(7):
        c = int(rng.choice([1, 3, 4096, 5000, 9001]))
        s = int(rng.integers(0, n_words - c))
        rows.append([s, c, int(rng.integers(0, 3))])
    return np.array(rows, dtype=np.int64)


def test_segment_reference_equals_the_definition():
    words = random_words(40000)
    segs = random_segments(40000, 1)
    got = k.wsum32_segments_ref(words, segs, 4).tolist()
    for g in range(4):
        joined = torch.cat([words[s : s + c] for s, c, gg in segs.tolist() if gg == g] or [words[:0]])
        assert got[g] == by_hand(joined)


@interp
def test_segments_kernel_in_interpreter():
    words = random_words(40000)
    for seed in (1, 2):
        segs = random_segments(40000, seed)
        assert k.wsum32_segments_triton(words, segs, 4).tolist() == k.wsum32_segments_ref(words, segs, 4).tolist()


@cuda
def test_segments_kernel_on_cuda():
    words = random_words(40000)
    segs = random_segments(40000, 3)
    assert k.wsum32_segments_triton(words.cuda(), segs, 4).tolist() == k.wsum32_segments_ref(words, segs, 4).tolist()


@interp
def test_segments_kernel_across_the_weight_wrap():
    """A group longer than 65521 words: its weights wrap inside a block (the kernel's int32 weights)."""
    import numpy as np

    words = random_words(100000)
    segs = np.array([[0, 30000, 0], [40000, 30001, 0], [5000, 20000, 0], [99990, 10, 1]], dtype=np.int64)
    got = k.wsum32_segments_triton(words, segs, 2).tolist()
    assert got == k.wsum32_segments_ref(words, segs, 2).tolist()
    assert got[0] == by_hand(torch.cat([words[0:30000], words[40000:70001], words[5000:25000]]))
