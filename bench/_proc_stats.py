"""CPU use of a service's processes over a benchmark pass, from /proc: cores used and how often each was preempted.

``snapshot`` reads, per process, user + system CPU time (``cpu_seconds``) and the voluntary and involuntary context
switches summed over its threads; ``delta`` turns two snapshots into cores used (CPU seconds per second) and switches per second. An
engine loop that the kernel preempts often (involuntary switches) shares its core with other busy processes: the
figure to compare between runs whose step times differ.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (ended ones included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _stats(pid: int) -> tuple[float, int, int]:
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():  # switches are counted per thread
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return cpu_seconds(pid), vol, invol


def snapshot(pids: dict[str, int]) -> dict:
    """{label: (cpu seconds, voluntary switches, involuntary switches)} and the time it was taken."""
    out = {}
    for label, pid in pids.items():
        try:
            out[label] = _stats(pid)
        except OSError:  # the process is gone
            continue
    return {"t": time.monotonic(), "procs": out}


def delta(a: dict, b: dict) -> dict:
    """{label: {cores, voluntary_switches_per_s, involuntary_switches_per_s}} between two snapshots."""
    dt = max(1e-9, b["t"] - a["t"])
    out = {}
    for label, (cpu1, vol1, inv1) in b["procs"].items():
        if label in a["procs"]:
            cpu0, vol0, inv0 = a["procs"][label]
            out[label] = {"cores": round((cpu1 - cpu0) / dt, 3),
                          "voluntary_switches_per_s": round((vol1 - vol0) / dt, 1),
                          "involuntary_switches_per_s": round((inv1 - inv0) / dt, 1)}
    return out
