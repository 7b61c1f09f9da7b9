"""CPU micro-benchmark of the KV hand-off transfer path between two processes on loopback.

A decode worker process (real ``DecodeServer`` + ``DecodeEngine`` of a model whose K/V have the 1B
Air shape: 16 layers, 8 KV heads, head_dim 64, bf16) receives one request's K/V pushed by this
process through the real sender (``GrpcKVSink``) on each path: gRPC bytes and shared memory.
Default: 8191 tokens = 268 MB of KV, the 8K-prompt hand-off of ``bench/engines.py``. Prints GB/s
(begin -> acknowledged) per path, and the ceiling: the same bytes as bare gRPC messages into a
handler that only counts them; ``--profile`` adds cProfile tables of both ends (the receiver's
``PushKV`` handler thread and this process).

Usage: python bench/kv_transfer.py [--tokens 8191] [--reps 3] [--chunk-mib 16] [--profile] [--json PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import multiprocessing as mp
import pstats
import statistics
import time

import torch

TOKEN = "bench-token"


def model_cfg(tokens: int):
    from colm.config import ModelConfig

    # K/V shape of llama-3.2-1b-*-air; the rest small so the receiver builds fast.
    return ModelConfig(vocab_size=260, dim=1024, n_layers=16, n_heads=16, n_kv_heads=8, ffn_hidden=256, chains=(8, 8),
                       kv_sharing=True, max_seq_len=max(tokens + 64, 512))


def _receiver(tokens: int, profile: bool, conn) -> None:
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.decode_worker.service import DecodeServer, DecodeService
    from colm.model import CoLM

    torch.set_num_threads(1)
    cfg = model_cfg(tokens)
    model = CoLM(cfg, dtype=torch.bfloat16).reset_parameters(seed=0)
    eng = DecodeEngine(model, DecodeConfig(num_blocks=(tokens + 64) // 16 + 8, block_size=16))
    prof = cProfile.Profile() if profile else None
    if prof is not None:  # profile the PushKV handler thread only
        orig = DecodeService.PushKV

        def push(self, it, ctx):
            prof.enable()
            try:
                return orig(self, it, ctx)
            finally:
                prof.disable()

        DecodeService.PushKV = push
    server = DecodeServer(eng, TOKEN)
    import grpc

    def sink(it, ctx):  # the ceiling: bare gRPC bytes, nothing done with them
        return str(sum(len(m) for m in it)).encode()

    server.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "colm.bench.Sink", {"Push": grpc.stream_unary_rpc_method_handler(sink)}),))
    server.start()
    conn.send(server.address)
    conn.recv()  # stop
    server.stop(0)
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        conn.send(s.getvalue())
    else:
        conn.send("")


def push_once(stub, rid: str, layers: list[torch.Tensor], shm: bool, chunk_bytes: int, checksum: str) -> tuple[float, int]:
    from colm.kv_wire import KVLayout
    from colm.prefill_worker.kv_push import GrpcKVSink
    from colm.proto import load_proto
    from colm.proto.rpc import auth_metadata

    kv_pb2, _ = load_proto("kv")
    T = layers[0].shape[1]
    stub.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=T + 1, max_new_tokens=1), metadata=auth_metadata(TOKEN),
                 timeout=30)
    t0 = time.perf_counter()
    sink = GrpcKVSink(stub, rid, TOKEN, chunk_bytes=chunk_bytes, checksum_kind=checksum, timeout_s=120, shm=shm)
    sink.begin(KVLayout(len(layers), T, layers[0].shape[3], layers[0].shape[4], "bfloat16"))
    for li, kv in enumerate(layers):
        sink.put(li, li + 1, 0, T, kv)
    n = sink.finish(120)
    dt = time.perf_counter() - t0
    stub.Abort(kv_pb2.AbortRequest(request_id=rid), metadata=auth_metadata(TOKEN), timeout=10)
    return dt, n


def main() -> None:
    try:  # tolerate an older checkout (``--before``-style runs of the same script on the previous code)
        from colm.kv_wire import default_checksum
        from colm.prefill_worker.kv_push import decode_stub
    except ImportError:
        default_checksum, decode_stub = (lambda: "crc32"), None
    from colm.prefill_worker.config import PrefillConfig
    from colm.proto import load_proto
    from colm.proto.rpc import make_channel

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8191)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-mib", type=float, default=PrefillConfig().kv_chunk_bytes / 2**20)
    ap.add_argument("--checksum", default=None, help="grpc path checksum (default: PrefillConfig's)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--plain-stub", action="store_true", help="protobuf-serialised chunks (no PushKVRaw)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--label", default="", help="stored in the JSON (e.g. the commit measured)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, kv_pb2_grpc = load_proto("kv")
    cfg = model_cfg(args.tokens)
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(1, args.tokens, 2, cfg.n_kv_heads, cfg.head_dim, generator=g).to(torch.bfloat16)
              for _ in range(cfg.n_layers)]  # [1, T, 2, Hkv, hd] per layer, as the prefill engine emits
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_receiver, args=(args.tokens, args.profile, there), daemon=True)
    proc.start()
    address = here.recv()
    raw = decode_stub is not None and not args.plain_stub
    stub = decode_stub(address) if raw else kv_pb2_grpc.DecodeWorkerStub(make_channel(address))
    pc = PrefillConfig()
    chunk = int(args.chunk_mib * 2**20)
    import os

    out = {"label": args.label, "device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__, "tokens": args.tokens, "kv_bytes": None, "chunk_bytes": chunk,
           "checksum_grpc": args.checksum or pc.checksum, "checksum_shm": getattr(pc, 'shm_checksum', pc.checksum),
           "raw_chunks": raw, "paths": {}}
    prof = cProfile.Profile() if args.profile else None
    n_req = 0
    for path, shm in (("grpc", False), ("shm", True)):
        csum = (args.checksum or pc.checksum) if not shm else getattr(pc, 'shm_checksum', pc.checksum)
        times = []
        push_once(stub, f"warm-{path}", layers, shm, chunk, csum)
        for _ in range(args.reps):
            n_req += 1
            if prof is not None:
                prof.enable()
            dt, n = push_once(stub, f"r{n_req}", layers, shm, chunk, csum)
            if prof is not None:
                prof.disable()
            times.append(dt)
            out["kv_bytes"] = n
        med = statistics.median(times)
        out["paths"][path] = {"ms": med * 1000, "gb_s": out["kv_bytes"] / med / 1e9, "checksum": csum}
    from colm.proto.rpc import auth_metadata

    bare = make_channel(address).stream_unary("/colm.bench.Sink/Push")
    msg = b"\0" * chunk
    n_msgs = max(1, (out["kv_bytes"] or chunk) // chunk)
    times = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        bare(iter([msg] * n_msgs), metadata=auth_metadata(TOKEN), timeout=120)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    out["paths"]["bare_grpc_bytes"] = {"ms": med * 1000, "gb_s": n_msgs * chunk / med / 1e9, "checksum": "-"}
    here.send("stop")
    recv_prof = here.recv()
    proc.join(10)
    print(f"KV transfer, {args.tokens} tokens, {out['kv_bytes'] / 1e6:.0f} MB, chunk {chunk / 2**20:.1f} MiB, "
          f"default checksum here: {default_checksum()}")
    print(f"{'path':16} {'checksum':9} {'ms':>8} {'GB/s':>7}")
    for path, r in out["paths"].items():
        print(f"{path:16} {r['checksum']:9} {r['ms']:8.1f} {r['gb_s']:7.2f}")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
        print("== sender (this process)\n" + s.getvalue())
        print("== receiver (PushKV handler)\n" + recv_prof)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
