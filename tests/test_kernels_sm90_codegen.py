"""The kernels compile for Hopper (sm_90) on a machine without a GPU, with the instructions we rely on.

Built with the ptxas that ships in Triton's wheel; checks that the chain-linear GEMMs use wgmma fed by
16-byte async copies, that nothing spills, that the pipelined shared memory fits a Hopper SM, and that
the decode-attention, prefill-attention and KV-write kernels build. Skipped where Triton or its NVIDIA tools are missing.
"""

from __future__ import annotations

import importlib
import os
import re

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("the interpreter replaces compiled kernels", allow_module_level=True)
if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
    pytest.skip("Triton's NVIDIA backend tools are not installed", allow_module_level=True)

cl = importlib.import_module("colm.kernels.chain_linear")
hop = importlib.import_module("colm.kernels.chain_linear_hopper")
pa = importlib.import_module("colm.kernels.paged_attention")
pf = importlib.import_module("colm.kernels.prefill_attention")
off = importlib.import_module("colm.kernels._offline")

HOPPER_SMEM = 227 * 1024


def _gemm(kind, cfg, even=True, bias=False):
    common = dict(ALIGNED=True, UPCAST=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
    if kind == "fwd":
        sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "tab_ptr": "*i64", "M": "i32",
               "stride_xm": "i32", "stride_ym": "i32", "num_m_tiles": "i32", "num_n_tiles": "i32"}
        const = dict(HAS_BIAS=bias, EVEN_N=even, EVEN_K=even, GROUP=8, **common)
        fn, div = cl._chain_fwd_kernel, ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "tab_ptr", "stride_xm", "stride_ym")
    elif kind == "bwd_i":
        sig = {"dy_ptr": "*bf16", "w_ptr": "*bf16", "dx_ptr": "*bf16", "tile_ptr": "*i64", "chunk_ptr": "*i64",
               "chain_ptr": "*i64", "M": "i32", "stride_dym": "i32", "stride_dxm": "i32", "num_m_tiles": "i32",
               "num_n_tiles": "i32", "num_chunks": "i32", "num_chains": "i32"}
        const = dict(NESTED=cfg.nested, EVEN_N=even, EVEN_K=even, GROUP=8, **common)
        fn, div = cl._chain_bwd_input_kernel, ("dy_ptr", "w_ptr", "dx_ptr", "tile_ptr", "chunk_ptr", "chain_ptr",
                                               "stride_dym", "stride_dxm")
    else:
        sig = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "dw_ptr": "*bf16", "tab_ptr": "*i64", "M": "i32",
               "stride_dym": "i32", "stride_xm": "i32"}
        const = dict(EVEN_M=even, EVEN_N=even, **common)
        fn, div = cl._chain_bwd_weight_kernel, ("dy_ptr", "x_ptr", "dw_ptr", "tab_ptr", "stride_dym", "stride_xm")
    return off.compile_kernel(fn, sig, const, cfg.num_warps, cfg.num_stages, div)


@pytest.mark.parametrize("kind,cfg", [("fwd", cl.FWD_CONFIGS[0]), ("bwd_i", cl.BWD_INPUT_CONFIGS[0]),
                                      ("bwd_i", cl.BWD_INPUT_CONFIGS[1]), ("bwd_w", cl.BWD_WEIGHT_CONFIGS[0])])
def test_chain_linear_gemms_use_wgmma_without_spills(kind, cfg):
    k = _gemm(kind, cfg)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "Hopper tensor-core path missing"
    assert "cp.async.cg.shared.global" in ptx, "operands are not loaded by 16-byte async copies"
    assert "st.global.v4" in ptx, "epilogue stores are not vectorised"
    use = off.resource_usage(k)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, use
    assert k.metadata.shared <= HOPPER_SMEM


def test_chain_linear_masked_variants_compile():
    k = _gemm("fwd", cl.FWD_CONFIGS[1], even=False, bias=True)
    assert "wgmma.mma_async" in k.asm["ptx"]
    k = _gemm("bwd_w", cl.BWD_WEIGHT_CONFIGS[1], even=False)
    assert "wgmma.mma_async" in k.asm["ptx"]


def _fwd_variant(cfg, even=True, bias=False):
    """The forward's persistent (flat K-step loop) or TMA kernel, as chain_linear_forward launches it."""
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "tab_ptr": "*i64", "M": "i32"}
    const = dict(HAS_BIAS=bias, EVEN_N=even, EVEN_K=even, UPCAST=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, GROUP=8)
    if cfg.tma:
        sig.update(K_all="i32", N_all="i32")
        fn = hop._chain_fwd_tma_kernel
    else:
        const.update(ALIGNED=True, CHUNK=128)
        fn = hop._chain_fwd_persistent_kernel
    sig.update(stride_xm="i32", stride_ym="i32", num_m_tiles="i32", num_n_tiles="i32", num_programs="i32")
    div = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "tab_ptr", "stride_xm", "stride_ym")
    return off.compile_kernel(fn, sig, const, cfg.num_warps, cfg.num_stages, div)


HOPPER_FWD = [c for c in cl.FWD_CONFIGS if c.persistent or c.tma]


