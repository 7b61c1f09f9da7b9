"""The `colm` CLI's flags: `colm serve` like `vllm serve` (model positional, flags over the YAML), a lazy
top-level parser (no torch for --help), `colm info --model demo`."""

import subprocess
import sys

import pytest
import yaml

from colm.cli import COMMANDS, build_parser, main
from colm.commands.serve import load_config

SERVE_FLAGS = ("--host", "--port", "--grpc-port", "--api-key", "--served-model-name", "--metrics-port", "--config",
               "MODEL_OR_DIR")


def _serve_args(argv):
    return build_parser("serve").parse_args(["serve", *argv])


def _imports_after(argv: list[str]) -> dict:
    code = ("import sys, json\nfrom colm.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'grpc', 'ray', 'colm.commands.generate')}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["serve", "--help"], ["generate", "--help"], ["eval", "--help"]])
def test_help_does_not_import_torch(argv):
    loaded = _imports_after(argv)
    assert not loaded["torch"] and not loaded["grpc"] and not loaded["ray"], loaded
    if argv == ["--help"] or argv[0] == "serve":
        assert not loaded["colm.commands.generate"], "the top-level parser imported every command module"


def test_console_script_help_is_torch_free():
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "colm.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert not [line for line in res.stderr.splitlines() if line.rstrip().endswith(("| torch", "| grpc"))]
    for flag in SERVE_FLAGS:
        assert flag in res.stdout, flag


def test_top_level_help_matches_each_command(capsys):
    for name, (_module, helptext) in COMMANDS.items():
        parser = build_parser(name)
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        registered = {a.dest: a.help for a in sub._choices_actions}
        assert registered[name] == helptext, name
        assert list(registered) == list(COMMANDS)


def test_serve_flags_override_yaml(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "/from/yaml"},
                                    "router": {"host": "127.0.0.2", "grpc_port": 7001, "http_port": 7002,
                                               "metrics_port": 7003, "served_model_name": "yaml-name",
                                               "max_running": 5}}))
    cfg = load_config(_serve_args(["--config", str(path)]))
    assert (cfg.model.path, cfg.router.host, cfg.router.grpc_port, cfg.router.http_port) == (
        "/from/yaml", "127.0.0.2", 7001, 7002)
    assert (cfg.router.metrics_port, cfg.router.served_model_name, cfg.router.api_key) == (7003, "yaml-name", None)

    cfg = load_config(_serve_args(["demo", "--config", str(path), "--host", "127.0.0.3", "--port", "8101",
                                   "--grpc-port", "8102", "--metrics-port", "8103", "--api-key", "k" * 24,
                                   "--served-model-name", "colm-x"]))
    assert cfg.model.path == "demo"
    assert (cfg.router.host, cfg.router.http_port, cfg.router.grpc_port, cfg.router.metrics_port) == (
        "127.0.0.3", 8101, 8102, 8103)
    assert (cfg.router.api_key, cfg.router.served_model_name) == ("k" * 24, "colm-x")
    assert cfg.router.max_running == 5  # what no flag names stays as the YAML says

    assert load_config(_serve_args(["--http-port", "8201", "--model", "/m"])).router.http_port == 8201
    assert load_config(_serve_args(["--model", "/m"])).model.path == "/m"
    with pytest.raises(ValueError, match="model given twice"):
        load_config(_serve_args(["/a", "--model", "/b"]))


def test_serve_api_key_from_env(monkeypatch):
    monkeypatch.setenv("COLM_TEST_CLI_KEY", "s" * 24)
    assert load_config(_serve_args(["--api-key", "env:COLM_TEST_CLI_KEY"])).router.api_key == "s" * 24
    monkeypatch.delenv("COLM_TEST_CLI_KEY")
    with pytest.raises(ValueError, match="COLM_TEST_CLI_KEY"):
        load_config(_serve_args(["--api-key", "env:COLM_TEST_CLI_KEY"]))


def test_serve_bad_flag_value_is_one_line(capsys):
    assert main(["serve", "--grpc-port", "70000"]) == 2
    err = capsys.readouterr().err
    assert "router.grpc_port=70000" in err and "Traceback" not in err


def test_info_and_generate_accept_demo(capsys):
    assert main(["info", "--model", "demo"]) == 0
    assert "chains=[4, 4]" in capsys.readouterr().out
    assert main(["generate", "--model", "demo", "--prompt", "The", "--max-new-tokens", "2", "--ids"]) == 0
    assert len(capsys.readouterr().out.split()) >= 1


def test_device_auto_resolves_when_run():
    import torch

    args = build_parser("generate").parse_args(["generate", "--model", "demo", "--prompt", "x"])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")
    args = build_parser("generate").parse_args(["generate", "--model", "demo", "--prompt", "x", "--device", "cpu"])
    assert args.device == "cpu"


def test_command_without_action_and_unknown_command(capsys):
    assert main(["client"]) == 2
    assert "ACTION" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
