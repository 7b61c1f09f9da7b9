"""Small bundled assets: a CoLM-Air {4,4} demo checkpoint trained on Python's help texts.

``demo_model_dir()`` is what `colm serve` and the README use when no model is given.
"""

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "demo-small-air"


def demo_model_dir() -> Path:
    return DEMO_MODEL
