"""GPU benchmark of the serving engines, in three sections (one JSON each under ``--out``):

* prefill: chain-1 prefill (PrefillEngine, K/V emitted) vs the full model's prefill of the same
  CoLM-Air model (eager, and from CUDA graphs up to 4K tokens: ``colm.graphed_forward``) vs HF transformers'
  LlamaModel of the 1B shape, at 2K/8K/32K (+128K chunked).
* handoff: TTFT of an 8K prompt through prefill -> KV transfer -> first token, per path (in-process
  device copy, gRPC bytes, shared memory, cuda_ipc, cuda_pool), vs chain-1 prefill compute alone;
  stream GB/s. The remote paths run both gRPC servers in this process (cuda_ipc then hands the staging
  tensor over directly, cuda_pool writes the registered pool: CUDA IPC cannot open a handle in its own
  process); ``cuda_ipc_proc`` / ``cuda_pool_proc`` run decode in a spawned child on the same GPU, the
  real CUDA IPC paths (measured in turns, with the chain-1 compute timed again around them). The in-process path also reports where its
  time goes (``local_breakdown_ms``: perf_counter stamps from submit), each remote path its timeline
  (``<path>_timeline_ms``: client, prefill and decode milestones on the host's monotonic clock).
* handoff_ready: the router's TTFT of the 8K prompt on cuda_pool, both workers in children and the prefill
  graphed, with each ``DecodeConfig.kv_ready_wait`` ("sender" waits for its writes before KVEnd; "host" sends
  KVEnd with a CUDA IPC ready event that decode polls), one decode child switched between them turn by turn,
  vs the compute alone timed in the prefill child. From the requests' timelines (one host clock) also the
  hand-off between the engines (prefill worker has the prompt -> decode worker has the first token, and -> the
  token at the client), and the router's Stats round trip to each worker (the Python gRPC floor of a hop).
* handoff_transports: the router's TTFT of the 8K prompt, both workers in children (prefill graphed), per transport
  into decode's VRAM pool (cuda_pool, nixl VRAM -> VRAM, grpc bytes), in turns with the compute alone.
* decode: tokens/s of the decode engine (CUDA graphs; eager side by side at batch 1 and 64) at batch
  1/8/64, context 2K, full scale and scale 1, mixed scales in both modes, vs HF ``generate`` on the
  same shape; batch-1 step vs the weight-read floor.

Random bf16 weights, random tokens; times are medians of synchronised runs after warm-up.
Usage: python bench/engines.py --out DIR [--sections prefill,handoff,handoff_ready,handoff_transports,decode] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
import traceback
from pathlib import Path

import torch

DEV = "cuda"
DT = torch.bfloat16


def timed(fn, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def colm_model(name, scale=None):
    from colm.model import CoLM
    from colm.presets import preset

    cfg = preset(name)
    if scale is not None:
        cfg = cfg.sub_config(scale)
    return CoLM(cfg, device=DEV, dtype=DT).reset_parameters(std=0.02, seed=0).eval()


def hf_llama(cfg, causal_lm=False):
    from transformers import LlamaForCausalLM, LlamaModel

    from _hf_backend import llama_config  # bench/ is sys.path[0] when a bench runs as a script

    cls = LlamaForCausalLM if causal_lm else LlamaModel
    with torch.device(DEV):
        m = cls(llama_config(cfg)).to(DT).eval()
    return m


def free():
    gc.collect()
    torch.cuda.empty_cache()


def guard(results, key, fn):
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001 - a failed cell is reported, the sweep goes on
        results[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        traceback.print_exc()
        free()


# ------------------------------------------------------------------------------------------ prefill
@torch.no_grad()
def bench_prefill(quick):
    from colm.graphed_forward import GraphedForward
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine
    from colm.prefill_worker.sinks import NullKVSink
    from colm.presets import preset

    lengths = [2048, 8192] if quick else [2048, 8192, 32768]
    out = {"lengths": lengths, "models": {}}
    hf = hf_llama(preset("llama-3.2-1b-16-16-air"))
    hf_ms = {}
    for T in lengths:
        ids = torch.randint(0, 128000, (1, T), device=DEV)
        guard(hf_ms, T, lambda: timed(lambda: hf(input_ids=ids, use_cache=False), reps=3 if T > 8192 else 5))
    out["hf_llama_ms"] = hf_ms
    del hf
    free()
    for name in ("llama-3.2-1b-16-16-air", "llama-3.2-1b-8-8-8-8-air"):
        row = {"full_ms": {}, "full_graphs_ms": {}, "chain1_engine_ms": {}, "chain1_engine_eager_ms": {},
               "chain1_hidden_ms": {}}
        full = colm_model(name)
        graphed = GraphedForward(full, max_tokens=4096)  # the full forward from CUDA graphs (Score's, opt-in)
        for T in lengths:
            ids = torch.randint(0, 128000, (1, T), device=DEV)
            guard(row["full_ms"], T, lambda: timed(lambda: full.hidden(ids), reps=3 if T > 8192 else 5))
            if graphed.fits(1, T):
                guard(row["full_graphs_ms"], T, lambda: timed(lambda: graphed.hidden(ids), reps=5))
            guard(row["chain1_hidden_ms"], T, lambda: timed(lambda: full.hidden(ids, scale=1), reps=3 if T > 8192 else 5))
        cfg = full.cfg
        del full, graphed
        free()
        sub = colm_model(name, scale=1)
        # the engine with CUDA graphs for prompts of up to 4096 tokens (PrefillConfig.cuda_graph_tokens) and eager,
        # side by side; the chain-1 vs full speed-up compares eager with eager
        eng = PrefillEngine(sub, cfg, PrefillConfig(chunk_size=32768, max_batch_tokens=32768, cuda_graph_tokens=4096))
        eng_eager = PrefillEngine(sub, cfg, PrefillConfig(chunk_size=32768, max_batch_tokens=32768, cuda_graph_tokens=0))
        for T in lengths:
            toks = torch.randint(0, 128000, (T + 1,)).tolist()  # +1: the engine emits K/V of all but the last
            for key, e in (("chain1_engine_ms", eng), ("chain1_engine_eager_ms", eng_eager)):
                guard(row[key], T, lambda: timed(lambda: e.prefill("b", toks, NullKVSink()), reps=3 if T > 8192 else 5))
        row["chain1_graph_captures"] = eng.graphs.num_captures if eng.graphs is not None else 0
        if not quick:
            eng128 = PrefillEngine(sub, cfg, PrefillConfig(chunk_size=16384, max_batch_tokens=16384))
            toks = torch.randint(0, 128000, (131072,)).tolist()
            torch.cuda.reset_peak_memory_stats()
            guard(row, "chain1_engine_128k_chunked_ms", lambda: timed(lambda: eng128.prefill("b", toks, NullKVSink()),
                                                                      reps=2, warmup=1))
            row["chain1_128k_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["speedup_chain1_vs_full"] = {T: _ratio(row["full_ms"].get(T), row["chain1_engine_eager_ms"].get(T))
                                         for T in lengths}
        row["chain1_graph_speedup"] = {T: _ratio(row["chain1_engine_eager_ms"].get(T), row["chain1_engine_ms"].get(T))
                                       for T in lengths}
        row["full_vs_hf"] = {T: _ratio(row["full_ms"].get(T), hf_ms.get(T)) for T in lengths}
        row["full_graphs_vs_hf"] = {T: _ratio(row["full_graphs_ms"].get(T), hf_ms.get(T)) for T in row["full_graphs_ms"]}
        # The paper's comparison (Table 10: its baseline row is the dense LLama-3.2-1B, whose prefill HF's LlamaModel
        # runs here): dense model's prefill time over the chain-1 engine's, eager and with the engine's graphs
        row["speedup_chain1_vs_hf"] = {T: _ratio(hf_ms.get(T), row["chain1_engine_eager_ms"].get(T)) for T in lengths}
        row["speedup_chain1_graphs_vs_hf"] = {T: _ratio(hf_ms.get(T), row["chain1_engine_ms"].get(T)) for T in lengths}
        out["models"][name] = row
        del sub, eng, eng_eager
        free()
    return out


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) else None


# ------------------------------------------------------------------------------------------ handoff
@torch.no_grad()
def bench_handoff(quick):
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.decode_worker.service import DecodeServer
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine
    from colm.prefill_worker.service import PrefillServer
    from colm.prefill_worker.sinks import LocalKVSink
    from colm.proto import load_proto
    from colm.proto.rpc import auth_metadata, make_channel
    from colm.sampling import SamplingParams

    kv_pb2, kv_pb2_grpc = load_proto("kv")
    name, T = "llama-3.2-1b-16-16-air", 8192
    full = colm_model(name)
    sub = colm_model(name, scale=1)
    de = DecodeEngine(full, DecodeConfig(num_blocks=2048, block_size=16)).start()
    pe = PrefillEngine(sub, full.cfg, PrefillConfig(chunk_size=8192, max_batch_tokens=8192)).start()
    prompt = torch.randint(0, 128000, (T,)).tolist()
    params = SamplingParams(max_new_tokens=1)
    out = {"prompt_tokens": T, "kv_bytes": full.cfg.n_layers * (T - 1) * 2 * full.cfg.n_kv_heads * full.cfg.head_dim * 2}
    out["chain1_compute_ms"] = _compute_alone_ms(pe, prompt, reps=5)
    n = [0]

    def local():
        n[0] += 1
        rid = f"l{n[0]}"
        de.reserve(rid, T, 1)
        pe.submit(rid, prompt, LocalKVSink(de, rid))
        return next(iter(de.start_generation(rid, prompt[-1], params, scale=2)))

    out["local_ttft_ms"] = timed(local, reps=5)
    out["local_breakdown_ms"] = local_breakdown(pe, de, prompt, params, n)
    print("local hand-off, ms from submit (medians):", json.dumps(out["local_breakdown_ms"]), flush=True)
    token = "bench"
    ds = DecodeServer(de, token)
    ds.server.start()
    ps = PrefillServer(pe, token)
    ps.server.start()
    md = auth_metadata(token)
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(ds.address))
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(ps.address))
    def measure(path, d, address, reps=3, p=p, suffix="", timelines=None, concurrent=False, key=None):
        """``concurrent``: Prefill goes out before Reserve, as the router sends them on the cuda_pool path.
        ``key``: the results' key prefix (default: the path, ``_proc`` when decode is not the in-process one)."""
        replies, timelines = [], [] if timelines is None else timelines

        def remote():
            n[0] += 1
            rid = f"r{n[0]}"
            th = threading.Thread(target=lambda: replies.append(p.Prefill(kv_pb2.PrefillRequest(
                request_id=rid, token_ids=prompt, decode_address=address, same_host=path != "grpc", path=path),
                metadata=md, timeout=60)))
            t0 = time.monotonic()
            if concurrent:
                th.start()
            d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=T, max_new_tokens=1), metadata=md, timeout=30)
            client = {"reserve_replied": time.monotonic()}
            if not concurrent:
                th.start()
            req = kv_pb2.StartGenerationRequest(request_id=rid, last_token_id=prompt[-1], scale=2,
                                                sampling=kv_pb2.DecodeSampling(max_new_tokens=1))
            client["start_sent"] = time.monotonic()
            ev = next(iter(d.StartGeneration(req, metadata=md, timeout=60)))
            client["first_token"] = time.monotonic()
            th.join()
            timelines.append(merged_timeline(t0, client, replies[-1], ev))
            return ev

        key = key or (path if address == ds.address else f"{path}_proc") + suffix
        guard(out, f"{key}_ttft_ms", lambda: timed(remote, reps=reps))
        if replies:
            r = replies[-1]
            out[f"{key}_path"] = r.path
            out[f"{key}_stream_total_ms"] = r.total_ms
            out[f"{key}_stream_gb_s"] = r.num_bytes / (r.total_ms / 1000) / 1e9
        if len(timelines) > 1:  # the first (warm-up) run left out
            out[f"{key}_timeline_ms"] = median_timeline(timelines[1:])
            print(f"{key} hand-off, ms from Reserve (medians):", json.dumps(
                {k: round(v, 2) for k, v in out[f"{key}_timeline_ms"].items()}), flush=True)

    for path in ("grpc", "shm", "cuda_ipc", "cuda_pool"):
        measure(path, d, ds.address)

    def in_child():
        from colm.decode_worker.spawn import DecodeProcess

        with DecodeProcess(_bench_decode_engine, (name,), token) as child:
            stub = kv_pb2_grpc.DecodeWorkerStub(make_channel(child.address))
            # the denominator again, with the gRPC servers, the idle in-process decode engine and the child up
            computes = [_compute_alone_ms(pe, prompt, reps=5)]
            # cuda_ipc and cuda_pool after Reserve, and cuda_pool sent with Reserve (the router's way on this path)
            variants = {"cuda_ipc": ("cuda_ipc", "", False), "cuda_pool": ("cuda_pool", "", False),
                        "cuda_pool_concurrent": ("cuda_pool", "_concurrent", True)}
            ttfts = {v: [] for v in variants}
            timelines = {v: [] for v in variants}
            for _ in range(3):  # in turns, so that drift on the shared machine hits every variant alike
                for v, (path, suffix, conc) in variants.items():
                    measure(path, stub, child.address, reps=3, suffix=suffix, timelines=timelines[v], concurrent=conc)
                    ttfts[v].append(out[f"{path}_proc{suffix}_ttft_ms"])
                computes.append(_compute_alone_ms(pe, prompt, reps=3))
            record_turns(out, {f"{path}_proc{suffix}": ttfts[v] for v, (path, suffix, _) in variants.items()})
            record_turns(out, {"chain1_compute_servers_up": computes}, unit="ms")
        return True

    guard(out, "cuda_proc_ran", in_child)

    def in_children(graphs):
        """Prefill and decode each in a child process, only the client here (as with the router): turns of the
        prefill engine's compute alone (timed in its child) and each hand-off's TTFT, so drift hits all alike.
        ``graphs``: the prefill child replays a CUDA graph of the 8K forward (PrefillConfig.cuda_graph_tokens)."""
        from colm.decode_worker.spawn import DecodeProcess
        from colm.prefill_worker.spawn import PrefillProcess

        tag = "graphs_" if graphs else ""
        with PrefillProcess(_bench_prefill_engine, (name, T if graphs else 0), token) as pc, \
                DecodeProcess(_bench_decode_engine, (name,), token) as dc:
            stub_d = kv_pb2_grpc.DecodeWorkerStub(make_channel(dc.address))
            stub_p = kv_pb2_grpc.PrefillWorkerStub(make_channel(pc.address))
            v_sync = f"cuda_pool_procs_{tag}concurrent"  # the bench's own client, with the merged timeline
            routers = {f"router_{tag}cuda_pool": "cuda_pool", f"router_{tag}cuda_ipc": "cuda_ipc"}
            ttfts = {v: [] for v in [v_sync, *routers]}
            timelines = []
            computes = []
            for _ in range(5):
                computes.append(pc.call(_compute_alone_ms, prompt, 3))
                measure("cuda_pool", stub_d, dc.address, reps=3, p=stub_p, timelines=timelines, concurrent=True, key=v_sync)
                ttfts[v_sync].append(out[f"{v_sync}_ttft_ms"])
                for v, kv_path in routers.items():
                    ttfts[v].append(router_ttft_ms(pc.address, dc.address, token, kv_path, prompt, reps=3))
            computes.append(pc.call(_compute_alone_ms, prompt, 3))
            record_turns(out, {f"procs_{tag}chain1_compute": computes}, unit="ms")
            record_turns(out, ttfts)
            for v, vals in ttfts.items():
                record_ratio_turns(out, v, vals, computes)
                out[f"{v}_ttft_over_compute"] = out[f"{v}_ttft_ms"] / out[f"procs_{tag}chain1_compute_ms"]
            print(f"both workers in children ({'graphs' if graphs else 'eager'} prefill): compute alone",
                  [round(c, 2) for c in computes], "ms;",
                  {v: round(out[f"{v}_ttft_over_compute"], 3) for v in ttfts}, flush=True)
        return True

    guard(out, "procs_ran", lambda: in_children(False))
    guard(out, "procs_graphs_ran", lambda: in_children(True))
    for k in ("local", "grpc", "shm", "cuda_ipc", "cuda_pool", "cuda_ipc_proc", "cuda_pool_proc",
              "cuda_pool_proc_concurrent"):
        v = out.get(f"{k}_ttft_ms")
        if isinstance(v, float):
            out[f"{k}_ttft_over_compute"] = v / out["chain1_compute_ms"]
            if "chain1_compute_servers_up_ms" in out:
                out[f"{k}_ttft_over_compute_servers_up"] = v / out["chain1_compute_servers_up_ms"]
    ps.server.stop(0)
    ds.server.stop(0)
    pe.stop()
    de.stop()
    del full, sub, de, pe
    free()
    return out