@pytest.mark.parametrize("cfg", HOPPER_FWD, ids=lambda c: f"{c.block_m}x{c.block_n}{'-persistent' * c.persistent}{'-tma' * c.tma}")
def test_chain_linear_hopper_forward_variants(cfg):
    if cfg.tma and not hop.HAS_TMA:
        pytest.skip("this Triton has no device-side tensor descriptors")
    k = _fwd_variant(cfg)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx, "Hopper tensor-core path missing"
    if cfg.tma:
        # loads: shared::cluster (Triton 3.6) or shared::cta (3.9) destination; stores: from shared::cta
        assert re.search(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx), "operands are not loaded by TMA"
        assert "cp.async.bulk.tensor.2d.global.shared::cta" in ptx, "the result is not stored by TMA"
    else:
        assert "cp.async.cg.shared.global" in ptx, "operands are not loaded by 16-byte async copies"
        assert "st.global.v4" in ptx, "epilogue stores are not vectorised"
    use = off.resource_usage(k)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, use
    assert k.metadata.shared <= HOPPER_SMEM


def test_chain_linear_hopper_masked_variants_compile():
    """Ragged chains with bias: per-tile x / y descriptors (TMA) or masked loads (persistent)."""
    for cfg in HOPPER_FWD:
        if cfg.tma and not hop.HAS_TMA:
            continue
        k = _fwd_variant(cfg, even=False, bias=True)
        assert "wgmma.mma_async" in k.asm["ptx"] and k.metadata.shared <= HOPPER_SMEM
        if cfg.tma or cfg.block_n == 128:  # 128x256 masked tiles spill a little, as the plain kernel's do
            assert off.resource_usage(k)["STACK"] == 0, cfg


gv = importlib.import_module("colm.kernels.chain_linear_gemv")


@pytest.mark.parametrize("cfg", gv.GEMV_CONFIGS, ids=lambda c: f"n{c.block_n}-k{c.block_k}-w{c.num_warps}")
@pytest.mark.parametrize("rows", [1, 8])
def test_chain_linear_gemv_compiles_without_spills(cfg, rows):
    """The few-row kernel at the block shape its launcher picks for ``rows``: 16-byte weight loads, no spills."""
    bm, bk = gv.launch_blocks(rows, cfg)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "tab_ptr": "*i64", "M": "i32",
           "stride_xm": "i32", "stride_ym": "i32", "glu_off": "i32"}
    for even, bias in ((True, False), (False, True)):
        const = dict(HAS_BIAS=bias, EVEN_N=even, EVEN_K=even, ALIGNED=True, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk)
        k = off.compile_kernel(gv._chain_gemv_kernel, sig, const, cfg.num_warps, cfg.num_stages,
                               ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "tab_ptr", "stride_xm", "stride_ym"))
        if even:
            assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", k.asm["ptx"]), "weights are not read in 16-byte loads"
        use = off.resource_usage(k)
        assert use["LOCAL"] == 0 and use["STACK"] == 0, (cfg, rows, even, use)


@pytest.mark.parametrize("cfg", gv.GEMV_CONFIGS_M1, ids=lambda c: f"n{c.block_n}-k{c.block_k}-w{c.num_warps}")
def test_chain_linear_gemv_with_pdl_reads_weights_before_the_wait(cfg):
    """Launched with PDL, the kernel's first weight piece is loaded before ``griddepcontrol.wait`` (so it is in
    flight while the previous kernel ends) and the input after it; it then lets its successor launch."""
    bm, bk = gv.launch_blocks(1, cfg)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "tab_ptr": "*i64", "M": "i32",
           "stride_xm": "i32", "stride_ym": "i32", "glu_off": "i32"}
    const = dict(HAS_BIAS=False, EVEN_N=True, EVEN_K=True, ALIGNED=True, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk,
                 USE_PDL=True)
    k = off.compile_kernel(gv._chain_gemv_kernel, sig, const, cfg.num_warps, cfg.num_stages,
                           ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "tab_ptr", "stride_xm", "stride_ym"), launch_pdl=True)
    ptx = k.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx[:wait]), "no weight load before the wait"
    assert "griddepcontrol.launch_dependents" in ptx[wait:]
    assert off.resource_usage(k)["LOCAL"] == 0


@pytest.mark.parametrize("cfg", gv.GEMV_CONFIGS_M1 + gv.GEMV_CONFIGS, ids=lambda c: f"n{c.block_n}-k{c.block_k}-w{c.num_warps}")
def test_chain_linear_gemv_with_the_gate_product_compiles_without_spills(cfg):
    """The down projection's launch that forms silu(gate) * up as it loads its input (GLU), with PDL at one row:
    no local memory, the weights still read before the wait, the gate and up halves after it."""
    bm, bk = gv.launch_blocks(1, cfg)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "tab_ptr": "*i64", "M": "i32",
           "stride_xm": "i32", "stride_ym": "i32", "glu_off": "i32"}
    const = dict(HAS_BIAS=False, EVEN_N=True, EVEN_K=True, ALIGNED=True, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk,
                 USE_PDL=True, GLU=True)
    k = off.compile_kernel(gv._chain_gemv_kernel, sig, const, cfg.num_warps, cfg.num_stages,
                           ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "tab_ptr", "stride_xm", "stride_ym", "glu_off"),
                           launch_pdl=True)
    ptx = k.asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx[:wait]), "no weight load before the wait"
    assert "ex2.approx" in ptx[wait:]  # the SiLU's exponential, on the loaded gate
    use = off.resource_usage(k)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, (cfg, use)


