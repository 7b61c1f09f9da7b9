"""Where a benchmark's JSON goes: ``--out`` if given, else ``$OUT`` (the device tool) or bench/results/,
named ``<benchmark>_<device>_<date>.json`` (device: the GPU's model word, e.g. ``h100``); and the
run facts every GPU benchmark's JSON starts with (``run_meta``)."""

from __future__ import annotations

import datetime
import json
import os
import platform


def write_result(payload: dict, benchmark: str, device_name: str, date: str, out: str | None = None,
                 device: str | None = None) -> str:
    """``device``: the file name's device word (default: from ``device_name``, e.g. "NVIDIA H200" -> h200)."""
    words = device_name.split()
    device = device or (words[1].lower() if len(words) > 1 else "gpu")
    path = out or os.path.join(os.environ.get("OUT", "bench/results"), f"{benchmark}_{device}_{date}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")
    return path


def run_meta(benchmark: str) -> dict:
    """{benchmark, device, torch, triton, python, date} of this run (the CUDA device's name)."""
    import torch

    meta = {"benchmark": benchmark, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    meta.update(python=platform.python_version(), date=datetime.date.today().isoformat())
    return meta