def bench_handoff_ready(quick):
    from colm.decode_worker.spawn import DecodeProcess
    from colm.prefill_worker.spawn import PrefillProcess

    name, T, token = "llama-3.2-1b-16-16-air", 8192, "bench"
    prompt = torch.randint(0, 128000, (T,)).tolist()
    modes = ("sender", "host")
    out = {"prompt_tokens": T, "modes": list(modes), "token_ids_encoding_us": token_ids_encoding_us(prompt)}
    print("8K token ids on the wire, us:", json.dumps(out["token_ids_encoding_us"]), flush=True)
    with PrefillProcess(_bench_prefill_engine, (name, T), token) as pc, \
            DecodeProcess(_bench_decode_engine, (name,), token) as dc:
        ttfts = {m: [] for m in modes}
        timelines = {m: [] for m in modes}
        out["router_stats_rpc_ms"] = router_rpc_ms(pc.address, dc.address, token)
        print("router Stats round trip, ms:", json.dumps(out["router_stats_rpc_ms"]), flush=True)
        computes = [pc.call(_compute_alone_ms, prompt, 3)]
        # per turn, from the timed requests' timelines: the hand-off between the engines (the Prefill call reached
        # the prefill worker's handler -> the decode worker has the first token) and the same up to the client
        engine_spans = {m: {"handoff_engines": [], "handoff_to_client": []} for m in modes}
        for _ in range(3 if quick else 5):  # in turns, so that drift on the shared machine hits every mode alike
            for m in modes:
                dc.call(_set_ready_wait, m)
                rows = []
                ttfts[m].append(router_ttft_ms(pc.address, dc.address, token, "cuda_pool", prompt, reps=3,
                                               timelines=rows))
                timelines[m] += rows
                for span, end in (("handoff_engines", "decode.first_token"), ("handoff_to_client", "client.first_token")):
                    engine_spans[m][span].append(statistics.median(r[end] - r["prefill.received"] for r in rows))
            computes.append(pc.call(_compute_alone_ms, prompt, 3))
    record_turns(out, {"chain1_compute": computes}, unit="ms")
    record_turns(out, {f"router_cuda_pool_{m}": v for m, v in ttfts.items()})
    for m, vals in ttfts.items():
        record_ratio_turns(out, f"router_cuda_pool_{m}", vals, computes)
        for span, vals in engine_spans[m].items():
            record_turns(out, {f"{span}_cuda_pool_{m}": vals})
            record_ratio_turns(out, f"{span}_cuda_pool_{m}", vals, computes)
        if timelines[m]:
            out[f"router_cuda_pool_{m}_timeline_ms"] = median_timeline(timelines[m])
            print(f"router cuda_pool ({m}), ms after the call (medians of {len(timelines[m])}):",
                  json.dumps({k: round(v, 2) for k, v in out[f"router_cuda_pool_{m}_timeline_ms"].items()}), flush=True)
    print("compute alone", [round(c, 2) for c in computes], "ms; over it, median turn:",
          {f"{key}_{m}": round(out[f"{key}_cuda_pool_{m}_ttft_over_compute_median_turn"], 3)
           for m in modes for key in ("router", "handoff_engines", "handoff_to_client")}, flush=True)
    return out


