"""Paged decode attention vs SDPA on contiguous caches, as achieved HBM bandwidth against the copy
ceiling measured in the same run.

Shapes: Llama-3.2-1B heads (32 query heads, 8 KV heads, head_dim 64), bf16, batch {1, 8, 64} ×
context {2K, 8K, 32K}, KV blocks of 16 tokens scattered at random through the pool. Bytes counted:
every context token's K and V once, plus q, out and the block table. The copy ceiling is a large
device-to-device copy (bytes read + bytes written). Times are medians of CUDA-event timings
(``triton.testing.do_bench``, L2 flushed between runs), random data.

    python bench/paged_attention.py [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
from colm.kernels.paged_attention import paged_decode_attention_triton, write_kv_to_pool_triton

HQ, HKV, D, BLOCK = 32, 8, 64, 16
BATCHES = (1, 8, 64)
CONTEXTS = (2048, 8192, 32768)
SWEEP = [  # launch variants tried at the target point (batch 64 x 8K)
    {"block_t": 64, "num_warps": 4, "num_stages": 3},
    {"block_t": 128, "num_warps": 4, "num_stages": 3},
    {"block_t": 128, "num_warps": 8, "num_stages": 3},
    {"block_t": 64, "num_warps": 4, "num_stages": 4},
    {"block_t": 32, "num_warps": 2, "num_stages": 4},
    {"block_t": 64, "num_warps": 4, "num_stages": 3, "num_splits": 2},
    {"block_t": 128, "num_warps": 4, "num_stages": 2, "num_splits": 2},
]


def bench(fn, quick):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=50 if quick else 200, return_mode="median")


def copy_ceiling(quick) -> float:
    src = torch.randn(2 * 1024**3 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), quick)
    bw = 2 * src.numel() * 2 / ms / 1e6  # GB/s, read + write
    del src, dst
    return bw


def make_case(batch, ctx, dtype=torch.bfloat16):
    per_seq = ctx // BLOCK
    num_blocks = batch * per_seq
    k_pool = torch.randn(num_blocks, BLOCK, HKV, D, device="cuda", dtype=dtype)
    v_pool = torch.randn(num_blocks, BLOCK, HKV, D, device="cuda", dtype=dtype)
    tables = torch.randperm(num_blocks, device="cuda").int().view(batch, per_seq)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=dtype)
    return q, k_pool, v_pool, tables, lens


def graph_split_sweep(quick) -> list[dict]:
    """Batch-1/8 decode as the engine runs it: 16 layers' calls (each its own pool, as in the model)
    captured in one CUDA graph, with CoLM-Air's head map, for a range of ``num_splits`` (None = the
    default heuristic). Per-call time = replay time / 16 (CUDA events, median)."""
    from colm.attention import query_head_order
    from colm.kernels._tuning import graph_time_ms
    from colm.presets import preset

    order = query_head_order(preset("llama-3.2-1b-16-16-air"), 2)[0]
    head_map = torch.tensor(order, device="cuda", dtype=torch.int32)
    out = []
    for batch, ctx in ((1, 2048), (1, 8192), (8, 2048)):
        cases = [make_case(batch, ctx) for _ in range(16)]
        for splits in (None, 1, 2, 4, 8, 16, 32, 64):
            launch = None if splits is None else {"num_splits": splits}

            def layers():
                for q, kp, vp, bt, cl in cases:
                    paged_decode_attention_triton(q, kp, vp, bt, cl, launch=launch, head_map=head_map)

            ms = graph_time_ms(layers, replays=10 if quick else 50, calls=1) / 16  # one graph of 16 layers' calls
            row = {"batch": batch, "context": ctx, "num_splits": splits or "default", "ms_per_layer": ms}
            out.append(row)
            print(f"graph sweep B={batch} ctx={ctx} splits={row['num_splits']}: {row['ms_per_layer'] * 1e3:.2f} us/layer",
                  flush=True)
        del cases
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--graph-sweep-only", action="store_true", help="only the batch-1/8 in-graph num_splits sweep")
    args = ap.parse_args()
    torch.manual_seed(0)
    graph_sweep = graph_split_sweep(args.quick)
    if args.graph_sweep_only:
        meta = run_meta("paged_attention_graph_sweep")
        write_result({**meta, "rows": graph_sweep}, meta["benchmark"], meta["device"], meta["date"], args.out)
        return
    ceiling = copy_ceiling(args.quick)
    print(f"copy ceiling {ceiling:.0f} GB/s", flush=True)
    rows, sweep = [], []
    for batch in BATCHES:
        for ctx in CONTEXTS:
            q, kp, vp, bt, cl = make_case(batch, ctx)
            kv_bytes = 2 * batch * ctx * HKV * D * kp.element_size()
            bytes_moved = kv_bytes + 2 * q.numel() * q.element_size() + bt.numel() * 4
            out = paged_decode_attention_triton(q, kp, vp, bt, cl)
            # contiguous caches for SDPA: [B, Hkv, ctx, D], gathered in sequence order
            k_c = kp[bt.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
            v_c = vp[bt.long()].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
            q4 = q[:, :, None, :]
            sdpa = lambda: F.scaled_dot_product_attention(q4, k_c, v_c, enable_gqa=True)  # noqa: E731
            ref = sdpa()[:, :, 0].float()
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = bench(lambda: paged_decode_attention_triton(q, kp, vp, bt, cl), args.quick)
            ms_sdpa = bench(sdpa, args.quick)
            row = {"batch": batch, "context": ctx, "ms": ms, "ms_sdpa": ms_sdpa, "bytes": bytes_moved,
                   "gbps": bytes_moved / ms / 1e6, "gbps_sdpa": bytes_moved / ms_sdpa / 1e6,
                   "frac_of_copy": bytes_moved / ms / 1e6 / ceiling, "frac_of_copy_sdpa": bytes_moved / ms_sdpa / 1e6 / ceiling,
                   "speedup_vs_sdpa": ms_sdpa / ms, "rel_err_vs_sdpa": err}
            rows.append(row)
            print(f"B={batch:3d} ctx={ctx:6d} ours {ms:8.4f} ms {row['gbps']:6.0f} GB/s ({row['frac_of_copy']:.2f} of copy)"
                  f" | sdpa {ms_sdpa:8.4f} ms ({row['frac_of_copy_sdpa']:.2f}) | err {err:.1e}", flush=True)
            if batch == 64 and ctx == 8192:
                for launch in SWEEP:
                    t = bench(lambda: paged_decode_attention_triton(q, kp, vp, bt, cl, launch=launch), args.quick)
                    sweep.append({"launch": launch, "ms": t, "frac_of_copy": bytes_moved / t / 1e6 / ceiling})
            del k_c, v_c, kp, vp
            torch.cuda.empty_cache()
    # KV write: 64 sequences x one token, and a 4096-token prefill chunk
    write = []
    for t in (64, 4096):
        kp = torch.randn(4096, BLOCK, HKV, D, device="cuda", dtype=torch.bfloat16)
        vp = torch.randn_like(kp)
        k = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        slots = torch.randperm(4096 * BLOCK, device="cuda")[:t]
        write.append({"tokens": t, "ms": bench(lambda: write_kv_to_pool_triton(k, v, kp, vp, slots), args.quick)})
    res = {**run_meta("paged_attention"),
           "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "block_size": BLOCK, "dtype": "bfloat16"},
           "copy_ceiling_gbps": ceiling, "rows": rows, "graph_split_sweep": graph_sweep, "launch_sweep_b64_ctx8k": sweep, "write_kv": write,
           "timing": "triton.testing.do_bench median, L2 flushed, CUDA events"}
    print(f"\n{'batch':>5s} {'ctx':>6s} {'ours ms':>9s} {'GB/s':>6s} {'/copy':>6s} {'sdpa ms':>9s} {'GB/s':>6s} {'/copy':>6s} {'speedup':>7s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['context']:6d} {r['ms']:9.4f} {r['gbps']:6.0f} {r['frac_of_copy']:6.2f} "
              f"{r['ms_sdpa']:9.4f} {r['gbps_sdpa']:6.0f} {r['frac_of_copy_sdpa']:6.2f} {r['speedup_vs_sdpa']:7.2f}")
    for s in sweep:
        print(f"sweep b64x8k {s['launch']}: {s['ms']:.4f} ms, {s['frac_of_copy']:.2f} of copy")
    print(f"copy ceiling {ceiling:.0f} GB/s; write_kv " + ", ".join(f"{w['tokens']} tok {w['ms']*1e3:.1f} us" for w in write))
    write_result(res, "paged_attention", res["device"], res["date"], args.out)


if __name__ == "__main__":
    main()