def test_decode_chain_kernels_wait_when_launched_with_pdl():
    """Every kernel of the decode step's chain that PDL may start early waits first; none waits without it."""
    sig = {"part_ptr": "*fp32", "out_ptr": "*bf16", "stride_ob": "i32", "stride_oh": "i32", "num_splits": "i32"}
    for pdl in (True, False):
        k = off.compile_kernel(pa._merge_splits_kernel, sig, dict(NUM_HEADS=32, HEAD_DIM=64, D_PAD=64, S_PAD=32,
                                                                  USE_PDL=pdl), 4, 1)
        ptx = k.asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == pdl
        if pdl:
            assert ptx.index("griddepcontrol.wait") < ptx.index("ld.global")


def test_paged_decode_kernels_compile():
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "bt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": "*bf16",
           "part_ptr": "*fp32", "map_ptr": "*i32", "qk_scale": "fp32", "stride_qb": "i32", "stride_qh": "i32", "stride_ob": "i32",
           "stride_oh": "i32", "stride_btb": "i32", "block_size": "i32", "num_splits": "i32", "fresh": "i32"}
    for split, head_map in ((False, False), (True, False), (True, True)):
        const = dict(NUM_KV=8, GROUP=4, GROUP_PAD=16, HEAD_DIM=64, D_PAD=64, BLOCK_T=64, SPLIT=split, UPCAST=False,
                     HEAD_MAP=head_map)
        k = off.compile_kernel(pa._paged_decode_kernel, sig, const, 4, 3, ("q_ptr", "k_ptr", "v_ptr", "out_ptr"))
        ptx = k.asm["ptx"]
        assert "cp.async.cg.shared.global" in ptx, "K/V gathers are not pipelined through async copies"
        assert off.resource_usage(k)["LOCAL"] == 0
    const = dict(NUM_KV=8, GROUP=4, GROUP_PAD=16, HEAD_DIM=64, D_PAD=64, BLOCK_T=64, SPLIT=True, UPCAST=False,
                 HEAD_MAP=True, USE_PDL=True, PRELOAD=True)
    k = off.compile_kernel(pa._paged_decode_kernel, sig, const, 4, 3, ("q_ptr", "k_ptr", "v_ptr", "out_ptr"),
                           launch_pdl=True)
    ptx = k.asm["ptx"]  # the first tile's K/V loads before the wait
    assert re.search(r"ld\.global(\.\w+)*\.b16|ld\.global(\.\w+)*\.v\d", ptx[:ptx.index("griddepcontrol.wait")])
    assert off.resource_usage(k)["LOCAL"] == 0
    k = off.compile_kernel(pa._merge_splits_kernel, {"part_ptr": "*fp32", "out_ptr": "*bf16", "stride_ob": "i32",
                                                    "stride_oh": "i32", "num_splits": "i32"},
                           dict(NUM_HEADS=32, HEAD_DIM=64, D_PAD=64, S_PAD=32), 4, 1)
    assert "st.global" in k.asm["ptx"]
    k = off.compile_kernel(pa._write_kv_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "k_pool_ptr": "*bf16",
                                                "v_pool_ptr": "*bf16", "slot_ptr": "*i64", "stride_kt": "i32",
                                                "stride_kh": "i32", "stride_vt": "i32", "stride_vh": "i32"},
                           dict(NUM_KV=8, HEAD_DIM=64, H_PAD=8, D_PAD=64), 1, 1)
    assert "st.global" in k.asm["ptx"]


@pytest.mark.parametrize("dtype,precision", [("bf16", None), ("fp32", "ieee")])
def test_paged_prefill_kernel_compiles(dtype, precision):
    """The colocated chunk's attention at its default launch (64-row tiles, 128 keys, 4 warps, 2 stages): bf16 on
    wgmma, float32 models with IEEE dots; nothing in local memory."""
    sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "o_ptr": f"*{dtype}", "pages_ptr": "*i64",
           "seg_ptr": "*i64", "tiles_ptr": "*i64", "sm_scale": "fp32", "stride_qn": "i32", "stride_qh": "i32",
           "stride_on": "i32", "stride_oh": "i32", "block_size": "i32"}
    const = dict(NUM_KV=8, GROUP=2, HEAD_DIM=64, D_PAD=64, BLOCK_M=pf.BLOCK_M, BLOCK_N=128, UPCAST=False,
                 PRECISION=precision)
    k = off.compile_kernel(pf._prefill_kernel, sig, const, 4, 2)
    assert ("wgmma.mma_async" in k.asm["ptx"]) == (dtype == "bf16")
    assert off.resource_usage(k)["LOCAL"] == 0