def token_ids_encoding_us(prompt, reps=200):
    """Host cost of a prompt's token ids on the PrefillRequest wire, us per request: the repeated field (build,
    serialize, parse, to numpy) against token_ids_u32 (pack, build, serialize, parse, frombuffer)."""
    import numpy as np

    from colm.proto import load_proto
    from colm.proto.token_ids import pack_token_ids, request_token_ids

    kv_pb2, _ = load_proto("kv")
    ids = tuple(prompt)

    def round_trip(packed):
        field = {"token_ids_u32": pack_token_ids(ids)} if packed else {"token_ids": list(ids)}
        raw = kv_pb2.PrefillRequest(request_id="x", **field).SerializeToString()
        return np.asarray(request_token_ids(kv_pb2.PrefillRequest.FromString(raw)), dtype=np.int64)

    assert (round_trip(False) == round_trip(True)).all()
    out = {}
    for label, packed in (("repeated", False), ("packed_u32", True)):
        t0 = time.perf_counter()
        for _ in range(reps):
            round_trip(packed)
        out[label] = (time.perf_counter() - t0) / reps * 1e6
    return out


def _set_ready_wait(engine, mode):
    """A ``WorkerProcess.call`` target: the decode child's ``DecodeConfig.kv_ready_wait`` (read per request)."""
    import dataclasses

    engine.config = dataclasses.replace(engine.config, kv_ready_wait=mode)
    return mode


