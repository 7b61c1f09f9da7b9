"""GPU busy percentage while a benchmark runs: ``nvidia-smi``'s utilization.gpu sampled in the background."""

from __future__ import annotations

import subprocess
import threading


class GpuSampler:
    """utilization.gpu every ``interval_ms`` in the background (no samples, and means of None, without nvidia-smi).
    ``mark`` then ``mean_since``: the mean over a stretch of the run."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.samples: list[float] = []
        self.proc = None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", str(interval_ms)], stdout=subprocess.PIPE, text=True)
        except (FileNotFoundError, OSError):
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def mark(self) -> int:
        return len(self.samples)

    def mean_since(self, i: int) -> float | None:
        s = self.samples[i:]
        return sum(s) / len(s) if s else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
