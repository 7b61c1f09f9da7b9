"""Process group set-up and FSDP2 sharding.

Under ``torchrun`` (``WORLD_SIZE`` > 1) ``init_distributed`` starts the process group (NCCL on CUDA,
gloo on CPU) and picks this rank's device. ``shard_model`` applies FSDP2 ``fully_shard`` to each
transformer block and then to the root, with bf16 parameters and fp32 gradient reduction when
mixed precision is on; a single process skips sharding entirely.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


_state: dict[str, bool] = {}  # "gloo": this process started a gloo group (``leave``)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:  # a typo or a CUDA device this machine lacks: torch's own failure is a traceback from deep inside
        from colm.checkpoint import check_device

        try:
            check_device(device)
        except ValueError as e:
            raise ValueError(f"run.{e}") from None
    if device.startswith("cuda"):
        dev = torch.device("cuda", local_rank if world > 1 else torch.device(device).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
        if backend == "gloo":
            _state["gloo"] = True
    return DistInfo(rank, world, local_rank, dev)


def shard_model(root: nn.Module, blocks: nn.ModuleList, info: DistInfo, bf16: bool) -> nn.Module:
    """FSDP2 on every block, then on ``root`` (which owns the embedding, final norm and head)."""
    if not info.distributed:
        return root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    # The root's parameters are needed again right after forward by the loss: keep them unsharded.
    fully_shard(root, mp_policy=mp, reshard_after_forward=False)
    return root


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> int:
    """``code`` for the process's exit; a process that ran a gloo group ends here instead, its output flushed and
    without the interpreter's finalization.

    torch's gloo threads outlive ``destroy_process_group`` (two ``pt_gloo_runloop`` threads and the transport loop
    are still alive after it and a ``gc.collect()``), and one that drops its last reference to a finished
    collective's work during finalization takes the GIL there and aborts the process ("terminate called without an
    active exception", exit -6) after the run has completed; a loaded CPU makes that likely."""
    if not _state.get("gloo"):
        return code
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
