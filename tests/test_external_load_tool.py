"""An independent load generator, GuideLLM (vllm-project/guidellm), against the router's OpenAI HTTP endpoint; and
the demo model's Hugging Face ``tokenizer.json``, which GuideLLM needs to build prompts of a given token count.

GuideLLM is not in the ``dev`` extra: from PyPI it would replace packages the serve extra already pins lower or
higher (click, multidict), so it lives in its own environment. The test finds it through ``COLM_GUIDELLM`` (the
path of its ``guidellm`` script) or ``PATH``, or else installs it itself into a virtual environment of its own
(once per machine), and skips only when that install fails (no package index)::

    python -m venv --system-site-packages /opt/guidellm && /opt/guidellm/bin/pip install guidellm==0.8.1
    COLM_GUIDELLM=/opt/guidellm/bin/guidellm python -m pytest tests/test_external_load_tool.py

It runs as a separate process, so nothing it installs reaches colm's own process (torch stays the one installed).
"""

import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest

from colm.assets import demo_model_dir
from colm.tokenizer import ByteTokenizer, HFTokenizer

SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")  # ids 256, 257, 258: ByteTokenizer's BOS, EOS, PAD
SAMPLES = ["", "a", "Hello, chains", "  two  spaces\tand\ttabs\n\nnewlines\r\n", "héllo wörld", "数学 и кириллица",
           "emoji 🙂👍🏽 and a zero-width\u200bjoiner", "\x00\x01\x7f control", "def f(x):\n    return x ** 2\n",
           "<s></s><bos><eos>"]


def build_byte_tokenizer():
    """colm's ByteTokenizer as a ``tokenizers`` Tokenizer: byte b is token b (GPT-2's byte-to-unicode alphabet,
    byte-level BPE with no merges), then BOS, EOS and PAD as special tokens 256..258. This is how
    colm/assets/demo-python-air/tokenizer.json was made (``build_byte_tokenizer().save(path)``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    tok = Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tok


def test_shipped_tokenizer_json_is_the_byte_tokenizer():
    pytest.importorskip("tokenizers")
    path = demo_model_dir() / "tokenizer.json"
    assert json.loads(path.read_text()) == json.loads(build_byte_tokenizer().to_str())
    hf, byte = HFTokenizer(str(path)), ByteTokenizer()
    assert (hf.bos_id, hf.eos_id) == (byte.bos_id, byte.eos_id)
    for text in SAMPLES:
        ids = byte.encode(text)
        assert hf.encode(text) == ids, text
        assert hf.decode(ids + [byte.eos_id]) == byte.decode(ids + [byte.eos_id]) == text
    # one difference: the HF file reads its special tokens' spellings as those tokens, colm's ByteTokenizer as bytes
    assert hf.encode(SPECIAL[1]) == [byte.eos_id] and byte.encode(SPECIAL[1]) == list(SPECIAL[1].encode())


def test_transformers_loads_the_demo_tokenizer():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(demo_model_dir()))
    byte = ByteTokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    for text in SAMPLES[:-1]:
        assert tok.encode(text, add_special_tokens=False) == byte.encode(text), text
        assert tok.decode(byte.encode(text) + [byte.eos_id], skip_special_tokens=True) == text


GUIDELLM = "guidellm==0.8.1"


def guidellm() -> tuple[str | None, str]:
    """(the guidellm script, "") or (None, why not). ``COLM_GUIDELLM`` or ``PATH`` first; else the test installs it
    itself into its own virtual environment (``--system-site-packages``: torch and the rest come from here, its own
    pins of click / multidict stay inside it), once per machine, under the temp dir."""
    exe = os.environ.get("COLM_GUIDELLM") or shutil.which("guidellm")
    if exe and os.access(exe, os.X_OK):
        return exe, ""
    venv = Path(tempfile.gettempdir()) / ("colm-" + GUIDELLM.replace("==", "-"))
    exe = venv / "bin" / "guidellm"
    if not exe.exists():
        import sys

        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
        r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", GUIDELLM], capture_output=True, text=True,
                           timeout=420)
        if r.returncode != 0 or not exe.exists():
            return None, f"pip install {GUIDELLM} failed (offline?): {(r.stdout + r.stderr)[-500:]}"
    return str(exe), ""


def success_total(bg) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(bg.http_url + "/metrics", timeout=30) as r:
        fams = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    return {name: sum(s.value for s in fams[name].samples if s.name.endswith("_total"))
            for name in ("colm:request_success", "colm:prompt_tokens", "colm:generation_tokens")}


@pytest.mark.timeout(600)
def test_guidellm_reports_every_request_successful(tmp_path):
    exe, why = guidellm()
    if exe is None:
        pytest.skip(why)
    import torch

    from colm.model import CoLM
    from colm.presets import preset
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.local_backend import LocalBackend
    from router_helpers import BackgroundRouter

    n, prompt_tokens, output_tokens = 20, 16, 8
    torch.manual_seed(0)
    model = CoLM(preset("tiny-air")).reset_parameters(seed=1).eval()
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=None, max_running=8,
                                              max_queued=64, poll_interval_s=0.05),
                                 preset("tiny-air"), ByteTokenizer(), LocalBackend(model)))
    try:
        before = success_total(bg)
        out = tmp_path / "guidellm.json"
        cmd = [exe, "run", "--backend", f"kind=openai_http,target={bg.http_url},request_format=/v1/completions",
               "--profile", "kind=concurrent,streams=4", "--constraint", f"kind=max_requests,count={n}",
               "--data", f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
               "--tokenizer", f"kind=huggingface_auto,model={demo_model_dir()}",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the tokenizer is local; nothing is fetched
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        after = success_total(bg)
    finally:
        bg.stop()
    report = json.loads(out.read_text())
    (bench,) = report["benchmarks"]
    assert bench["metrics"]["request_totals"] == {"successful": n, "errored": 0, "incomplete": 0, "total": n}
    assert len(bench["requests"]["successful"]) == n
    assert bench["metrics"]["prompt_token_count"]["successful"]["mean"] == prompt_tokens
    assert bench["metrics"]["output_token_count"]["successful"]["mean"] == output_tokens
    # the router counted the same requests, and the prompts GuideLLM built with tokenizer.json as as many bytes
    assert after["colm:request_success"] - before["colm:request_success"] == n
    assert after["colm:prompt_tokens"] - before["colm:prompt_tokens"] == n * prompt_tokens
    assert after["colm:generation_tokens"] - before["colm:generation_tokens"] == n * output_tokens
