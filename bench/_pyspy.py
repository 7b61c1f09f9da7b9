"""py-spy profiles of a running service's processes: where the Python side of a benchmark spends its time.

``record`` samples each given process for a while with ``py-spy record --gil --format raw`` (only the thread that
holds the GIL is sampled, so the samples per second over the sampling rate is the share of the time the process's
interpreter is busy, whichever thread runs it), without pausing it (``--nonblocking``). ``summarize`` reads the
folded stacks py-spy writes (``frame;frame;... count``) into: samples, the GIL-busy share, the functions with most
self samples (the innermost frame) and most inclusive samples (on the stack at all), as shares of the samples.
``service_processes`` finds a ``colm serve`` deployment's processes: the launcher and its Ray actors (a worker or
router actor's title is ``ray::WorkerActor...`` / ``ray::RouterReplica...``).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> bool:
    return shutil.which("py-spy") is not None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def service_processes(launcher_pid: int, titles=("ray::WorkerActor", "ray::RouterReplica")) -> dict[str, int]:
    """{label: pid}: the launcher and every process whose title starts with one of ``titles``."""
    found = {"launcher": launcher_pid}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = _cmdline(int(entry))
            for t in titles:
                if cmd.startswith(t):
                    found[f"{t.removeprefix('ray::')}:{entry}"] = int(entry)
    return found


def record(pids: dict[str, int], seconds: float, out_dir: str | Path, rate: int = 200) -> dict[str, subprocess.Popen]:
    """Start one ``py-spy record`` per process (returns at once); ``wait_summaries`` collects them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for label, pid in pids.items():
        path = out / f"{label.replace(':', '_')}.txt"
        cmd = ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate),
               "--format", "raw", "--gil", "--nonblocking", "--output", str(path)]
        procs[label] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs[label].path, procs[label].pid_ = path, pid  # type: ignore[attr-defined]
    return procs


def wait_summaries(procs: dict[str, subprocess.Popen], seconds: float, rate: int = 200, top: int = 15) -> dict:
    summaries = {}
    for label, p in procs.items():
        _, err = p.communicate(timeout=seconds + 60)
        path = p.path  # type: ignore[attr-defined]
        if p.returncode != 0 or not path.exists():
            summaries[label] = {"pid": p.pid_, "error": err.decode(errors="replace")[-400:]}  # type: ignore[attr-defined]
            continue
        summaries[label] = {"pid": p.pid_, **summarize(path.read_text(), seconds, rate, top)}  # type: ignore[attr-defined]
    return summaries


def _function(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({os.path.basename(m['file'])})"


def summarize(raw: str, seconds: float, rate: int, top: int = 15) -> dict:
    """Folded stacks -> samples, GIL-busy share (samples / (rate x seconds)), top self and inclusive functions."""
    self_n: collections.Counter = collections.Counter()
    incl_n: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n

    def shares(c: collections.Counter) -> list:
        return [[f, round(n / total, 4)] for f, n in c.most_common(top)] if total else []

    return {"samples": total, "seconds": seconds, "rate_hz": rate,
            "gil_busy_share": round(total / (rate * seconds), 3) if seconds > 0 else None,
            "top_self": shares(self_n), "top_inclusive": shares(incl_n)}