def bench_handoff_transports(quick):
    """The 8K hand-off through the router's own request path, prefill (CUDA graphs) and decode each in a child
    process on the one GPU, per transport into decode's VRAM pool: cuda_pool (CUDA IPC), nixl (VRAM -> VRAM WRITEs,
    UCX cuda_ipc, wsum32 checked on the GPU) and grpc bytes; in turns with the chain-1 compute alone timed in the
    prefill child, so drift hits all alike."""
    from colm.decode_worker.spawn import DecodeProcess
    from colm.prefill_worker.spawn import PrefillProcess

    name, T, token = "llama-3.2-1b-16-16-air", 8192, "bench"
    prompt = torch.randint(0, 128000, (T,)).tolist()
    # label -> (transport, router.worker_calls): cuda_pool twice, the router's calls on its Calls streams (the
    # default) and as a unary call each
    variants = {"cuda_pool": ("cuda_pool", "stream"), "cuda_pool_unary": ("cuda_pool", "unary"),
                "nixl": ("nixl", "stream"), "grpc": ("grpc", "stream")}
    paths = tuple(variants)
    out = {"prompt_tokens": T, "paths": list(paths), "ucx_tls": os.environ.get("UCX_TLS", "(colm default)"),
           "variants": {k: {"transport": t, "worker_calls": w} for k, (t, w) in variants.items()}}
    with PrefillProcess(_bench_prefill_engine, (name, T), token) as pc, \
            DecodeProcess(_bench_decode_engine, (name,), token) as dc:
        ttfts = {k: [] for k in paths}
        timelines = {k: [] for k in paths}
        computes = [pc.call(_compute_alone_ms, prompt, 3)]
        for _ in range(3 if quick else 5):
            for k in paths:
                rows = []
                ttfts[k].append(router_ttft_ms(pc.address, dc.address, token, variants[k][0], prompt, reps=3,
                                               timelines=rows, worker_calls=variants[k][1]))
                timelines[k] += rows
            computes.append(pc.call(_compute_alone_ms, prompt, 3))
    record_turns(out, {"chain1_compute": computes}, unit="ms")
    record_turns(out, {f"router_{k}": v for k, v in ttfts.items()})
    for k, vals in ttfts.items():
        record_ratio_turns(out, f"router_{k}", vals, computes)
        if timelines[k]:
            out[f"router_{k}_timeline_ms"] = median_timeline(timelines[k])
    for k in paths:
        out[f"router_{k}_over_cuda_pool"] = out[f"router_{k}_ttft_ms"] / out["router_cuda_pool_ttft_ms"]
    print("compute alone", [round(c, 2) for c in computes], "ms; TTFT ms:",
          {k: round(out[f"router_{k}_ttft_ms"], 2) for k in paths}, "over compute (median turn):",
          {k: round(out[f"router_{k}_ttft_over_compute_median_turn"], 3) for k in paths}, flush=True)
    return out


