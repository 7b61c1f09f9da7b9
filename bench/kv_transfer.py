"""Benchmark of the KV transports between two processes: gRPC bytes, shared memory and NIXL, side by side (CPU);
with ``--device cuda`` from one GPU process into another's VRAM pool: gRPC bytes, cuda_pool (CUDA IPC) and NIXL
(VRAM -> VRAM through UCX cuda_ipc, and from a pinned host buffer: ``nixl-host``).

A decode worker process (real ``DecodeServer`` + ``DecodeEngine`` of a model whose K/V have the 1B Air shape:
16 layers, 8 KV heads, head_dim 64, bf16) receives one request's K/V pushed by this process through each
transport's real sender (``GrpcKVSink``, ``GrpcKVSink(shm=True)``, ``NixlKVSink``), into its blocks, at each
size (default 64 and 256 MiB: 2048 and 8192 tokens). Reports GB/s (begin -> acknowledged, median of --reps) and
the ratio to gRPC bytes, plus the ceiling of bare gRPC messages into a handler that only counts them; writes
JSON (device, versions, shapes, every figure) to bench/results/kv_transfer_cpu-<cpu>_<date>.json.
``--profile`` adds cProfile tables of both ends. ``nixl-nocsum`` is the nixl transport without its checksum.
``--phases`` adds where a request's time goes: on the sender, the median time from ``begin`` to each step (grant
received, bytes ready, write posted and done, KVEnd sent, ack); on decode, the time spent in each intake call.

Usage: python bench/kv_transfer.py [--sizes-mib 64,256] [--paths grpc,shm,nixl,nixl-nocsum] [--reps 3] [--json PATH]
       python bench/kv_transfer.py --device cuda [--paths grpc,cuda_pool,nixl,nixl-host,nixl-nocsum]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import pstats
import statistics
import threading
import time

import torch

TOKEN = "bench-token"


def model_cfg(tokens: int):
    from colm.config import ModelConfig

    # K/V shape of llama-3.2-1b-*-air; the rest small so the receiver builds fast.
    return ModelConfig(vocab_size=260, dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden=256, chains=(8, 8),
                       kv_sharing=True, max_seq_len=max(tokens + 64, 512))


class Phases:
    """Wall-clock marks of one request: per step, the first and last time it was hit (seconds after ``t0``)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def hit(self, name: str) -> None:
        t = time.perf_counter() - self.t0
        with self._lock:
            m = self.marks.setdefault(name, [t, t])
            m[1] = t


CURRENT: list = [None]  # the Phases of the request being pushed (one at a time)


def _mark(cls, name: str, step: str, after: bool = True) -> None:
    """Wrap ``cls.name`` so that each call hits ``step`` of the current request, when it returns (``after``) or when
    it is entered."""
    orig = getattr(cls, name)

    def wrapped(*a, **k):
        if not after and CURRENT[0] is not None:
            CURRENT[0].hit(step)
        out = orig(*a, **k)
        if after and CURRENT[0] is not None:
            CURRENT[0].hit(step)
        return out

    setattr(cls, name, wrapped)


def trace_senders() -> None:
    """Steps of the nixl and cuda_pool senders (``--phases``)."""
    from colm.kv.nixl import NixlEndpoint, NixlKVSink
    from colm.prefill_worker.pool_sink import PoolKVSink

    _mark(NixlKVSink, "_ready", "bytes ready")
    _mark(NixlEndpoint, "post_write", "write posted", after=False)
    _mark(NixlKVSink, "_marks_message", "write done", after=False)
    _mark(NixlKVSink, "_end_message", "KVEnd sent", after=False)
    _mark(PoolKVSink, "_write", "bytes ready")
    _mark(PoolKVSink, "_end_message", "KVEnd sent", after=False)


def trace_intake(engine) -> dict:
    """Seconds and calls of decode's intake steps (``--phases``), accumulated per step."""
    from colm.kv import nixl as kv_nixl

    spent: dict[str, list[float]] = {}
    lock = threading.Lock()

    def timed(owner, name: str) -> None:
        orig = getattr(owner, name)

        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                with lock:
                    s = spent.setdefault(name, [0.0, 0])
                    s[0] += time.perf_counter() - t
                    s[1] += 1

        setattr(owner, name, wrapped)

    for name in ("grant_kv", "mark_kv", "finish_kv", "end_external_writes"):
        timed(engine, name)
    for name in ("pool_grant_fields", "verify_range", "check_pending"):
        timed(kv_nixl, name)
    return spent


