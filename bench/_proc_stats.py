"""CPU use of a service's processes over a benchmark pass, from /proc: cores used and how often each was preempted.

``snapshot`` reads, per process, user + system CPU time (``cpu_seconds``) and the voluntary and involuntary context
switches summed over its threads; ``delta`` turns two snapshots into cores used (CPU seconds per second) and switches per second. An
engine loop that the kernel preempts often (involuntary switches) shares its core with other busy processes: the
figure to compare between runs whose step times differ. ``CpuSampler`` reads each process's CPU seconds in the
background with the time of each reading, so cores used can be taken over a window found afterwards (a load test's
first send to last answer) rather than over a whole pass with its start-up and report.
"""

from __future__ import annotations

import bisect
import os
import threading
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


class CpuSampler:
    """Every ``interval_s`` in the background, each process's CPU seconds so far, with ``time.perf_counter()`` (the
    clock the load tests' send times use). ``cores_between(t0, t1)``: per label, CPU seconds over [t0, t1] (each
    edge interpolated between the readings around it) divided by t1 - t0."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.1) -> None:
        self.pids = dict(pids)
        self.readings: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in self.pids}
        self._stop = threading.Event()
        self._read()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for label, pid in self.pids.items():
            try:
                cpu = cpu_seconds(pid)
            except OSError:  # the process is gone
                continue
            times, values = self.readings[label]
            times.append(time.perf_counter())
            values.append(cpu)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self._read()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._read()

    @staticmethod
    def _at(times: list[float], values: list[float], t: float) -> float | None:
        i = bisect.bisect_left(times, t)
        if i == len(times) or (i == 0 and times[0] > t):
            return None  # outside the readings
        if times[i] == t or i == 0:
            return values[i]
        t0, t1, v0, v1 = times[i - 1], times[i], values[i - 1], values[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    def seconds(self) -> dict[str, float]:
        """{label: CPU seconds from the first reading to the last} (the whole time sampled)."""
        return {label: values[-1] - values[0] for label, (_, values) in self.readings.items() if values}

    def cores_between(self, t0: float, t1: float) -> dict[str, float]:
        """{label: cores used over [t0, t1]} for every process read before t0 and after t1."""
        out = {}
        for label, (times, values) in self.readings.items():
            a, b = self._at(times, values, t0), self._at(times, values, t1)
            if a is not None and b is not None and t1 > t0:
                out[label] = (b - a) / (t1 - t0)
        return out