def record_turns(out, values, unit="ttft_ms"):
    """Per-turn figures into ``out``: ``<key>_<unit>_turns`` (as measured) and ``<key>_<unit>`` (their median)."""
    for key, vals in values.items():
        out[f"{key}_{unit}_turns"] = vals
        out[f"{key}_{unit}"] = statistics.median(vals)


def record_ratio_turns(out, key, ttfts, computes):
    """``<key>_ttft_over_compute_turns``: each turn's TTFT over the mean of the compute alone timed just before and
    after it (``computes`` has one more entry than ``ttfts``), and ``..._median_turn``."""
    turns = [t / ((computes[i] + computes[i + 1]) / 2) for i, t in enumerate(ttfts)]
    out[f"{key}_ttft_over_compute_turns"] = turns
    out[f"{key}_ttft_over_compute_median_turn"] = statistics.median(turns)


def merged_timeline(t0, client, reply, first_event):
    """One remote hand-off on one clock: ms after ``t0`` (the Reserve call) of the client's stamps
    (``client.*``: time.monotonic()), the prefill worker's milestones (``prefill.*``, PrefillReply) and
    the decode worker's (``decode.*``, the first TokenEvent). All processes share the host's monotonic clock."""
    row = {f"client.{k}": (v - t0) * 1000 for k, v in client.items()}
    return {**row, **worker_milestones(t0, {"prefill": (reply.monotonic_s, reply.timeline_ms),
                                            "decode": (first_event.monotonic_s, first_event.timeline_ms)})}


