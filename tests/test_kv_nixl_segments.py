"""The nixl transport's address mapping against the pool layout (no NIXL needed): a put of layers [l0, l1) x tokens
[t0, t1), laid out in pool order and moved segment by segment (``put_segments``) into a pool, equals the same put
written with torch indexing (``PagedKV.write``); the segments cover the source exactly once, in order; decode's
``pool_checksum`` of those slots equals the sender's checksum of the source, and sees a flipped byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colm.decode_worker.block_pool import PagedKV
from colm.kv.nixl import PoolGeometry, geometry_of, pool_checksum, put_segments, to_pool_order, token_runs
from colm.kv_wire import checksum, default_checksum, tensor_bytes


def random_case(rng: np.random.Generator, dtype: torch.dtype):
    L, N, bs = int(rng.integers(1, 6)), int(rng.integers(4, 40)), int(rng.choice([1, 2, 4, 8, 16]))
    H, hd = int(rng.integers(1, 4)), int(rng.choice([2, 4, 8]))
    n_blocks = int(rng.integers(1, N + 1))
    if rng.random() < 0.5:  # shuffled blocks: many runs
        blocks = rng.permutation(N)[:n_blocks].tolist()
    else:  # mostly ascending runs, as blocks come off the free stack
        start = int(rng.integers(0, N - n_blocks + 1))
        blocks = list(range(start, start + n_blocks))
        if n_blocks > 2:
            i = int(rng.integers(1, n_blocks - 1))
            blocks[i:] = blocks[i:][::-1]
    tokens = len(blocks) * bs - int(rng.integers(0, bs))
    t0 = int(rng.integers(0, tokens))
    t1 = int(rng.integers(t0 + 1, tokens + 1))
    l0 = int(rng.integers(0, L))
    l1 = int(rng.integers(l0 + 1, L + 1))
    pool = torch.randn(2, L, N, bs, H, hd).to(dtype)
    kv = torch.randn(l1 - l0, t1 - t0, 2, H, hd).to(dtype)
    return pool, blocks, (l0, l1, t0, t1), kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_match_a_torch_indexing_copy(dtype):
    rng = np.random.default_rng(7 if dtype == torch.float32 else 11)
    for _ in range(200):
        pool, blocks, (l0, l1, t0, t1), kv = random_case(rng, dtype)
        ref = pool.clone()
        pages = PagedKV(ref)
        pages.write(pages.copy_plan(blocks, t0, t1), l0, l1, kv)  # the reference: torch indexing

        geo = geometry_of(PagedKV(pool))
        assert geo.num_bytes == pool.numel() * pool.element_size()
        runs = token_runs(blocks, geo.block_size, t0, t1)
        assert [tuple(r) for r in runs.tolist()] == PagedKV(pool).runs(blocks, t0, t1)
        segs = put_segments(geo, l0, l1, t0, t1, runs)
        assert segs.shape == (2 * (l1 - l0) * len(runs), 3)
        src = to_pool_order(kv).contiguous()
        src_bytes = np.frombuffer(tensor_bytes(src), dtype=np.uint8)
        # the rows cover the source once, in order
        assert segs[0, 0] == 0 and (segs[1:, 0] == segs[:-1, 0] + segs[:-1, 2]).all()
        assert segs[-1, 0] + segs[-1, 2] == src_bytes.size
        # move them as a NIXL WRITE would
        dst = np.frombuffer(tensor_bytes(pool), dtype=np.uint8).copy()
        for s, d, n in segs.tolist():
            dst[d : d + n] = src_bytes[s : s + n]
        assert np.array_equal(dst, np.frombuffer(tensor_bytes(ref), dtype=np.uint8)), (l0, l1, t0, t1, blocks)


@pytest.mark.parametrize("kind", sorted({"crc32", "wsum32", default_checksum()}))
def test_pool_checksum_equals_the_senders(kind):
    rng = np.random.default_rng(3)
    for _ in range(50):
        pool, blocks, (l0, l1, t0, t1), kv = random_case(rng, torch.bfloat16)
        pages = PagedKV(pool)
        pages.write(pages.copy_plan(blocks, t0, t1), l0, l1, kv)
        geo = geometry_of(pages)
        segs = put_segments(geo, l0, l1, t0, t1, token_runs(blocks, geo.block_size, t0, t1))
        want = checksum(tensor_bytes(to_pool_order(kv).contiguous()), kind)
        assert pool_checksum(pool, segs, kind) == want
        s, d, n = segs[int(rng.integers(len(segs)))].tolist()
        raw = pool.view(-1).view(torch.uint8)
        raw[d + int(rng.integers(n))] ^= 0x5A  # a byte of the range flipped in the pool
        assert pool_checksum(pool, segs, kind) != want


def test_geometry_and_runs_edges():
    geo = PoolGeometry(num_layers=3, num_blocks=10, block_size=4, kv_heads=2, head_dim=8, itemsize=2)
    assert geo.token_bytes == 32 and geo.num_bytes == 2 * 3 * 10 * 4 * 32
    # ascending blocks: one run whatever the range
    assert token_runs([5, 6, 7], 4, 1, 11).tolist() == [[1, 11, 21]]
    # a break between blocks 6 and 2
    assert token_runs([5, 6, 2], 4, 3, 10).tolist() == [[3, 8, 23], [8, 10, 8]]
    with pytest.raises(ValueError):
        token_runs([5, 6], 4, 0, 9)  # past the blocks
    segs = put_segments(geo, 1, 2, 3, 10, token_runs([5, 6, 2], 4, 3, 10))
    slots = geo.num_blocks * geo.block_size
    # K of layer 1: slots 23..27 then 8..9; V of layer 1 the same, one pool half further
    assert segs.tolist() == [[0, (1 * slots + 23) * 32, 5 * 32], [5 * 32, (1 * slots + 8) * 32, 2 * 32],
                             [7 * 32, (4 * slots + 23) * 32, 5 * 32], [12 * 32, (4 * slots + 8) * 32, 2 * 32]]


def test_ready_puts_go_out_as_one_write_and_a_put_still_copying_starts_the_next():
    """``NixlKVSink._batches``: the first put is waited for; the puts queued behind it whose copies are done join its
    WRITE; one whose copy is still running ends the batch and starts the next; the stream's end ends them."""
    import queue
    from concurrent.futures import Future

    from colm.kv.nixl import NixlKVSink
    from colm.prefill_worker.sinks import _END

    def put(layer, done=True):
        f = Future()
        if done:
            f.set_result(100 + layer)  # the put's checksum
        return ((layer, layer + 1, 0, 8), f, None, layer * 64), f

    sink = NixlKVSink.__new__(NixlKVSink)
    sink._q = queue.SimpleQueue()
    items = [put(i) for i in range(3)] + [put(3, done=False)] + [put(4)]
    for item, _ in items:
        sink._q.put(item)
    batches = sink._batches()
    first, last = next(batches)
    assert [(r[0], off, crc) for r, off, crc in first] == [(0, 0, 100), (1, 64, 101), (2, 128, 102)] and not last
    items[3][1].set_result(103)  # the held put's copy ends; it leads the next batch with the one behind it
    sink._q.put(_END)
    second, last = next(batches)
    assert [(r[0], crc) for r, _, crc in second] == [(3, 103), (4, 104)] and last  # the stream's end right behind
    assert next(batches, None) is None


