"""Chain RMSNorm and RoPE: the Triton kernels vs the eager torch references, at 1B decode and prefill shapes.

Shapes (1B model, bf16): RMSNorm over width 2048 with chains {1024, 1024} and {512, 512, 512, 512},
rows 1 / 64 (decode) and 8192 / 32768 (prefill); RoPE on q [b, 32, t, 64] and k [b, 8, t, 64] as
``ChainAttention.project_qkv`` makes them (transposed views), decode b = 1 / 64 with t = 1 and prefill
b = 1 with t = 8192 / 32768 (the reference is two ``apply_rope_ref`` calls, ours one launch).

Columns: ``eager`` = ``triton.testing.do_bench`` median (L2 flushed, includes launch gaps); ``graph`` =
``do_bench_cudagraph`` (the kernels replayed from a CUDA graph, as decode runs them); GB/s from the
bytes each op must move (read x/q/k, cos/sin, weight; write the outputs); ``kernels`` = CUDA kernels one
call launches (torch profiler); ``exact`` = share of output elements equal to the reference's.

    python bench/norm_rope.py [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse

import torch

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
from colm.kernels.rmsnorm import chain_rmsnorm_ref, chain_rmsnorm_triton
from colm.kernels.rope import apply_rope_ref, rope_qk_triton
from colm.rope import rope_cos_sin

WIDTH, HQ, HKV, HD = 2048, 32, 8, 64
CHAINS = ([1024, 1024], [512, 512, 512, 512])
NORM_ROWS = (1, 64, 8192, 32768)
ROPE_CASES = ((1, 1), (64, 1), (1, 8192), (1, 32768))  # (batch, tokens)


def timings(fn, quick) -> tuple[float, float]:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    eager = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median")  # own stream
    return eager, graph


def kernel_count(fn) -> int:
    """CUDA kernels one call of ``fn`` launches (-1 where the profiler is unavailable)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception:  # pragma: no cover - CUPTI missing
        return -1
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def exact_share(out, ref) -> float:
    return (out == ref).float().mean().item()


def row(kind, shape, ours, ref, bytes_moved, quick, out, ref_out):
    ms, ms_g = timings(ours, quick)
    ms_ref, ms_ref_g = timings(ref, quick)
    r = {"op": kind, "shape": shape, "bytes": bytes_moved,
         "ms": ms, "ms_graph": ms_g, "ms_ref": ms_ref, "ms_ref_graph": ms_ref_g,
         "gbps": bytes_moved / ms / 1e6, "gbps_graph": bytes_moved / ms_g / 1e6,
         "speedup": ms_ref / ms, "speedup_graph": ms_ref_g / ms_g,
         "kernels": kernel_count(ours), "kernels_ref": kernel_count(ref),
         "exact": exact_share(out, ref_out),
         "max_abs_diff": (out.float() - ref_out.float()).abs().max().item()}
    print(f"{kind:7s} {shape:28s} ours {ms*1e3:8.1f}/{ms_g*1e3:8.1f} us  ref {ms_ref*1e3:8.1f}/{ms_ref_g*1e3:8.1f} us"
          f"  x{r['speedup_graph']:5.2f} (graph)  {r['gbps_graph']:6.0f} GB/s  kernels {r['kernels']}/{r['kernels_ref']}"
          f"  exact {r['exact']:.5f}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    rows = []
    with torch.no_grad():
        for chains in CHAINS:
            w = (1 + 0.3 * torch.randn(WIDTH, device="cuda")).to(dt)
            for n in NORM_ROWS:
                x = torch.randn(n, WIDTH, device="cuda", dtype=dt) * 3
                ours = lambda: chain_rmsnorm_triton(x, w, chains, 1e-5)  # noqa: E731
                ref = lambda: chain_rmsnorm_ref(x, w, chains, 1e-5)  # noqa: E731
                rows.append(row("rmsnorm", f"rows {n} chains {len(chains)}x{chains[0]}", ours, ref,
                                (2 * x.numel() + WIDTH) * 2, args.quick, ours(), ref()))
        inv = 1.0 / (500000.0 ** (torch.arange(0, HD, 2, device="cuda").float() / HD))
        for b, t in ROPE_CASES:
            pos = torch.arange(t, device="cuda").expand(b, t) + torch.randint(0, 4000, (b, 1), device="cuda")
            cos, sin = rope_cos_sin(inv, pos, dt)
            q = torch.randn(b, t, HQ * HD, device="cuda", dtype=dt).view(b, t, HQ, HD).transpose(1, 2)
            k = torch.randn(b, t, HKV * HD, device="cuda", dtype=dt).view(b, t, HKV, HD).transpose(1, 2)
            ours = lambda: rope_qk_triton(q, k, cos, sin)  # noqa: E731
            ref = lambda: (apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin))  # noqa: E731
            (oq, ok), (rq, rk) = ours(), ref()
            out = torch.cat([oq.flatten(), ok.flatten()])
            ref_out = torch.cat([rq.flatten(), rk.flatten()])
            bytes_moved = (2 * (q.numel() + k.numel()) + 2 * cos.numel()) * 2
            rows.append(row("rope_qk", f"b {b} t {t}", ours, ref, bytes_moved, args.quick, out, ref_out))
            del q, k, cos, sin
            torch.cuda.empty_cache()
    res = {**run_meta("norm_rope"),
           "shape": {"width": WIDTH, "chains": CHAINS, "q_heads": HQ, "kv_heads": HKV, "head_dim": HD, "dtype": "bfloat16"},
           "rows": rows, "timing": "ms: do_bench median (L2 flushed); ms_graph: do_bench_cudagraph median"}
    print(f"\n{'op':7s} {'shape':28s} {'ours us':>9s} {'ref us':>9s} {'graph ours':>10s} {'graph ref':>10s} "
          f"{'speedup(g)':>10s} {'GB/s(g)':>8s} {'kernels':>8s} {'exact':>8s}")
    for r in rows:
        print(f"{r['op']:7s} {r['shape']:28s} {r['ms']*1e3:9.1f} {r['ms_ref']*1e3:9.1f} {r['ms_graph']*1e3:10.1f} "
              f"{r['ms_ref_graph']*1e3:10.1f} {r['speedup_graph']:10.2f} {r['gbps_graph']:8.0f} "
              f"{r['kernels']:>3d}/{r['kernels_ref']:<4d} {r['exact']:8.5f}")
    write_result(res, "norm_rope", res["device"], res["date"], args.out)


if __name__ == "__main__":
    main()
