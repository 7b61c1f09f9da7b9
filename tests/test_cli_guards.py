"""The model commands refuse bad input at the boundary, naming the flag or field, the value and what is allowed:
`colm expand`'s init std and head count, a tokenizer with more ids than the model's vocabulary (`convert-hf`,
`generate`, `eval`), `colm eval`'s sizes and `demo`, a CUDA device torch does not have, `colm generate`'s scale
switch, and `colm client generate --max-new-tokens 0` (which the API reads as the router's default)."""

import math
import socket

import numpy as np
import pytest
import torch

from colm import checkpoint
from colm.cli import main
from colm.expand import expand, expanded_config
from colm.presets import preset
from colm.train.data import write_token_file
from tests.conftest import make_model


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A one-chain checkpoint with vocab_size=100 and the byte tokenizer (259 ids), and a byte-level token file."""
    d = tmp_path_factory.mktemp("v100")
    checkpoint.save(make_model("tiny-1chain", seed=3, vocab_size=100), d / "model")
    data = write_token_file(d / "val.bin", np.frombuffer(b"hello world, " * 40, dtype=np.uint8).astype(np.int64),
                            {"kind": "byte"}, 259, 1)
    return str(d / "model"), str(data)


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytes")
    ids = np.frombuffer(b"def read_config(path):\n    return path\n" * 8, dtype=np.uint8).astype(np.int64)
    return str(write_token_file(d / "val.bin", ids, {"kind": "byte"}, 259, 1))


@pytest.mark.parametrize("std", [math.nan, math.inf, -0.5])
def test_expand_refuses_a_non_finite_or_negative_std(tmp_path, capsys, std):
    with pytest.raises(ValueError, match="std=.*finite number >= 0"):
        expand(make_model("tiny-1chain"), 2, std=std)
    checkpoint.save(make_model("tiny-1chain"), tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--add-chain", "2", "--std", str(std)]) == 2
    assert "finite number >= 0" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_expand_adds_at_most_the_source_head_count(tmp_path, capsys):
    with pytest.raises(ValueError, match="add_chain=6: at most the source's n_heads=4"):
        expanded_config(preset("tiny-1chain"), 6)
    assert expanded_config(preset("tiny-1chain"), 4).chains == (4, 4)  # doubling the width is allowed
    checkpoint.save(make_model("tiny-1chain"), tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--add-chain", "1000000"]) == 2
    err = capsys.readouterr().err
    assert "add_chain=1000000: at most the source's n_heads=4" in err and "Traceback" not in err
    assert not (tmp_path / "dst").exists()


def test_convert_hf_refuses_the_byte_tokenizer_for_a_small_vocabulary(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "hf")  # no tokenizer files: the byte tokenizer (259 ids) would be attached
    for argv in (["convert-hf", str(tmp_path / "hf"), str(tmp_path / "out")],
                 ["expand", str(tmp_path / "hf"), str(tmp_path / "out"), "--add-chain", "2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "vocab_size=100 is too small for the byte tokenizer (259 ids)" in err, err
        assert not (tmp_path / "out").exists()


def test_generate_and_eval_check_token_ids_against_the_vocabulary(small_vocab, capsys):
    model, data = small_vocab
    assert main(["generate", "--model", model, "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    assert "token id 104 (position 0) is outside the model's vocabulary (vocab_size=100)" in capsys.readouterr().err
    # a prompt whose bytes all fit still runs
    assert main(["generate", "--model", model, "--prompt", "  ", "--max-new-tokens", "2", "--ids",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", model, "--data", data, "--seq-len", "16", "--max-batches", "1",
                 "--device", "cpu"]) == 2
    assert "vocabulary of 259 ids exceeds the model's vocab_size=100" in capsys.readouterr().err


@pytest.mark.parametrize("flags, err", [(["--seq-len", "0"], "--seq-len 0: must be >= 1"),
                                        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
                                        (["--batch-size", "-1"], "--batch-size -1: must be >= 1"),
                                        (["--max-batches", "0"], "--max-batches 0: must be >= 1")])
def test_eval_refuses_sizes_below_one(byte_data, capsys, flags, err):
    from colm.assets import demo_model_dir

    assert main(["eval", "--model", str(demo_model_dir()), "--data", byte_data, "--device", "cpu", "--seq-len", "16",
                 "--batch-size", "2", *flags]) == 2  # the flag under test comes last and wins
    assert err in capsys.readouterr().err


def test_eval_accepts_demo(byte_data, capsys):
    assert main(["eval", "--model", "demo", "--data", byte_data, "--seq-len", "32", "--batch-size", "2",
                 "--max-batches", "1", "--device", "cpu"]) == 0
    assert "[4, 4]" in capsys.readouterr().out


def test_a_cuda_device_torch_does_not_have_is_a_clear_error(small_vocab, capsys):
    bad = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "demo", "--prompt", "x", "--max-new-tokens", "2", "--device", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "CUDA" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=f"device='{bad}'.*CUDA"):
        checkpoint.load(small_vocab[0], device=bad)
    with pytest.raises(SystemExit):
        main(["eval", "--model", "demo", "--data", small_vocab[1], "--device", "no-such-device"])
    assert "not a torch device" in capsys.readouterr().err


@pytest.mark.parametrize("flags, err", [
    (["--switch-at", "-2", "--switch-scale", "1"], "--switch-at -2: must be a generated-token index in 0..3"),
    (["--switch-at", "4", "--switch-scale", "1"], "--switch-at 4: must be a generated-token index in 0..3"),
    (["--switch-scale", "1"], "--switch-scale 1 alone: give --switch-at and --switch-scale together"),
    (["--switch-at", "1"], "--switch-at 1 alone: give --switch-at and --switch-scale together"),
    (["--switch-at", "1", "--switch-scale", "3"], "--switch-scale 3: must be a scale in 1..2"),
])
def test_generate_refuses_a_scale_switch_it_would_not_make(capsys, flags, err):
    assert main(["generate", "--model", "demo", "--prompt", "x", "--max-new-tokens", "4", "--device", "cpu",
                 *flags]) == 2
    assert err in capsys.readouterr().err


def test_generate_switches_scale_when_asked(capsys):
    assert main(["generate", "--model", "demo", "--prompt", "x", "--max-new-tokens", "4", "--device", "cpu",
                 "--scale", "2", "--switch-at", "1", "--switch-scale", "1", "--ids"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_client_refuses_max_new_tokens_zero(capsys):
    """The gRPC API reads max_new_tokens=0 as unset (the router's default), so `colm client generate` cannot send
    it faithfully: refused before any connection, where `colm generate --max-new-tokens 0` makes no token."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["client", "generate", "--addr", addr, "--prompt", "x", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0: the gRPC API reads 0 as unset" in capsys.readouterr().err
