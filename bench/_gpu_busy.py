"""GPU busy percentage while a benchmark runs: ``nvidia-smi``'s utilization.gpu sampled in the background, with the
SM clock and the power draw of each sample (a run whose GPU clocked lower is told apart from one whose host lagged)."""

from __future__ import annotations

import subprocess
import threading
import time


class GpuSampler:
    """utilization.gpu every ``interval_ms`` in the background (no samples, and means of None, without nvidia-smi).
    ``mark`` then ``mean_since``: the mean over a stretch of the run."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.samples: list[float] = []
        self.extra: list[tuple[float, float]] = []  # (SM clock MHz, power W) of each sample
        self.times: list[float] = []  # when each sample was read, time.perf_counter()
        self.proc = None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits",
                                          "-lms", str(interval_ms)], stdout=subprocess.PIPE, text=True)
        except (FileNotFoundError, OSError):
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                busy = float(parts[0])
            except ValueError:
                continue
            try:
                extra = (float(parts[1]), float(parts[2]))
            except (ValueError, IndexError):  # [N/A] on some GPUs
                extra = (float("nan"), float("nan"))
            self.times.append(time.perf_counter())
            self.samples.append(busy)
            self.extra.append(extra)

    def mark(self) -> int:
        return len(self.samples)

    def mean_since(self, i: int) -> float | None:
        s = self.samples[i:]
        return sum(s) / len(s) if s else None

    def mean_between(self, t0: float, t1: float) -> float | None:
        """Mean busy of the samples read between ``t0`` and ``t1`` (time.perf_counter(); another process's perf_counter
        on the same Linux host is the same clock): the measured load alone, not a client's start-up or report."""
        s = [b for t, b in zip(self.times, self.samples) if t0 <= t <= t1]
        return sum(s) / len(s) if s else None

    def clocks_since(self, i: int) -> dict | None:
        """Mean SM clock (MHz) and power (W) over the samples since ``i`` (None without samples)."""
        s = [e for e in self.extra[i:] if e[0] == e[0]]
        if not s:
            return None
        return {"sm_clock_mhz_mean": round(sum(c for c, _ in s) / len(s), 1),
                "sm_clock_mhz_min": min(c for c, _ in s), "power_w_mean": round(sum(w for _, w in s) / len(s), 1)}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
