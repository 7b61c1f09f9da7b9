"""Generate the Python modules of ``colm/<version>/*.proto`` with ``grpc_tools.protoc``.

Used at build time by ``setup.py`` (its ``build_py``), and in a source checkout by ``load_proto`` when
a ``.proto`` changed after the last install. Standalone on purpose (no package-relative imports, no
colm imports): ``setup.py`` loads this file by path before colm is installed.

Every version's protos compile together with ``-I`` at their own folder, so descriptors register
under bare file names (``kv.proto``) as the protos import each other (``import "kv.proto";``).
protoc then writes cross-imports as top-level ``import kv_pb2 as kv__pb2``; they are rewritten to
``from . import kv_pb2 as kv__pb2`` so the modules live only in their package
(``colm.proto.colm.v1``) and nothing is added to ``sys.path``. Each generated file's first line
records a hash of the sources it came from (``SOURCE_MARK``), which ``load_proto`` compares to tell
a stale module from a current one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_MARK = "# colm-proto-sources: "
_TOP_IMPORT_RE = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def proto_files(src: Path) -> list[Path]:
    return sorted(Path(src).glob("*.proto"))


def sources_hash(src: Path) -> str:
    """Hash of every ``.proto`` in ``src`` (names and contents): one value for the whole version."""
    h = hashlib.sha256()
    for p in proto_files(src):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def generated_names(src: Path) -> list[str]:
    return [f"{p.stem}{suffix}.py" for p in proto_files(src) for suffix in ("_pb2", "_pb2_grpc")]


def _relative_imports(text: str, stems: set[str]) -> str:
    def sub(m: re.Match) -> str:
        module = m.group(1)
        return f"from . import {module} as {m.group(2)}" if module[: -len("_pb2")] in stems else m.group(0)

    return _TOP_IMPORT_RE.sub(sub, text)


def tools_dir() -> Path | None:
    """Where grpcio-tools is installed, found without importing it; None when it is not."""
    spec = importlib.util.find_spec("grpc_tools")
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def generate(src: Path, out: Path) -> list[Path]:
    """Compile every ``.proto`` in ``src`` into ``out`` (atomically per file); returns the written files.

    protoc runs in a child interpreter: grpcio-tools' compiler carries its own C++ protobuf, and once it is loaded
    into a process, loading another native library built against protobuf there (NIXL's bindings) aborted the
    process."""
    tools = tools_dir()
    if tools is None:
        raise RuntimeError("grpcio-tools is not installed: it compiles colm's .proto files")
    src, out = Path(src), Path(out)
    protos = proto_files(src)
    if not protos:
        raise RuntimeError(f"no .proto files in {src}")
    include = str(tools / "_proto")  # google/protobuf/*.proto (well-known types)
    out.mkdir(parents=True, exist_ok=True)
    mark = SOURCE_MARK + sources_hash(src) + "\n"
    stems = {p.stem for p in protos}
    with tempfile.TemporaryDirectory(prefix=".protoc-", dir=out) as tmp:
        args = [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"-I{include}", f"--python_out={tmp}",
                f"--grpc_python_out={tmp}"]
        res = subprocess.run(args + [str(p) for p in protos], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {[p.name for p in protos]} in {src}: {res.stderr.strip()}")
        written = []
        for name in generated_names(src):
            text = mark + _relative_imports((Path(tmp) / name).read_text(), stems)
            staged = Path(tmp) / (name + ".new")
            staged.write_text(text)
            os.replace(staged, out / name)  # a concurrent reader sees the old file or the new one, never half
            # its bytecode goes too: a new file of the old one's size in the same second would pass the cache's check
            Path(importlib.util.cache_from_source(str(out / name))).unlink(missing_ok=True)
            written.append(out / name)
    return written


def recorded_hash(module_file: Path) -> str | None:
    """The sources hash a generated file was made from; None when missing or not ours."""
    try:
        with open(module_file) as f:
            first = f.readline()
    except OSError:
        return None
    return first[len(SOURCE_MARK):].strip() if first.startswith(SOURCE_MARK) else None
