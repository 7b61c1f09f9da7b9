"""Versioned ``.proto`` sources of colm (``colm/v1/*.proto``) and their loader.

Generated code is never committed: ``load_proto("kv")`` compiles ``colm/v1/kv.proto`` with
``grpc_tools.protoc`` into a cache directory on first use (keyed by a hash of the sources and the
protobuf/grpc versions, written atomically so concurrent processes agree) and returns the
``(pb2, pb2_grpc)`` modules. Protos of one version live in one folder and import each other by bare
file name (``import "kv.proto";``), so generated modules are top-level ``<name>_pb2`` modules; the
cache directory is appended to ``sys.path`` for their cross-imports.

Nothing here imports grpc until ``load_proto`` is called, so engines may import ``colm.proto``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parent
_IMPORT_RE = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)\.proto"\s*;', re.MULTILINE)
_lock = threading.Lock()


def proto_dir(version: str = "v1") -> Path:
    return PROTO_ROOT / "colm" / version


def _cache_root() -> Path:
    env = os.environ.get("COLM_PROTO_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "colm" / "proto"


def _closure(name: str, src: Path) -> list[str]:
    """``name`` and every proto it imports (transitively), dependencies first."""
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        path = src / f"{n}.proto"
        if not path.is_file():
            raise ValueError(f"load_proto: no {path} (known: {sorted(p.stem for p in src.glob('*.proto'))})")
        for dep in _IMPORT_RE.findall(path.read_text()):
            visit(dep)
        order.append(n)

    visit(name)
    return order


def _compile(names: list[str], src: Path, out: Path) -> None:
    from grpc_tools import protoc  # lazy: only a service needs generated code

    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
    args += [str(src / f"{n}.proto") for n in names]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {names} in {src}")
    try:
        os.replace(tmp, out)  # atomic publish; a concurrent winner already holds the same content
    except OSError:
        if not out.is_dir():
            raise


def load_proto(name: str, version: str = "v1") -> tuple[ModuleType, ModuleType]:
    """Compile (once) and import ``colm/<version>/<name>.proto``; returns ``(name_pb2, name_pb2_grpc)``."""
    import google.protobuf
    import grpc

    src = proto_dir(version)
    with _lock:
        names = _closure(name, src)
        h = hashlib.sha256(f"{google.protobuf.__version__}|{grpc.__version__}|{version}".encode())
        for n in names:
            h.update(n.encode() + b"\0" + (src / f"{n}.proto").read_bytes())
        out = _cache_root() / f"{version}-{'-'.join(names)}-{h.hexdigest()[:16]}"
        if not (out / f"{name}_pb2_grpc.py").is_file():
            _compile(names, src, out)
        if str(out) not in sys.path:
            sys.path.append(str(out))
        pb2 = importlib.import_module(f"{name}_pb2")
        pb2_grpc = importlib.import_module(f"{name}_pb2_grpc")
    if Path(pb2.__file__).resolve().parent != out.resolve():
        raise RuntimeError(f"load_proto: {name}_pb2 was already imported from {pb2.__file__}, expected {out}")
    return pb2, pb2_grpc


__all__ = ["load_proto", "proto_dir", "PROTO_ROOT"]