def _receiver(tokens: int, profile: bool, conn, device: str = "cpu", phases: bool = False) -> None:
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.decode_worker.service import DecodeServer, DecodeService
    from colm.model import CoLM

    torch.set_num_threads(1)
    cfg = model_cfg(tokens)
    model = CoLM(cfg, dtype=torch.bfloat16).reset_parameters(seed=0).to(device)
    eng = DecodeEngine(model, DecodeConfig(num_blocks=(tokens + 64) // 16 + 8, block_size=16))
    spent = trace_intake(eng) if phases else None
    prof = cProfile.Profile() if profile else None
    if prof is not None:  # profile the KV handler threads only (PushKV: bytes paths; WriteKV: cuda_pool, nixl)
        def profiled(orig):
            def handler(self, it, ctx):
                prof.enable()
                try:
                    return orig(self, it, ctx)
                finally:
                    prof.disable()
            return handler

        DecodeService.PushKV = profiled(DecodeService.PushKV)
        DecodeService.WriteKV = profiled(DecodeService.WriteKV)
    server = DecodeServer(eng, TOKEN)
    import grpc

    def sink(it, ctx):  # the ceiling: bare gRPC bytes, nothing done with them
        return str(sum(len(m) for m in it)).encode()

    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "colm.bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(sink)}),))
    server.start()
    conn.send(server.address)
    while True:  # "stop", or "phases": the intake's seconds so far, then zeroed
        cmd = conn.recv()
        if cmd != "phases":
            break
        conn.send({k: list(v) for k, v in (spent or {}).items()})
        if spent is not None:
            spent.clear()
    server.stop(0)
    if prof is not None:
        s = io.StringIO()
        try:
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        except TypeError:  # nothing was profiled: no PushKV call (the nixl paths end with other handlers)
            s.write("(no KV handler call profiled)\n")
        conn.send(s.getvalue())
    else:
        conn.send("")


def push_once(stub, rid: str, layers: list[torch.Tensor], path: str, chunk_bytes: int, checksum: str,
              arena_bytes: int = 0, arena_device: str = "cpu") -> tuple[float, int]:
    """One request's K/V through the real sender of ``path`` ("grpc" | "shm" | "nixl" | "cuda_pool"): (seconds
    begin -> acked, bytes)."""
    from colm.kv_wire import KVLayout
    from colm.prefill_worker.kv_push import GrpcKVSink
    from colm.proto import load_proto
    from colm.proto.rpc import auth_metadata

    kv_pb2, _ = load_proto("kv")
    T = layers[0].shape[1]
    stub.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=T + 1, max_new_tokens=1), metadata=auth_metadata(TOKEN),
                 timeout=30)
    t0 = time.perf_counter()
    if CURRENT[0] is not None:
        CURRENT[0].t0 = t0
    if path == "nixl":
        from colm.kv.nixl import NixlKVSink

        sink = NixlKVSink(stub, rid, TOKEN, checksum_kind=checksum, timeout_s=120, arena_bytes=arena_bytes,
                          arena_device=arena_device)
    elif path == "cuda_pool":
        from colm.prefill_worker.pool_sink import PoolKVSink

        sink = PoolKVSink(stub, rid, TOKEN, timeout_s=120)
    else:
        sink = GrpcKVSink(stub, rid, TOKEN, chunk_bytes=chunk_bytes, checksum_kind=checksum, timeout_s=120,
                          shm=path == "shm")
    if CURRENT[0] is not None and hasattr(sink, "granted"):
        _hit_on_set(sink, "granted", "grant received")
        _hit_on_set(sink, "_done", "ack received")
    sink.begin(KVLayout(len(layers), T, layers[0].shape[3], layers[0].shape[4], "bfloat16"))
    for li, kv in enumerate(layers):
        sink.put(li, li + 1, 0, T, kv)
    n = sink.finish(120)
    dt = time.perf_counter() - t0
    stub.Abort(kv_pb2.AbortRequest(request_id=rid), metadata=auth_metadata(TOKEN), timeout=10)
    return dt, n


def _hit_on_set(sink, attr: str, step: str) -> None:
    """The sink's event ``attr`` hits ``step`` of the current request when it is set."""
    ph = CURRENT[0]

    class Marked(threading.Event):
        def set(self):
            ph.hit(step)
            super().set()

    setattr(sink, attr, Marked())