def test_ready_batches_waits_for_the_first_and_respects_its_limit():
    """``ready_batches``: the first item is passed to ``wait``; the ready items queued behind it join it, ``limit`` at
    most; a list with the end right behind it says so; a failure put on the queue is raised where the consumer
    reads it."""
    import queue

    from colm.prefill_worker.sinks import _END, ready_batches

    q = queue.SimpleQueue()
    for i in range(5):
        q.put(i)
    q.put(_END)
    waited = []
    got = list(ready_batches(q, lambda i: i != 3, waited.append, limit=2))
    # the end behind a full list comes on its own: the last list does not know it is last
    assert got == [([0, 1], False), ([2], False), ([3, 4], False)] and waited == [0, 2, 3]
    for i in range(3):
        q.put(i)
    q.put(_END)
    assert list(ready_batches(q, lambda i: True)) == [([0, 1, 2], True)]
    q.put(7)
    q.put(RuntimeError("put failed"))
    batches = ready_batches(q, lambda i: True)
    with pytest.raises(RuntimeError, match="put failed"):
        next(batches)


def test_checks_left_pending_are_summed_at_the_end_and_a_mismatch_names_its_chunk():
    """Decode's device-pool path: ``verify_range(pending=True)`` only notes a chunk's ranges, and ``check_pending``
    sums every chunk's pool words at the stream's end (one launch on a GPU; the reference here) and
    compares them with the sender's wsum32; a flipped byte fails the chunk that holds it. A CPU pool is checked at
    once."""
    from colm.errors import TransferError
    from colm.kv.nixl import check_pending, read_pending, verify_range
    from colm.kv_wire import KVLayout
    from colm.proto import load_proto

    kv_pb2, _ = load_proto("kv")
    assert read_pending([torch.tensor(5), 7, torch.tensor(2**32 - 1)]) == [5, 7, 2**32 - 1]
    rng = np.random.default_rng(5)
    pool, blocks, _, _ = random_case(rng, torch.bfloat16)
    pages = PagedKV(pool)
    geo = geometry_of(pages)
    L, T = pool.shape[1], len(blocks) * pool.shape[3]
    chunks, pending = [], []
    for seq, layer in enumerate(range(L)):  # one chunk per layer, all tokens, as a prefill's puts
        kv = torch.randn(1, T, 2, pool.shape[4], pool.shape[5]).to(torch.bfloat16)
        pages.write(pages.copy_plan(blocks, 0, T), layer, layer + 1, kv)
        c = kv_pb2.KVChunk(seq=seq, layer_start=layer, layer_end=layer + 1, token_start=0, token_end=T,
                           crc32=checksum(tensor_bytes(to_pool_order(kv).contiguous()), "wsum32"))
        chunks.append(c)
        pending.append((c, (layer, layer + 1, 0, T)))
    check_pending(pages, blocks, pending, "r")
    raw = pool.view(-1).view(torch.uint8)
    bad = len(pending) - 1
    segs = put_segments(geo, bad, bad + 1, 0, T, token_runs(blocks, geo.block_size, 0, T))
    raw[int(segs[0, 1]) + 1] ^= 0x40  # a byte of the last chunk's first word in the pool
    with pytest.raises(TransferError, match=f"chunk {bad}"):
        check_pending(pages, blocks, pending, "r")
    layout = KVLayout(L, T, pool.shape[4], pool.shape[5], "bfloat16")
    with pytest.raises(TransferError, match=f"chunk {bad}"):  # a CPU pool: checked at once, nothing left pending
        verify_range(pages, blocks, layout, chunks[bad], "wsum32", "r", pending=True)
    assert verify_range(pages, blocks, layout, chunks[0], "wsum32", "r", pending=True) is None


