"""Build hook: generate the protobuf/gRPC modules of ``proto/colm/v1/*.proto`` while building colm.

Everything else about the package is in pyproject.toml. ``build_py`` runs ``grpc_tools.protoc``
(a build requirement, see ``[build-system]``) on whatever ``.proto`` files exist at build time and
places the modules in the package ``colm.proto.colm.v1`` (``proto/colm/v1/`` in the source tree):

* a wheel (``pip install .``, ``pip wheel .``): into the build directory, so the wheel carries them;
* an editable install (``pip install -e .``, PEP 660): setuptools runs ``build_py`` with
  ``editable_mode`` set and then maps ``colm.proto`` to the source folder ``proto/``, so the modules
  are written into the source tree (``proto/colm/v1/*_pb2*.py``, gitignored) where that mapping finds
  them. Writing them into the editable build directory instead would lose them: the default
  (lenient) editable mode installs a finder to the sources, not the build directory's contents.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_SRC = ROOT / "proto" / "colm" / "v1"
PROTO_PACKAGE = ("colm", "proto", "colm", "v1")


def _protoc_module():
    # proto/_protoc.py by path: colm itself is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("_colm_protoc", ROOT / "proto" / "_protoc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    """``build_py`` that first compiles the .proto sources into ``colm.proto.colm.v1``."""

    def run(self):
        protoc = _protoc_module()
        if self.editable_mode:
            written = protoc.generate(PROTO_SRC, PROTO_SRC)
        else:
            super().run()
            written = protoc.generate(PROTO_SRC, Path(self.build_lib, *PROTO_PACKAGE))
        print(f"colm: generated {', '.join(p.name for p in written)} from {PROTO_SRC}")

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            build_dir = Path(self.build_lib, *PROTO_PACKAGE)
            outputs += [str(build_dir / name) for name in _protoc_module().generated_names(PROTO_SRC)]
        return sorted(set(outputs))


setup(cmdclass={"build_py": BuildPyWithProtos})
