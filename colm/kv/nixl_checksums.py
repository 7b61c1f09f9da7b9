"""Checksums of K/V bytes already in place (decode's pool, prefill's send region), off the forward's stream.

``pool_checksum`` sums a pool's bytes at ``nixl_segments`` rows; ``side_stream`` runs such sums on a CUDA stream of
their own, so a host read of one does not wait for the forward or decode step queued on the current stream;
``read_pending`` reads several scalars computed there at once.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from colm.kv_wire import checksum, tensor_bytes, wsum32


def pool_checksum(pool: torch.Tensor, segments: np.ndarray, kind: str):
    """Checksum of the pool's bytes at ``segments`` (``put_segments`` rows), in row order. A CPU pool is read in
    place; a device pool's segments are gathered on the device (``wsum32`` is computed there; a CRC copies them to
    host first)."""
    if kind == "wsum32":
        flat = pool.view(-1).view(torch.uint8)
        with side_stream(pool.device):  # not behind the engine's steps on its stream: the slots read are written
            return wsum32(torch.cat([flat[off : off + n] for _, off, n in segments.tolist()]))
    if pool.device.type == "cpu":
        buf = tensor_bytes(pool)  # [pool bytes] memoryview, no copy
        value = 0
        for _, off, n in segments.tolist():
            value = checksum(buf[off : off + n], kind, value)
        return value
    flat = pool.view(-1).view(torch.uint8)
    host = torch.cat([flat[off : off + n] for _, off, n in segments.tolist()]).cpu()
    return checksum(tensor_bytes(host), kind)


_SIDE_STREAMS: dict = {}


def read_pending(values: list) -> list[int]:
    """Ints of checksums some of which are scalars not yet read (``wsum32_pending`` on ``side_stream``; one sink's or
    pool's, so one device): those read together, on that stream."""
    scalars = [v for v in values if isinstance(v, torch.Tensor)]
    if not scalars:
        return [int(v) for v in values]
    with side_stream(scalars[0].device):
        read = iter(torch.stack(scalars).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else int(v) for v in values]


def side_stream(device: torch.device):
    """A context that runs the checksum of bytes already in place on a stream of its own (CUDA; a no-op
    elsewhere), so its host read does not wait for the forward or the decode step queued on the current one."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    return torch.cuda.stream(stream)