def local_breakdown(pe, de, prompt, params, n, reps=5):
    """Where the in-process hand-off's TTFT goes: perf_counter stamps (ms after submit), medians of ``reps``
    runs after one warm-up. compute/queue come from the PrefillResult; first_step is the decode step
    that produced the token (it runs the last prompt token over the 8K context)."""
    from colm.prefill_worker.sinks import LocalKVSink

    class StampedSink(LocalKVSink):
        def __init__(self, *args):
            super().__init__(*args)
            self.t = {}

        def begin(self, layout):
            self.t["begin"] = time.perf_counter()
            super().begin(layout)

        def put(self, *args):
            self.t.setdefault("first_put", time.perf_counter())
            super().put(*args)
            self.t["last_put"] = time.perf_counter()

        def finish(self, timeout_s):
            self.t["finish_called"] = time.perf_counter()
            num_bytes = super().finish(timeout_s)
            self.t["finish_kv_done"] = time.perf_counter()
            return num_bytes

    rows = []
    for _ in range(reps + 1):
        n[0] += 1
        rid = f"lb{n[0]}"
        de.reserve(rid, len(prompt), 1)
        sink = StampedSink(de, rid)
        t0 = time.perf_counter()
        fut = pe.submit(rid, prompt, sink)
        ev = next(iter(de.start_generation(rid, prompt[-1], params, scale=2)))
        t_token = time.perf_counter()
        res = fut.result(timeout=60)
        row = {k: (v - t0) * 1000 for k, v in sink.t.items()}
        row.update(first_token=(t_token - t0) * 1000, queue_ms=res.queue_ms, compute_ms=res.compute_ms,
                   first_step_ms=de.stats().last_step_ms, token_event_time_ms=ev.time_ms)
        rows.append(row)
    rows = rows[1:]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def router_ttft_ms(prefill_address, decode_address, token, kv_path, prompt, reps=3, timelines=None, timeout_s=60.0,
                   worker_calls="stream"):
    """TTFT through the router's own request path (``GrpcBackend.generate``: Reserve, Prefill, StartGeneration,
    over grpc.aio, as ``colm serve`` sends them; the HTTP front and the policy left out), ms from the call to
    the first token: the median of ``reps`` after one warm-up request. ``timelines``: a list that gets one row per
    timed request, the client's, prefill's and decode's milestones in ms after the call (``merged_router_timeline``)."""
    import asyncio

    from colm.router.backend import EngineRequest
    from colm.sampling import SamplingParams

    async def run():
        backend = router_backend(prefill_address, decode_address, token, kv_path, worker_calls)
        for w in ("p0", "d0"):  # host ids and CUDA flags: what the router's health polls learn
            await backend.poll(w)
        times = []
        for i in range(reps + 1):
            seen = {}
            req = EngineRequest(f"router-{kv_path}-{time.monotonic_ns()}-{i}", tuple(prompt),
                                SamplingParams(max_new_tokens=1), scale=2, timeout_s=timeout_s,
                                observe_timeline=lambda role, t, ms, seen=seen: seen.__setitem__(role, (t, ms)))
            t0, first = time.monotonic(), None
            async for _ in backend.generate(req, "p0", "d0"):
                first = first or (time.monotonic() - t0) * 1000
            times.append(first)
            for _ in range(100):  # the prefill's reply (its timeline) may come after the token
                if len(seen) == 2:
                    break
                await asyncio.sleep(0.01)
            if timelines is not None and i and len(seen) == 2:
                timelines.append(merged_router_timeline(t0, first, seen))
        await backend.close()
        return statistics.median(times[1:])

    return asyncio.run(run())