def test_the_sender_sums_a_writes_device_puts_in_one_call():
    """``NixlKVSink._device_checksums``: puts given as word ranges of the send buffer get the wsum32 of their bytes
    (one ``wsum32_segments`` call; the reference on the CPU), and other checksums pass through, in order."""
    from types import SimpleNamespace

    from colm.kv.nixl import NixlKVSink
    from colm.kv_wire import wsum32

    g = torch.Generator().manual_seed(9)
    buf = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g)
    sink = NixlKVSink.__new__(NixlKVSink)
    sink.ep = SimpleNamespace(buf=buf)
    values = [(100, 3000), 12345, (5000, 7), torch.tensor(77)]
    assert sink._device_checksums(values) == [wsum32(buf[200:6200]), 12345, wsum32(buf[10000:10014]), 77]


def test_pending_segments_are_each_chunks_pool_words():
    """``pending_segments``: for chunks of mixed token ranges and layer counts, each chunk's rows are its
    ``put_segments`` pool offsets and lengths in words, in order, tagged with its index."""
    from colm.kv.nixl import pending_segments

    rng = np.random.default_rng(4)
    pool, blocks, _, _ = random_case(rng, torch.bfloat16)
    geo = geometry_of(PagedKV(pool))
    T = len(blocks) * geo.block_size
    ranges = [(0, 1, 0, T), (1, geo.num_layers, 0, T), (0, geo.num_layers, T // 2, T), (0, 1, T // 3, T // 2 + 1)]
    ranges = [r for r in ranges if r[0] < r[1] and r[2] < r[3]]
    got = pending_segments(geo, blocks, ranges)
    for i, (l0, l1, t0, t1) in enumerate(ranges):
        segs = put_segments(geo, l0, l1, t0, t1, token_runs(blocks, geo.block_size, t0, t1))
        assert got[got[:, 2] == i][:, :2].tolist() == np.stack([segs[:, 1] // 2, segs[:, 2] // 2], 1).tolist()


def test_batch_segments_equal_each_puts_segments():
    """``batch_segments`` of several puts of one token range (mixed layer counts, offsets into one buffer) equals
    ``put_segments`` of each, shifted by its offset, in put order."""
    from colm.kv.nixl import batch_segments

    rng = np.random.default_rng(21)
    for _ in range(5):
        pool, blocks, _, _ = random_case(rng, torch.bfloat16)
        geo = geometry_of(PagedKV(pool))
        T = len(blocks) * geo.block_size
        t0 = int(rng.integers(0, T - 1))
        t1 = int(rng.integers(t0 + 1, T + 1))
        runs = token_runs(blocks, geo.block_size, t0, t1)
        puts, off, want = [], 0, []
        l0 = 0
        while l0 < geo.num_layers:
            l1 = min(geo.num_layers, l0 + int(rng.integers(1, 3)))
            s = put_segments(geo, l0, l1, t0, t1, runs)
            want.append(s + np.array([off, 0, 0]))
            puts.append((l0, l1, off))
            off += 2 * (l1 - l0) * (t1 - t0) * geo.token_bytes
            l0 = l1
        got = batch_segments(geo, np.array(puts, dtype=np.int64), t0, t1, runs)
        assert got.tolist() == np.concatenate(want).tolist()
