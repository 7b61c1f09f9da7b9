"""What a waiter on a CUDA IPC event sees when the event's owner process ends before its recorded work has run.

A cuda_pool sender sends KVEnd with a ready event before its writes have run (``DecodeConfig.kv_ready_wait``
"host"). Decode could queue its first step behind that event (a stream wait on the GPU) instead of polling
it; but if the sender's process dies between KVEnd and its writes, does such a wait ever end? This measures
it (H100, 2026-11-23: after SIGKILL it stayed pending; so decode polls ``query()`` and fails the request at
its deadline, which cannot hang).

Per way of ending (``os._exit``, SIGKILL), a spawned owner queues ~1 s of GPU sleep, records an interprocess
event after it, sends the handle and ends at once; this process opens the event, queues a stream wait on
it and a small kernel behind, and polls both (``query()``) for up to ``--wait-s``. Each outcome goes into the
JSON as soon as it is known (a wait that never ends leaves this process unable to tear its context down:
the script ends with ``os._exit``).

Usage: python bench/ipc_event_exit.py --out FILE [--wait-s 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import time

import torch


def owner(conn, how: str, sleep_cycles: int) -> None:
    torch.cuda.init()
    ev = torch.cuda.Event(interprocess=True)
    torch.cuda._sleep(sleep_cycles)  # ~1 s of GPU time, queued
    ev.record()
    conn.send(bytes(ev.ipc_handle()))
    conn.recv()  # the waiter has opened the event and queued its wait
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


def poll(event, done, wait_s: float) -> dict:
    t0 = time.monotonic()
    row = {}
    while time.monotonic() - t0 < wait_s:
        for name, e in (("ipc_event", event), ("step_behind_wait", done)):
            if name in row:
                continue
            try:
                if e.query():
                    row[name] = f"completed after {time.monotonic() - t0:.3f} s"
            except RuntimeError as err:
                row[name] = f"query raised after {time.monotonic() - t0:.3f} s: {err}"
        if len(row) == 2:
            return row
        time.sleep(0.005)
    for name in ("ipc_event", "step_behind_wait"):
        row.setdefault(name, f"still pending after {wait_s:.0f} s")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--wait-s", type=float, default=20.0)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    dev = torch.device("cuda", 0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    end.synchronize()
    cycles_per_s = 10**8 / (start.elapsed_time(end) / 1e3)
    result = {"benchmark": "ipc_event_exit", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "owner_sleep_s": 1.0, "cases": {}}
    for how in ("exit", "sigkill"):
        a, b = ctx.Pipe()
        p = ctx.Process(target=owner, args=(b, how, int(cycles_per_s)))
        p.start()
        handle = a.recv()
        ev = torch.cuda.Event.from_ipc_handle(dev, handle)
        stream = torch.cuda.Stream(dev)
        stream.wait_event(ev)
        with torch.cuda.stream(stream):
            y = torch.ones(4, device=dev) * 2
        done = torch.cuda.Event()
        done.record(stream)
        a.send("end")
        p.join(30)
        row = {"owner_exitcode": p.exitcode}
        row.update(poll(ev, done, args.wait_s))
        result["cases"][how] = row
        print(how, row, flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        del y
    os._exit(0)


if __name__ == "__main__":
    main()