def _handoff_prefill_engine(tokens: int):
    """The prefill child's engine: chain 1 of the bench model (``model_cfg``), one chunk of the whole prompt."""
    from colm.model import CoLM
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine

    torch.set_num_threads(1)
    cfg = model_cfg(tokens)
    sub = CoLM(cfg.sub_config(1), dtype=torch.bfloat16).reset_parameters(seed=0).eval()
    return PrefillEngine(sub, cfg, PrefillConfig(chunk_size=tokens, max_batch_tokens=tokens, default_timeout_s=1800))


def _handoff_decode_engine(tokens: int):
    """The decode child's engine: the full bench model, a pool for one prompt of ``tokens``."""
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.model import CoLM

    torch.set_num_threads(1)
    model = CoLM(model_cfg(tokens), dtype=torch.bfloat16).reset_parameters(seed=0).eval()
    return DecodeEngine(model, DecodeConfig(num_blocks=(tokens + 64) // 16 + 8, block_size=16, kv_timeout_s=1800,
                                            reservation_timeout_s=1800))


def _compute_ms(engine, prompt, reps: int) -> float:
    """Median ms of ``reps`` chain-1 prefills of ``prompt`` into a ``NullKVSink`` (the compute alone), in the child."""
    from colm.prefill_worker.sinks import NullKVSink

    times = []
    with torch.no_grad():
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.prefill("c", prompt, NullKVSink())
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def handoff(tokens: int, paths: list[str], turns: int) -> dict:
    """The ``tokens``-token hand-off through the router's request path (``engines.router_ttft_ms``: Reserve, Prefill,
    StartGeneration as ``colm serve`` sends them), prefill and decode each in a child process on this CPU, per
    transport, in turns with the chain-1 compute alone timed in the prefill child; TTFT over that compute."""
    from engines import record_ratio_turns, record_turns, router_ttft_ms

    from colm.decode_worker.spawn import DecodeProcess
    from colm.prefill_worker.spawn import PrefillProcess

    prompt = torch.randint(0, 250, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {"prompt_tokens": tokens, "paths": paths, "turns": turns,
           "model": "bench model (model_cfg): K/V of the 1B Air shape, dim 1024, ffn 256, chains (8, 8), bf16"}
    with PrefillProcess(_handoff_prefill_engine, (tokens,), TOKEN) as pc, \
            DecodeProcess(_handoff_decode_engine, (tokens,), TOKEN) as dc:
        ttfts = {k: [] for k in paths}
        computes = [pc.call(_compute_ms, prompt, 1)]
        for _ in range(turns):
            for k in paths:
                ttfts[k].append(router_ttft_ms(pc.address, dc.address, TOKEN, k, prompt, reps=1, timeout_s=1800.0))
            computes.append(pc.call(_compute_ms, prompt, 1))
    record_turns(out, {"chain1_compute": computes}, unit="ms")
    record_turns(out, {f"router_{k}": v for k, v in ttfts.items()})
    for k, vals in ttfts.items():
        record_ratio_turns(out, f"router_{k}", vals, computes)
    if "grpc" in paths:
        for k in paths:
            out[f"router_{k}_over_grpc"] = out[f"router_{k}_ttft_ms"] / out["router_grpc_ttft_ms"]
    return out


def _handoff_child(conn, tokens: int, paths: list[str], turns: int) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # engines.py beside this file
    try:
        conn.send(handoff(tokens, paths, turns))
    except BaseException as e:  # noqa: BLE001 - reported in the JSON
        conn.send({"error": f"{type(e).__name__}: {e}"})


def phase_table(marks: list[dict], intake: dict, reps: int) -> dict:
    """Median ms from begin to each sender step (first and last hit), and decode's ms per request in each intake
    call (with its calls per request)."""
    steps = sorted({k for m in marks for k in m}, key=lambda k: statistics.median(m[k][0] for m in marks if k in m))
    sender = {k: [round(statistics.median(m[k][i] for m in marks if k in m) * 1000, 3) for i in (0, 1)]
              for k in steps}
    decode = {k: {"ms_per_request": round(v[0] / reps * 1000, 3), "calls_per_request": v[1] / reps}
              for k, v in intake.items()}
    return {"sender_ms_first_last": sender, "decode_intake": decode}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def main() -> None:
    import datetime
    import os
    import platform

    from colm.kv_wire import default_checksum
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.kv_push import decode_stub
    from colm.proto.rpc import auth_metadata, make_channel

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", default="64,256", help="K/V per request, MiB (16 layers x 8 KV heads x 64, bf16)")
    ap.add_argument("--paths", default=None, help="default: grpc,shm,nixl,nixl-nocsum (cpu); "
                    "grpc,cuda_pool,nixl,nixl-host,nixl-nocsum (cuda)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda: where both processes hold the K/V")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=PrefillConfig().kv_chunk_bytes / 2**20)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--phases", action="store_true", help="where a request's time goes, both ends (see the docstring)")
    ap.add_argument("--json", default=None, help="default: bench/results/kv_transfer_<cpu>_<date>.json")
    ap.add_argument("--label", default="", help="stored in the JSON (e.g. the commit measured)")
    ap.add_argument("--handoff-tokens", type=int, default=0,
                    help="> 0 (CPU): also the hand-off of a prompt of this many tokens through the router's request path, "
                         "TTFT over the chain-1 compute, per path (grpc, shm, nixl)")
    ap.add_argument("--handoff-turns", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(x) for x in args.sizes_mib.split(",")]
    cuda = args.device.startswith("cuda")
    if args.handoff_tokens and cuda:
        raise SystemExit("--handoff-tokens is the CPU figure; on a GPU: bench/engines.py --sections handoff_transports")
    paths = (args.paths or ("grpc,cuda_pool,nixl,nixl-host,nixl-nocsum" if cuda else "grpc,shm,nixl,nixl-nocsum")).split(",")
    per_token = 16 * 2 * 8 * 64 * 2  # bytes of K/V per token, all layers
    max_tokens = max(sizes) * 2**20 // per_token
    arena = max(sizes) * 2**20 + (16 << 20)
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(max_tokens, args.profile, there, args.device, args.phases),
                       daemon=True)
    proc.start()
    address = here.recv()
    stub = decode_stub(address)
    pc = PrefillConfig()
    chunk = int(args.chunk_mib * 2**20)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("grpc", "nixl", "crc32c"):
        try:
            from importlib.metadata import version

            versions[mod] = version({"grpc": "grpcio"}.get(mod, mod))
        except Exception:  # noqa: BLE001
            versions[mod] = None
    arena_dev, nixl_kind = pc.nixl_send(args.device)
    checks = {"grpc": pc.checksum, "shm": pc.shm_checksum, "nixl": nixl_kind, "nixl-nocsum": "none",
              "nixl-host": default_checksum(), "cuda_pool": "none"}
    # the nixl sender's send buffer: on the GPU (VRAM -> VRAM) except nixl-host (pinned DRAM)
    arenas = {"nixl": arena_dev, "nixl-nocsum": arena_dev, "nixl-host": "cpu"}
    device_name = (torch.cuda.get_device_name() if cuda else f"{cpu_name()} ({os.cpu_count()} cores, shared)")
    out = {"benchmark": "kv_transfer", "label": args.label, "device": device_name, "kv_memory": args.device,
           "send_buffers": {p: arenas.get(p, "-") for p in paths},
           "date": datetime.date.today().isoformat(), "versions": versions,
           "shape": {"layers": 16, "kv_heads": 8, "head_dim": 64, "dtype": "bfloat16", "bytes_per_token": per_token},
           "chunk_bytes": chunk, "reps": args.reps, "ucx_tls": os.environ.get("UCX_TLS", "(colm default)"),
           "metric": "median seconds from the sink's begin to decode's ack, one request, per-layer puts; GB/s = bytes/s",
           "sizes": {}}
    prof = cProfile.Profile() if args.profile else None
    if args.phases:
        trace_senders()
    n_req = 0
    g = torch.Generator().manual_seed(0)
    for mib in sizes:
        T = mib * 2**20 // per_token
        layers = [torch.randn(1, T, 2, 8, 64, generator=g).to(torch.bfloat16).to(args.device)
                  for _ in range(16)]  # [1, T, 2, Hkv, hd]
        res = out["sizes"][str(mib)] = {"tokens": T, "paths": {}}
        for path in paths:
            wire = "nixl" if path.startswith("nixl") else path
            if wire == "nixl":
                from colm.kv.nixl import close_endpoints, endpoint

                if endpoint("prefill", arena, arenas[path]).buf.device.type != torch.device(arenas[path]).type:
                    close_endpoints()  # this process's send buffer must lie where the path says
            times = []
            n = 0
            push_once(stub, f"warm-{path}-{mib}", layers, wire, chunk, checks[path], arena, arenas.get(path, "cpu"))
            if args.phases:
                here.send("phases")
                here.recv()  # the warm-up's intake times are dropped
            marks = []
            for _ in range(args.reps):
                n_req += 1
                if prof is not None:
                    prof.enable()
                if args.phases:
                    CURRENT[0] = Phases()
                dt, n = push_once(stub, f"r{n_req}", layers, wire, chunk, checks[path], arena, arenas.get(path, "cpu"))
                if args.phases:
                    CURRENT[0].hit("finish returned")
                    marks.append(CURRENT[0].marks)
                    CURRENT[0] = None
                if prof is not None:
                    prof.disable()
                times.append(dt)
            med = statistics.median(times)
            res["paths"][path] = {"ms": med * 1000, "gb_s": n / med / 1e9, "checksum": checks[path], "bytes": n,
                                  "all_ms": [t * 1000 for t in times]}
            if args.phases:
                here.send("phases")
                res["paths"][path]["phases"] = phase_table(marks, here.recv(), args.reps)
        bare = make_channel(address).stream_unary("/colm.bench.Sink/Push")
        msg = b"\0" * chunk
        n_msgs = max(1, T * per_token // chunk)
        times = []
        for _ in range(args.reps + 1):
            t0 = time.perf_counter()
            bare(iter([msg] * n_msgs), metadata=auth_metadata(TOKEN), timeout=120)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[1:])
        res["paths"]["bare_grpc_bytes"] = {"ms": med * 1000, "gb_s": n_msgs * chunk / med / 1e9, "checksum": "-"}
        if "grpc" in res["paths"]:
            for path in ("nixl", "nixl-nocsum", "nixl-host", "shm", "cuda_pool"):
                if path in res["paths"]:
                    res[f"{path}_over_grpc"] = res["paths"][path]["gb_s"] / res["paths"]["grpc"]["gb_s"]
        if "cuda_pool" in res["paths"]:
            for path in ("nixl", "nixl-nocsum", "nixl-host"):
                if path in res["paths"]:
                    res[f"{path}_over_cuda_pool"] = res["paths"][path]["gb_s"] / res["paths"]["cuda_pool"]["gb_s"]
        del layers
    here.send("stop")
    recv_prof = here.recv()
    proc.join(10)
    if args.handoff_tokens:
        hand_paths = [p for p in ("grpc", "shm", "nixl") if p in paths]
        # in a fresh process (no NIXL agent or channels of the transfer runs), which starts the two workers
        here, there = ctx.Pipe()
        child = ctx.Process(target=_handoff_child, args=(there, args.handoff_tokens, hand_paths, args.handoff_turns))
        child.start()
        out["handoff"] = here.recv()
        child.join(60)
        h = out["handoff"]
        if "error" in h:
            raise SystemExit(f"hand-off: {h['error']}")
        print(f"{args.handoff_tokens}-token hand-off, router's path, both workers in children: compute alone "
              f"{h['chain1_compute_ms']:.0f} ms;", {k: (round(h[f'router_{k}_ttft_ms']),
                                                  round(h[f'router_{k}_ttft_over_compute_median_turn'], 3))
                                              for k in hand_paths})
    print(f"KV transfer between two processes, {out['device']}, default checksum here: {default_checksum()}")
    print(f"{'MiB':>5} {'path':16} {'checksum':9} {'ms':>8} {'GB/s':>7} {'x grpc':>7}")
    for mib, res in out["sizes"].items():
        base = res["paths"].get("grpc", {}).get("gb_s")
        for path, r in res["paths"].items():
            ratio = f"{r['gb_s'] / base:7.2f}" if base else ""
            print(f"{mib:>5} {path:16} {r['checksum']:9} {r['ms']:8.1f} {r['gb_s']:7.2f} {ratio}")
            for step, (a, b) in r.get("phases", {}).get("sender_ms_first_last", {}).items():
                print(f"{'':>5}   {step:28} {a:8.2f} .. {b:8.2f} ms")
            for step, d in r.get("phases", {}).get("decode_intake", {}).items():
                print(f"{'':>5}   decode {step:21} {d['ms_per_request']:8.2f} ms in {d['calls_per_request']:.0f} calls")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        print("== sender (this process)\n" + s.getvalue())
        print("== receiver (KV handlers)\n" + recv_prof)
    if cuda:
        gpu = torch.cuda.get_device_name().replace("NVIDIA", "").split()
        tag = gpu[0].lower() if gpu else "gpu"
    else:
        cpu = cpu_name().split()
        tag = "cpu-" + ("-".join(w.lower() for w in cpu[:2]) if cpu else "cpu") + f"_{out['date']}"
    path = args.json or os.path.join("bench", "results", f"kv_transfer_{tag}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
