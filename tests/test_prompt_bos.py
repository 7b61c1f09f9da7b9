"""A checkpoint whose tokenizer_config.json says ``add_bos_token: true`` gets a BOS in front of every text
prompt, the same way in ``colm generate``, the router's gRPC text prompts, ``/v1/completions`` and
``/tokenize`` (vLLM's ``add_special_tokens``: true by default there, false for chat); one without the key
gets none."""

import json
import subprocess
import sys

import pytest
import torch

from colm import checkpoint
from colm.generate import generate
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer, encode_prompt, load_checkpoint_tokenizer
from router_helpers import BackgroundRouter, post_json

BOS = ByteTokenizer.bos_id


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bos") / "ckpt"
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(std=0.1, seed=3).eval(), d, tokenizer={"kind": "byte"})
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "bos_token": "<|begin_of_text|>",
                                                         "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}"}))
    return d


@pytest.fixture(scope="module")
def bg(ckpt):
    model = checkpoint.load(ckpt, scale=None).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05, served_model_name="bos"),
                    model.cfg, load_checkpoint_tokenizer(ckpt), LocalBackend(model))
    bg = BackgroundRouter(router)
    yield bg, model
    bg.stop()


def test_the_config_decides_the_bos(ckpt, tmp_path):
    tok = load_checkpoint_tokenizer(ckpt)
    assert tok.add_bos_token and encode_prompt(tok, "ab") == [BOS, 97, 98]
    plain = tmp_path / "plain"
    checkpoint.save(CoLM(preset("tiny-air")), plain, tokenizer={"kind": "byte"})
    assert encode_prompt(load_checkpoint_tokenizer(plain), "ab") == [97, 98]
    (plain / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(ValueError, match="add_bos_token='yes'"):
        load_checkpoint_tokenizer(plain)


def test_tokenize_completions_and_generate_agree_on_the_bos(bg, ckpt):
    bg, model = bg
    url = bg.http_url
    assert post_json(f"{url}/tokenize", {"prompt": "ab"})[1]["tokens"] == [BOS, 97, 98]
    assert post_json(f"{url}/tokenize", {"prompt": "ab", "add_special_tokens": False})[1]["tokens"] == [97, 98]
    # a prompt that already starts with the BOS does not get a second one
    assert post_json(f"{url}/tokenize", {"prompt": "<|begin_of_text|>ab"})[1]["tokens"] == [BOS, 97, 98]

    # random weights: the references differ (else this could not tell a BOS from none)
    ref = generate(model, [BOS, *b"Hello"], SamplingParams(max_new_tokens=6), scale=2, eos_id=ByteTokenizer.eos_id).token_ids
    without = generate(model, list(b"Hello"), SamplingParams(max_new_tokens=6), scale=2, eos_id=ByteTokenizer.eos_id).token_ids
    assert ref != without
    status, body = post_json(f"{url}/v1/completions", {"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                                       "scale": 2})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 6 and body["choices"][0]["text"] == ByteTokenizer().decode(ref)
    status, body = post_json(f"{url}/v1/completions", {"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                                       "scale": 2, "add_special_tokens": False})
    assert status == 200 and body["usage"]["prompt_tokens"] == 5
    assert body["choices"][0]["text"] == ByteTokenizer().decode(without)
    # chat: the template writes the BOS; none is added on top by default
    status, body = post_json(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                                                            "max_tokens": 6, "temperature": 0, "scale": 2})
    assert status == 200 and body["usage"]["prompt_tokens"] == 6, body

    from colm.client import Client

    with Client(bg.grpc_addr) as c:
        assert c.tokenize("ab") == [BOS, 97, 98]
        assert c.complete("Hello", max_new_tokens=6, scale=2)["token_ids"] == ref

    out = subprocess.run([sys.executable, "-m", "colm.cli", "generate", "--model", str(ckpt), "--prompt", "Hello",
                          "--max-new-tokens", "6", "--scale", "2", "--ids"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [int(t) for t in out.stdout.split()] == ref
