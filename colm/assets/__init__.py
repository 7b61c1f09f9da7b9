"""Small bundled assets: a CoLM-Air {4,4} demo checkpoint (7.2M parameters) trained on one GPU on the Python standard
library's sources and help texts (``configs/train/demo_python_air.yaml``). Its weights are stored in bfloat16 (13.7 MiB);
its ``config.json`` says float32, the dtype it loads and computes in by default (an exact widening), so CPU serving
and ``colm generate`` agree token for token as with any float32 checkpoint.

``demo_model_dir()`` is what `colm serve` and the README use when no model is given.
"""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "demo-python-air"


def demo_model_dir() -> Path:
    return DEMO_MODEL
