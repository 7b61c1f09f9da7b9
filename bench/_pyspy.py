"""py-spy profiles of a running service's processes: where the Python side of a benchmark spends its time.

``Profile`` samples each given process for a while with ``py-spy record --format raw``, without pausing it
(``--nonblocking``); with ``--gil`` (the default here) only the thread that holds the GIL is sampled, so the samples
per second over the sampling rate is the share of the time the process's interpreter is busy, whichever thread runs
it. ``summarize`` reads the folded stacks py-spy writes (``frame;frame;... count``) into: samples, the GIL-busy
share, the functions with most self samples (the innermost frame) and most inclusive samples (on the stack at all),
as shares of the samples.
``service_processes`` finds a ``colm serve`` deployment's processes: the launcher and its Ray actors (a worker or
router actor's title is ``ray::WorkerActor...`` / ``ray::RouterReplica...``).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import threading
import time
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


class Profile:
    """``py-spy record --nonblocking --format raw`` on each of ``pids`` {label: pid} for ``seconds``, each started
    ``delay_s`` from now on a thread of its own (so the load is running by then); ``gil``: sample only the thread
    holding the GIL (the samples then also give the GIL-busy share). ``result()`` waits for them and gives {label:
    ``summarize``'s dict} (or {"error": ...}); the raw stacks stay in ``{out_prefix}_{label}.txt``."""

    def __init__(self, pids: dict[str, int], seconds: float, delay_s: float, out_prefix: str, gil: bool = True,
                 rate: int = 200) -> None:
        self.seconds, self.rate, self.gil = seconds, rate, gil
        self.out: dict[str, dict] = {}
        self._threads = [threading.Thread(target=self._one, args=(label, pid, delay_s, out_prefix), daemon=True)
                         for label, pid in pids.items()]
        for t in self._threads:
            t.start()

    def _one(self, label: str, pid: int, delay_s: float, out_prefix: str) -> None:
        raw = f"{out_prefix}_{label.replace(':', '_')}.txt"
        time.sleep(delay_s)
        r = subprocess.run(["py-spy", "record", "--nonblocking", "--format", "raw", "--rate", str(self.rate),
                            "--duration", str(max(1, round(self.seconds))), "--pid", str(pid), "--output", raw]
                           + (["--gil"] if self.gil else []), capture_output=True, text=True)
        if r.returncode != 0 or not os.path.exists(raw):
            self.out[label] = {"pid": pid, "error": (r.stderr or r.stdout)[-500:]}
            return
        self.out[label] = {"pid": pid, **summarize(Path(raw).read_text(), self.seconds, self.rate, gil=self.gil)}

    def result(self, timeout_s: float = 60.0) -> dict:
        for t in self._threads:
            t.join(self.seconds + timeout_s)
        return dict(self.out)


def _function(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m['func']} ({os.path.basename(m['file'])})"


def summarize(raw: str, seconds: float, rate: int, top: int = 15, gil: bool = True) -> dict:
    """Folded stacks -> samples, top self and inclusive functions, and (``gil``: stacks of the GIL holder only) the
    GIL-busy share, samples / (rate x seconds)."""
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
            "gil_busy_share": round(total / (rate * seconds), 3) if gil and seconds > 0 else None,
            "top_self": shares(self_n), "top_inclusive": shares(incl_n)}
