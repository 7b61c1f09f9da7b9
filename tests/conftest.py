"""Shared fixtures: tiny random models (std 0.2 so logits and attention are far from uniform)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the working directory (the repository root) first on sys.path, where the folder
# kernels/ (installed as colm.kernels) would shadow the `kernels` distribution transformers imports. Move the
# root last: installed packages win, and `tests.*` imports still resolve from it.
_ROOT = Path(__file__).resolve().parent.parent
_root_entries = [p for p in sys.path if Path(p or os.getcwd()).resolve() == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _root_entries] + _root_entries

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="module")
def _close_nixl_endpoints():
    """A module that made NIXL agents in this process ends them: each agent's UCX progress thread polls a core
    while it lives, which starved the Ray workers of every later test on two cores."""
    yield
    nixl = sys.modules.get("colm.kv.nixl")
    if nixl is not None:
        nixl.close_endpoints()


def make_model(name: str, seed: int = 0, std: float = 0.2, **overrides):
    from colm.model import CoLM
    from colm.presets import preset

    return CoLM(preset(name, **overrides)).reset_parameters(std=std, seed=seed).eval()


@pytest.fixture
def model_factory():
    return make_model


@pytest.fixture(scope="module")
def routed(setup):
    """A router over a prefill and a decode engine of the module's ``setup`` checkpoint (``setup[0]``), whose backend
    can fail an attempt on demand (``router_helpers.failing_engine_router``): (background router, backend)."""
    from router_helpers import failing_engine_router

    bg, backend = failing_engine_router(setup[0])
    yield bg, backend
    bg.stop()


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    """The kernel modules with interpreter cases (``test_interpreter_suite``): their child runs start together at
    the first of them (``_kernel_helpers``)."""
    files = [os.path.realpath(str(item.path)) for item in items if item.name == "test_interpreter_suite"]
    if files:
        import _kernel_helpers

        _kernel_helpers.SUITE_FILES[:] = list(dict.fromkeys(files))


def pytest_sessionfinish(session, exitstatus):
    helpers = sys.modules.get("_kernel_helpers")
    if helpers is not None:
        helpers.stop_children()