def router_backend(prefill_address, decode_address, token, kv_path="auto", worker_calls="stream"):
    """The router's ``GrpcBackend`` over one prefill worker ("p0") and one decode worker ("d0")."""
    from colm.router.backend import WorkerInfo
    from colm.router.grpc_backend import GrpcBackend

    return GrpcBackend([WorkerInfo("p0", "prefill", prefill_address), WorkerInfo("d0", "decode", decode_address)],
                       token, kv_path=kv_path, worker_calls=worker_calls)


def router_rpc_ms(prefill_address, decode_address, token, reps=30):
    """The router's round trip of a trivial call (Stats, grpc.aio) to each worker, ms: the Python gRPC floor under
    every Reserve / Prefill / StartGeneration on this host. Median of ``reps`` after 3 warm-up calls."""
    import asyncio

    async def run():
        backend = router_backend(prefill_address, decode_address, token)
        out = {}
        for w in ("p0", "d0"):
            times = []
            for i in range(reps + 3):
                t0 = time.perf_counter()
                await backend.poll(w)
                times.append((time.perf_counter() - t0) * 1000)
            out["prefill" if w == "p0" else "decode"] = statistics.median(times[3:])
        await backend.close()
        return out

    return asyncio.run(run())


def merged_router_timeline(t0, first_ms, seen):
    """One router request on one clock: ms after ``t0`` (the call, time.monotonic()) of each worker's milestones
    (``seen``: role -> (reference monotonic time, milestone -> ms after it)) and of the token at the client."""
    return {"client.first_token": first_ms, **worker_milestones(t0, seen)}


def worker_milestones(t0, seen):
    """``<role>.<milestone>`` -> ms after ``t0`` (time.monotonic()), from role -> (the worker's reference milestone on
    the monotonic clock, milestone -> ms after it)."""
    return {f"{role}.{k}": (ref - t0) * 1000 + v for role, (ref, ms) in seen.items() for k, v in ms.items()}


def median_timeline(rows):
    """Milestone -> median ms over ``rows`` (milestones every row has), in time order."""
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    return dict(sorted(med.items(), key=lambda kv: kv[1]))


def _bench_prefill_engine(name, graph_tokens=0):
    """The prefill engine of ``bench_handoff``'s spawned prefill child (chain 1, one 8K chunk; CUDA graphs of
    forwards of up to ``graph_tokens`` tokens, 0 = eager)."""
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine
    from colm.presets import preset

    return PrefillEngine(colm_model(name, scale=1), preset(name),
                         PrefillConfig(chunk_size=8192, max_batch_tokens=8192, cuda_graph_tokens=graph_tokens))


def _compute_alone_ms(engine, prompt, reps):
    """The median ms of ``reps`` prefills of ``prompt`` into a ``NullKVSink`` (the compute alone): on an engine of
    this process, or in the prefill child through ``WorkerProcess.call``."""
    from colm.prefill_worker.sinks import NullKVSink

    with torch.no_grad():
        return timed(lambda: engine.prefill("c", prompt, NullKVSink()), reps=reps)


def _bench_decode_engine(name):
    """The decode engine of ``bench_handoff``'s spawned child (same random weights as the parent's)."""
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine

    return DecodeEngine(colm_model(name), DecodeConfig(num_blocks=2048, block_size=16))


