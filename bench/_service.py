"""``colm serve --config`` as a child process for benchmarks: started as a user starts it (embedded Ray), ready once
its health says serving with every worker healthy (clients connecting earlier all land on the launcher's router),
stopped with SIGTERM; its output goes to a log file whose tail errors quote."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ColmServe:
    def __init__(self, config, log=None, env: dict | None = None, cpus: set[int] | None = None) -> None:
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix="colm-serve-", suffix=".log")[1])
        exe = shutil.which("colm")
        cmd = ([exe] if exe else [sys.executable, "-m", "colm.cli"]) + ["serve", "--config", str(config)]
        self._out = open(self.log, "w")
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # Ray's processes inherit it
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     preexec_fn=pin)
        self._t0 = time.monotonic()
        self.addr: str | None = None      # the router's gRPC address, from colm serve's banner
        self.ready_s: float | None = None  # seconds from start to serving

    def wait_ready(self, timeout_s: float, api_key: str | None = None) -> dict:
        """Health once it says serving with every worker healthy (a busy router is asked again); raises if colm serve
        exits or is not serving by then."""
        from colm.client import Client

        deadline, h = self._t0 + timeout_s, {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"colm serve exited ({self.proc.returncode}):\n{self.tail()}")
            if self.addr is None:
                m = re.search(r"\[colm serve\] grpc\s+(\S+)", self.log.read_text(errors="replace"))
                self.addr = m.group(1) if m else None
            if self.addr is not None:
                try:
                    with Client(self.addr, api_key=api_key, timeout_s=5) as c:
                        h = c.health()
                    if h["serving"] and h["workers"] and all(w["healthy"] for w in h["workers"]):
                        self.ready_s = time.monotonic() - self._t0
                        return h
                except Exception as e:  # noqa: BLE001 - not listening yet, or busy
                    h = {"error": str(e)}
            time.sleep(0.5)
        raise TimeoutError(f"colm serve not serving after {timeout_s:.0f} s ({h}):\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    def stop(self) -> int:
        """SIGTERM (colm serve's clean shutdown), killed after 120 s; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        rc = self.proc.wait()
        self._out.close()
        return rc
