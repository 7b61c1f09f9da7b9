"""Compile a Triton kernel for a GPU target on a machine without one (CI checks of generated code).

Triton's NVIDIA backend ships ``ptxas`` and ``cuobjdump``, so PTX and a cubin for sm_90 can be built
on any x86-64 host. ``compile_kernel`` returns the compiled kernel; ``resource_usage`` reads its
registers / stack / local memory from the cubin (spills show up as STACK or LOCAL > 0).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile


def compile_kernel(fn, signature: dict[str, str], constexprs: dict[str, object], num_warps: int,
                   num_stages: int, divisible_by_16: tuple[str, ...] = (), arch: int = 90, **options):
    """``signature`` maps runtime args to Triton types ("*bf16", "i32", "fp32"); ``constexprs`` the rest;
    ``options``: further compile options as a launch would pass them (e.g. ``enable_fp_fusion=False``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs)
    for p in fn.params:  # constexpr parameters left out take their defaults (e.g. USE_PDL=False)
        if p.is_constexpr and p.name not in constexprs and p.name not in signature and p.has_default:
            constexprs[p.name] = p.default
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible_by_16}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages, **options})


def resource_usage(kernel) -> dict[str, int]:
    """{"REG": .., "STACK": .., "LOCAL": .., "SHARED": ..} from ``cuobjdump --dump-resource-usage``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", text)}
