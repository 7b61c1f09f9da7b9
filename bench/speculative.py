"""Chain-1 self-speculative decoding vs plain full-scale decoding: acceptance per gamma and tokens/s, one run.

A ``DecodeEngine`` and an in-process ``PrefillEngine`` of one checkpoint (the bundled demo by default: a
trained byte-level CoLM-Air {4,4}; or a random-weight preset, where acceptance says nothing about a trained
model but the cost of a round does). Prompts are slices of real text (``pydoc_data.topics``). For each batch
size (default 1 and 8) the same prompts are decoded greedily at full scale, plainly and with gamma drafts per
round, and the run checks the tokens are identical. Per setting: decode tokens/s (from the first token to the
last, all requests of the batch started together), the acceptance rate (accepted drafts / drafted), tokens
per round, and the ratio to plain decoding. The draft step's and the verify forward's cost are timed alone at
batch 1, which says what a round costs against the tokens it yields.

    python bench/speculative.py                                  # demo model, CPU or the GPU there is
    python bench/speculative.py --preset llama-3.2-1b-16-16-air --dtype bfloat16 --out $OUT/speculative.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def text_prompts(n: int, length: int) -> list[list[int]]:
    import pydoc_data.topics as t

    text = "".join(t.topics[k] for k in sorted(t.topics))
    data = list(text.encode("utf-8"))
    step = max(1, (len(data) - length) // max(1, n))
    return [data[i * step: i * step + length] for i in range(n)]


def run_batch(de, pe, prompts, max_new: int, scale: int, gamma: int, tag: str) -> dict:
    from colm.prefill_worker.sinks import LocalKVSink
    from colm.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    before = de.stats()
    captured = sum(x.num_captures for x in (de.graphs, de.verify_graphs) if x is not None)
    streams = []
    for i, p in enumerate(prompts):
        rid = f"{tag}-{i}"
        de.reserve(rid, len(p), max_new)
        pe.prefill(rid, p, LocalKVSink(de, rid))  # KV in place before any request starts: decode is timed alone
    for i, p in enumerate(prompts):
        streams.append(de.start_generation(f"{tag}-{i}", p[-1], params, scale=scale, speculative=gamma))
    first, tokens = [], []
    for st in streams:
        evs = []
        for ev in st:
            evs.append((ev.token_id, time.perf_counter()))
        tokens.append([t for t, _ in evs])
        first.append(evs[0][1])
    end = time.perf_counter()
    after = de.stats()
    captures = sum(x.num_captures for x in (de.graphs, de.verify_graphs) if x is not None) - captured
    n_tok = sum(len(t) - 1 for t in tokens)  # after each request's first token
    drafted = after.num_drafted - before.num_drafted
    accepted = after.num_draft_accepted - before.num_draft_accepted
    return {"tokens": tokens, "decode_tokens_per_s": n_tok / (end - min(first)), "drafted": drafted,
            "accepted": accepted, "acceptance": accepted / drafted if drafted else None,
            "steps": after.num_steps - before.num_steps, "captures": captures}


def time_parts(de, scale: int, gamma: int, reps: int, profile: bool = False) -> dict:
    """Batch 1: one plain scale-k step, one scale-1 draft step (read alone; and per step of gamma queued ones), one
    verify over gamma + 1 positions (ms)."""
    from colm.decode_worker.speculative import draft, draft_greedy, verify
    from colm.decode_worker.step import decode_step
    from colm.sampling import SamplingParams

    class Row:  # what a step reads of a request
        def __init__(self, blocks):
            self.blocks, self.num_cached, self.next_input = blocks, 64, 5
            self.params = SamplingParams(max_new_tokens=8)

    blocks = de.pool.allocate(-(-(64 + gamma + 2) // de.pool.block_size))
    row = Row(blocks)
    sync = torch.cuda.synchronize if de.device.type == "cuda" else (lambda: None)

    def timed(fn):
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) * 1e3 / reps

    from colm.decode_worker.verify_graphs import VerifyGraphs

    def graphs_for(kind: str):  # the engine's verify graphs when they are of this kind, else a set of their own
        if de.verify_graphs is None:
            return None
        own = de.verify_graphs.paged == (kind == "paged")
        return de.verify_graphs if own else VerifyGraphs(de.model, de.pool, 1, de.cfg.max_seq_len, attention=kind)

    gather, paged = graphs_for("gather"), graphs_for("paged")
    out = {"plain_step_ms": timed(lambda: decode_step(de.model, [row], de.pool, [scale], graphs=de.graphs)),
           "draft_step_ms": timed(lambda: draft(de.model, [row], de.pool, 1, de.graphs)),
           # gamma greedy drafts queued back to back (what a greedy round runs), per draft
           "queued_draft_step_ms": timed(lambda: draft_greedy(de.model, [row], de.pool, gamma, de.graphs)) / gamma,
           "verify_ms": timed(lambda: verify(de.model, [row], de.pool, [[7] * gamma], scale, gather)),
           "verify_eager_ms": timed(lambda: verify(de.model, [row], de.pool, [[7] * gamma], scale)),
           # the same verify with each query a paged decode row (DecodeConfig.verify_attention: paged)
           "verify_paged_ms": timed(lambda: verify(de.model, [row], de.pool, [[7] * gamma], scale, paged, "paged")),
           "verify_paged_eager_ms": timed(lambda: verify(de.model, [row], de.pool, [[7] * gamma], scale, None,
                                                         "paged"))}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if de.device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for _ in range(5):
                verify(de.model, [row], de.pool, [[7] * gamma], scale)
            sync()
        sort = "cuda_time_total" if de.device.type == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=25)
        print(f"verify profile (5 calls, gamma {gamma}):\n{table}")
        out["verify_profile"] = table
    de.pool.free(blocks)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="a checkpoint directory, or 'demo' (the bundled model)")
    ap.add_argument("--preset", default=None, help="a random-weight preset instead of --model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: the checkpoint's (bfloat16 for a preset on CUDA)")
    ap.add_argument("--gammas", default="1,2,4,8")
    ap.add_argument("--verify-attention", default="paged", choices=("gather", "paged"),
                    help="DecodeConfig.verify_attention of the rounds (the batch-1 parts time both)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of the verify forward (batch 1)")
    args = ap.parse_args()

    from colm.commands.common import resolve_model_dir
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.kv_wire import parse_dtype
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine

    if args.preset:
        from serve_goodput import build_checkpoint

        dtype = parse_dtype(args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
        ckpt = build_checkpoint(args.preset, dtype, args.device)
    else:
        ckpt = str(resolve_model_dir(args.model))
        dtype = parse_dtype(args.dtype) if args.dtype else None
    cuda = args.device == "cuda"
    de = DecodeEngine.from_checkpoint(ckpt, DecodeConfig(num_blocks=4096, block_size=16, max_batch_size=64,
                                                         cuda_graphs=cuda, warmup_context=0,
                                                         verify_attention=args.verify_attention),
                                      device=args.device, dtype=dtype).start()
    pe = PrefillEngine.from_checkpoint(ckpt, PrefillConfig(), device=args.device, dtype=dtype)
    cfg = de.cfg
    full = cfg.num_chains
    gammas = [int(g) for g in args.gammas.split(",")]
    rows = []
    try:
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = text_prompts(b, args.prompt_len)
            # Graph captures and tunings happen here: the warm runs reach every context width the timed runs reach
            # (graphs are keyed by width buckets, so warm runs shorter than the timed ones left captures inside them)
            run_batch(de, pe, prompts, args.max_new, full, 0, f"warm{b}")
            for g in gammas:
                run_batch(de, pe, prompts, args.max_new, full, g, f"warm{b}g{g}")
            plain = run_batch(de, pe, prompts, args.max_new, full, 0, f"plain{b}")
            for g in gammas:
                spec = run_batch(de, pe, prompts, args.max_new, full, g, f"spec{b}g{g}")
                rows.append({"batch": b, "gamma": g, "identical": spec["tokens"] == plain["tokens"],
                             "acceptance": spec["acceptance"],
                             # drafted / g rounds per request-round (fewer drafts near max_new_tokens: close)
                             "tokens_per_round": spec["accepted"] / (spec["drafted"] / g) + 1 if spec["drafted"] else None,
                             "plain_tokens_per_s": plain["decode_tokens_per_s"],
                             "spec_tokens_per_s": spec["decode_tokens_per_s"],
                             "speedup": spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
                             "captures_while_timed": plain["captures"] + spec["captures"]})
        parts = {g: time_parts(de, full, g, args.reps, args.profile and g == gammas[-1]) for g in gammas}
    finally:
        de.stop()
    dev = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    payload = {"benchmark": "speculative", "device": dev, "torch": torch.__version__,
               "python": platform.python_version(), "date": datetime.date.today().isoformat(),
               "model": args.preset or args.model, "dtype": str(de.dtype).replace("torch.", ""),
               "chains": list(cfg.chains), "num_params": cfg.num_params(full), "num_params_chain1": cfg.num_params(1),
               "prompt_len": args.prompt_len, "max_new_tokens": args.max_new, "cuda_graphs": cuda,
               "verify_attention": args.verify_attention,
               "rows": rows, "batch1_parts_ms": parts}
    print(f"{'batch':>5} {'gamma':>5} {'same':>5} {'accept':>7} {'tok/round':>9} {'plain tok/s':>12} "
          f"{'spec tok/s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['gamma']:>5} {str(r['identical']):>5} {r['acceptance'] or 0:>7.3f} "
              f"{r['tokens_per_round'] or 0:>9.2f} {r['plain_tokens_per_s']:>12.1f} {r['spec_tokens_per_s']:>11.1f} "
              f"{r['speedup']:>6.2f}")
    for g, p in parts.items():
        print(f"batch 1, gamma {g}: plain step {p['plain_step_ms']:.3f} ms, draft step {p['draft_step_ms']:.3f} ms "
              f"(queued {p['queued_draft_step_ms']:.3f}), "
              # verify_profile (with --profile) is in the JSON
              f"verify {p['verify_ms']:.3f} ms (eager {p['verify_eager_ms']:.3f} ms), paged verify "
              f"{p['verify_paged_ms']:.3f} ms (eager {p['verify_paged_eager_ms']:.3f} ms)")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
