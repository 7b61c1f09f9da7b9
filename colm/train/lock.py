"""One training run per ``run.out_dir``: an OS advisory lock held for the run's whole lifetime.

Rank 0 takes ``fcntl.flock`` on ``out_dir/train.lock`` without waiting and writes its pid there. The
kernel drops the lock when that process ends, however it ends, so a crashed or killed run leaves no
stale lock (the file and its old pid stay behind, harmless). A second run on the same directory is
refused at once with a ValueError naming the directory and the holder's pid. Under torchrun the other
ranks take no lock: they learn rank 0's outcome by broadcast, so a refused run stops on every rank.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from colm.train.distributed import DistInfo

LOCK_FILE = "train.lock"


def acquire(out_dir: str | Path) -> IO[str]:
    """Lock ``out_dir`` (created if missing) for this process; the returned file holds the lock until closed."""
    out = Path(out_dir)
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        # r+ (not w): opening must not truncate the pid that a running holder wrote
        handle = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    except OSError as e:
        raise ValueError(f"run.out_dir={out}: cannot create its lock file {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ValueError(f"run.out_dir={out}: another training run (pid {holder}) is using it (lock {path}); "
                         "wait for it to end or give this run another run.out_dir") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _on_every_rank(error: str | None, info: DistInfo) -> str | None:
    """Rank 0's outcome, on every rank."""
    if not info.distributed:
        return error
    import torch.distributed as dist

    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def out_dir_lock(out_dir: str | Path, info: DistInfo) -> Iterator[None]:
    """Hold ``out_dir``'s lock (rank 0) while the body runs; raise ValueError on every rank if another run has it."""
    handle, error = None, None
    if info.is_main:
        try:
            handle = acquire(out_dir)
        except ValueError as e:
            error = str(e)
    error = _on_every_rank(error, info)
    if error is not None:
        raise ValueError(error)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()