# ------------------------------------------------------------------------------------------ decode
@torch.no_grad()
def bench_decode(quick):
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.sampling import SamplingParams

    name, ctx = "llama-3.2-1b-16-16-air", 2048
    batches = [1, 8] if quick else [1, 8, 64]
    full = colm_model(name)
    cfg = full.cfg
    out = {"context": ctx, "ours_step_ms": {}, "hf_step_ms": {}}
    x = torch.randn(256 << 20, device=DEV)  # 1 GiB
    copy_ms = timed(lambda: x.clone(), reps=10)
    bw = 2 * x.numel() * 4 / (copy_ms / 1000)
    del x
    weight_bytes = sum(p.numel() for p in full.parameters()) * 2
    kv_bytes = cfg.n_layers * ctx * 2 * cfg.n_kv_heads * cfg.head_dim * 2
    out.update(measured_copy_gb_s=bw / 1e9, weight_bytes=weight_bytes,
               floor_batch1_ms=(weight_bytes + kv_bytes) / bw * 1000)

    def engine_steps(mode, scales, steps=12, graphs=True, overlap=False):
        B = len(scales)
        de = DecodeEngine(full, DecodeConfig(num_blocks=B * (ctx + 64) // 16 + 8, block_size=16, max_batch_size=B,
                                             mixed_scale_mode=mode, cuda_graphs=graphs, overlap_steps=overlap))
        de.pool.k.normal_()
        de.pool.v.normal_()
        params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True)
        for i, s in enumerate(scales):
            de.reserve(f"q{i}", ctx, steps + 8)
            de._requests[f"q{i}"].kv_done = True  # the pool already holds (random) K/V of the context
            de.start_generation(f"q{i}", 1, params, scale=s)
        for _ in range(3):
            de.step()
        torch.cuda.synchronize()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            de.step()
            times.append((time.perf_counter() - t0) * 1000)
        if graphs:
            out["graphs_captured"] = out.get("graphs_captured", 0) + de.graphs.num_captures
            out["graphs_enabled"] = out.get("graphs_enabled", True) and de.graphs.enabled
        de.stop()
        del de
        free()
        return statistics.median(times)

    for B in batches:
        for s in (1, 2):
            guard(out["ours_step_ms"], f"b{B}_scale{s}", lambda: engine_steps("widest", [s] * B))
    out["overlap_step_ms"] = {}  # DecodeConfig.overlap_steps: step n+1 queued before step n is read
    for B in batches:
        guard(out["overlap_step_ms"], f"b{B}_scale2", lambda: engine_steps("widest", [2] * B, overlap=True))
    out["eager_step_ms"] = {}  # the same steps without CUDA graphs, side by side
    for B in (1, batches[-1]):
        guard(out["eager_step_ms"], f"b{B}_scale2", lambda: engine_steps("widest", [2] * B, graphs=False))
    B = batches[-1]
    mixed = [1 + i % 2 for i in range(B)]
    out["mixed_batch"] = B
    guard(out, "mixed_widest_ms", lambda: engine_steps("widest", mixed))
    guard(out, "mixed_group_ms", lambda: engine_steps("group", mixed))
    out["tokens_per_s"] = {k: int(k.split("_")[0][1:]) / (v / 1000) for k, v in out["ours_step_ms"].items()
                           if isinstance(v, float)}
    del full
    free()
    hf = hf_llama(cfg, causal_lm=True)

    def hf_step(B):
        ids = torch.randint(0, 128000, (B, ctx), device=DEV)
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        short = timed(lambda: hf.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), reps=3)
        long = timed(lambda: hf.generate(ids, max_new_tokens=17, min_new_tokens=17, **kw), reps=3)
        return (long - short) / 16

    for B in batches:
        guard(out["hf_step_ms"], f"b{B}", lambda: hf_step(B))
    ours_b1 = out["ours_step_ms"].get("b1_scale2")
    if isinstance(ours_b1, float):
        out["batch1_step_over_floor"] = ours_b1 / out["floor_batch1_ms"]
    ov_b1 = out["overlap_step_ms"].get("b1_scale2")
    if isinstance(ov_b1, float):
        out["batch1_overlap_step_over_floor"] = ov_b1 / out["floor_batch1_ms"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default="prefill,handoff,decode")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
            "date": time.strftime("%Y-%m-%d")}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    from colm.kernels.paged_attention import HAS_TRITON as HAS_KERNEL

    from colm.kv_wire import default_checksum

    meta["paged_attention_kernel"] = HAS_KERNEL
    meta["kv_checksum_bytes_path"] = default_checksum()
    fns = {"prefill": bench_prefill, "handoff": bench_handoff, "handoff_ready": bench_handoff_ready,
           "handoff_transports": bench_handoff_transports, "decode": bench_decode}
    for sec in args.sections.split(","):
        t0 = time.time()
        res = {"meta": meta}
        guard(res, "results", lambda: fns[sec](args.quick))
        res["wall_s"] = time.time() - t0
        (outdir / f"{sec}.json").write_text(json.dumps(res, indent=1, default=str))
        print(f"== {sec} ({res['wall_s']:.0f} s)")
        print(json.dumps(res["results"], indent=1, default=str))


if __name__ == "__main__":
    main()
