"""KV wire helpers: the protobuf-free chunk encoding, checksums, and the pool's slot runs."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from colm.decode_worker.block_pool import BlockPool
from colm.kv_wire import checksum, encode_chunk_message, split_chunk_message, wsum32
from colm.presets import preset
from colm.proto import load_proto

kv_pb2, _ = load_proto("kv")


def test_raw_chunk_encoding_matches_protobuf():
    data = os.urandom(300_000)  # multi-byte varint lengths
    meta = kv_pb2.KVChunk(seq=7, layer_start=2, layer_end=3, token_start=129, token_end=4000, dtype="bfloat16",
                          shape=[1, 3871, 2, 2, 16], nbytes=len(data), crc32=0xFFFFFFFF, shm_offset=0)
    raw = encode_chunk_message(meta.SerializeToString(), memoryview(data))
    ref = kv_pb2.KVMessage(chunk=kv_pb2.KVChunk(data=data, **{f.name: v for f, v in meta.ListFields()}))
    assert kv_pb2.KVMessage.FromString(raw) == ref  # protobuf reads what we write
    for buf in (raw, ref.SerializeToString()):  # and we read what protobuf writes
        m, payload = split_chunk_message(buf)
        assert bytes(payload) == data
        assert kv_pb2.KVChunk.FromString(m) == meta
    for other in (kv_pb2.KVMessage(end=kv_pb2.KVEnd(num_chunks=3, num_bytes=9)),
                  kv_pb2.KVMessage(header=kv_pb2.KVHeader(request_id="r")),
                  kv_pb2.KVMessage(chunk=kv_pb2.KVChunk(seq=1))):  # no data field
        assert split_chunk_message(other.SerializeToString()) is None
    assert split_chunk_message(raw[:-1]) is None  # outer length disagrees: left to protobuf (which rejects it)
    with pytest.raises(ValueError):
        split_chunk_message(b"\x12\x02\x42\x80")  # cut inside the payload's length varint


def test_checksums():
    data = os.urandom(4096)
    assert checksum(data, "crc32") == zlib.crc32(data)
    assert checksum(data, "none") == 0
    crc32c = pytest.importorskip("crc32c")
    assert checksum(data, "crc32c") == crc32c.crc32c(data)
    assert checksum(b"123456789", "crc32c") == 0xE3069283  # the CRC-32C check value
    with pytest.raises(ValueError):
        checksum(data, "md5")


def _wsum32_by_hand(data: bytes) -> int:
    """The wsum32 definition, word by word in Python integers."""
    if len(data) % 2:
        data += b"\0"
    return sum(int.from_bytes(data[2 * i : 2 * i + 2], "little") * (i % 65521 + 1)
               for i in range(len(data) // 2)) % 2**32


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1000, 70001])
def test_wsum32_equals_its_definition_and_sees_changes(n):
    g = torch.Generator().manual_seed(n)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    raw = bytes(data.numpy())
    want = _wsum32_by_hand(raw)
    assert checksum(raw, "wsum32") == want
    assert wsum32(data) == want
    if n >= 4:
        assert wsum32(data[1:]) == _wsum32_by_hand(raw[1:])  # an odd start: realigned
        assert wsum32(data.view(-1)[: n - n % 2].view(torch.int16)) == _wsum32_by_hand(raw[: n - n % 2])
        flipped = data.clone()
        flipped[int(torch.randint(0, n, (1,), generator=g))] ^= 0x11
        assert wsum32(flipped) != want
        a, b = raw[:2], raw[2:4]
        if a != b:  # two different words swapped
            assert checksum(b + a + raw[4:], "wsum32") != want
    with pytest.raises(ValueError, match="wsum32"):
        checksum(raw, "wsum32", value=5)


def test_pool_runs_cover_the_same_slots():
    pool = BlockPool(preset("tiny-air"), 32, 4, "cpu", torch.float32)
    first = pool.allocate(6)
    assert first == list(range(6))
    pool.free(first)
    assert pool.allocate(6) == first  # freed blocks come back in ascending order: one run
    for blocks, a, b in (([0, 1, 2, 5, 6, 9], 0, 24), ([3, 4], 1, 7), ([7], 2, 3), ([8, 2, 3, 11], 3, 15)):
        runs = pool.runs(blocks, a, b)
        assert [s + i for t0, t1, s in runs for i in range(t1 - t0)] == pool.slots(blocks, a, b).tolist()
    assert pool.runs(list(range(6)), 0, 24) == [(0, 24, 0)]
