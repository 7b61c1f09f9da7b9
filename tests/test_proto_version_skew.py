"""Generated gRPC code from a newer grpcio-tools than the installed grpcio (``colm.proto.load_proto``).

A build of colm compiles its .proto files with the newest grpcio-tools of pip's isolated build environment; that
code refuses at import a grpcio older than the tools (a new grpcio-tools release broke every fresh install where
an older grpcio was already installed). In a source checkout, ``load_proto`` regenerates the modules with this
environment's grpcio-tools and imports them; outside one it says to reinstall without build isolation. Each case
runs a copy of the proto package in a child interpreter (its descriptors must not meet this process's)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")
PROTO = Path(__file__).resolve().parents[1] / "proto"
NEWER = "'99.0.0'"


def _copy(root: Path, checkout: bool) -> Path:
    """A copy of the proto package as ``skewproto`` under ``root``, generated, its gRPC code claiming grpcio 99."""
    pkg = root / "skewproto"
    shutil.copytree(PROTO, pkg, ignore=shutil.ignore_patterns("*_pb2*.py", "__pycache__", ".generate.lock"))
    if checkout:
        (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
        (root / "setup.py").write_text("")
    sys.path.insert(0, str(root))
    try:
        from skewproto import _protoc  # noqa: PLC0415 - the copy's own compiler helper
        _protoc.generate(pkg / "colm" / "v1", pkg / "colm" / "v1")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("skewproto._protoc", None)
        sys.modules.pop("skewproto", None)
    grpc_file = pkg / "colm" / "v1" / "kv_pb2_grpc.py"
    text = grpc_file.read_text()
    start = text.index("GRPC_GENERATED_VERSION = ") + len("GRPC_GENERATED_VERSION = ")
    end = text.index("\n", start)
    grpc_file.write_text(text[:start] + NEWER + text[end:])  # the source hash on its first line stays current
    return grpc_file


def _load(root: Path) -> subprocess.CompletedProcess:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import skewproto; "
            "kv, kv_grpc = skewproto.load_proto('kv'); print('imported', kv_grpc.GRPC_GENERATED_VERSION)")
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)


def test_a_checkout_regenerates_code_too_new_for_its_grpcio(tmp_path):
    grpc_file = _copy(tmp_path, checkout=True)
    proc = _load(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout and NEWER not in grpc_file.read_text()
    assert "regenerating it with this environment's grpcio-tools" in proc.stderr
    assert proc.stdout.split()[-1] != NEWER.strip("'")
    again = _load(tmp_path)  # now current: imported without a word
    assert again.returncode == 0 and "regenerating" not in again.stderr, again.stderr


def test_an_install_outside_a_checkout_says_to_reinstall(tmp_path):
    grpc_file = _copy(tmp_path, checkout=False)
    proc = _load(tmp_path)
    assert proc.returncode != 0
    assert "--no-build-isolation" in proc.stderr and "grpcio" in proc.stderr
    assert NEWER in grpc_file.read_text()  # nothing rewritten outside a checkout
