"""The `colm` console script and the package build (every folder importable under colm.*)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from colm import checkpoint
from colm.cli import main
from colm.generate import generate
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("generate", "init", "convert-hf", "expand", "info"):
        assert cmd in out


def test_init_info_generate_match_reference(tmp_path, capsys):
    out_dir = tmp_path / "m"
    assert main(["init", "--preset", "tiny-air", "--out", str(out_dir), "--std", "0.2"]) == 0
    assert main(["info", "--model", str(out_dir)]) == 0
    assert "chains=[2, 2]" in capsys.readouterr().out
    model = checkpoint.load(out_dir)
    ids = ByteTokenizer().encode("abc")
    for scale in (1, 2):
        assert main(["generate", "--model", str(out_dir), "--scale", str(scale), "--prompt", "abc",
                     "--max-new-tokens", "8", "--ids"]) == 0
        printed = [int(t) for t in capsys.readouterr().out.split()]
        ref = generate(model, ids, SamplingParams(max_new_tokens=8), scale=scale, eos_id=257).token_ids
        assert printed == ref
    assert main(["generate", "--model", str(out_dir), "--scale", "3", "--prompt", "x"]) == 2
    assert "scale=3" in capsys.readouterr().err


def test_console_script_runs():
    res = subprocess.run([sys.executable, "-m", "colm.cli", "info", "--presets"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "llama-3.2-1b-8-8-8-8-air" in res.stdout


def test_wheel_contains_every_package(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("colm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in ("colm", "colm/kernels", "colm/prefill_worker", "colm/decode_worker", "colm/router", "colm/deploy"):
        assert f"{pkg}/__init__.py" in names, pkg
    assert "colm/kernels/chain_linear.py" in names
    assert "colm/assets/demo-small-air/model.safetensors" in names


def test_bundled_demo_model_loads_and_is_trained():
    from colm.assets import demo_model_dir
    from colm.tokenizer import load_checkpoint_tokenizer

    d = demo_model_dir()
    tok = load_checkpoint_tokenizer(d)
    text = "The import statement is used to bind names in the current namespace."
    ids = torch.tensor([tok.encode(text)])
    losses = []
    with torch.no_grad():
        for k in (1, 2):
            model = checkpoint.load(d, scale=k)
            logits = model(ids[:, :-1])
            losses.append(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item())
    # trained: far below the uniform byte loss ln(260) = 5.56, and the larger scale is better
    assert losses[0] < 3.0 and losses[1] < losses[0] + 0.2
