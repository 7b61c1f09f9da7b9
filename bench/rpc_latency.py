"""How long a router call takes to reach a worker's handler, by what the call carries and what runs beside it.

The hand-off bench (``engines.py --sections handoff_ready``) puts ~1.2 ms between the router's call and the
prefill worker's handler on the H100 host, where a Stats round trip takes 0.5-0.9 ms. This separates the
parts: two stand-in workers (the real ``make_server``: thread pool, auth interceptor, options; handlers that
only stamp ``time.monotonic()`` when they run) in processes of their own, called from one grpc.aio client as
``GrpcBackend`` calls them. Every figure is the median ms from the call to the handler's stamp (one host
clock), each variant in turns with the others.

Variants: Prefill with 16 token ids; with 8K as ``token_ids_u32`` (what the router sends) and as the
repeated field; 8K packed with a Reserve to the other worker sent at once (the router's cuda_pool path);
the same calls as messages of each worker's open ``Calls`` stream (``router.worker_calls: stream``, the router's
default: ``colm.router.call_stream``); and a Stats round trip.

Usage: python bench/rpc_latency.py [--out FILE] [--reps 200]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import platform
import random
import statistics
import time

TOKEN = "bench"


def _serve(role, conn):
    from colm.proto import load_proto
    from colm.proto.call_stream import serve_calls
    from colm.proto.rpc import make_server

    kv_pb2, kv_pb2_grpc = load_proto("kv")

    class Prefill(kv_pb2_grpc.PrefillWorkerServicer):
        def Calls(self, request_iterator, context):
            yield from serve_calls({"Prefill": (self.Prefill, kv_pb2.PrefillRequest)}, request_iterator, context)

        def Prefill(self, request, context):
            return kv_pb2.PrefillReply(request_id=request.request_id, monotonic_s=time.monotonic())

        def Stats(self, request, context):
            return kv_pb2.PrefillStats()

    class Decode(kv_pb2_grpc.DecodeWorkerServicer):
        def Calls(self, request_iterator, context):
            yield from serve_calls({"Reserve": (self.Reserve, kv_pb2.ReserveRequest)}, request_iterator, context)

        def Reserve(self, request, context):
            return kv_pb2.ReserveReply(request_id=request.request_id)

    server, port = make_server("127.0.0.1:0", TOKEN)
    if role == "prefill":
        kv_pb2_grpc.add_PrefillWorkerServicer_to_server(Prefill(), server)
    else:
        kv_pb2_grpc.add_DecodeWorkerServicer_to_server(Decode(), server)
    server.start()
    conn.send(port)
    conn.recv()  # until the parent says stop (or goes away)
    server.stop(0)


def measure(prefill_port: int, decode_port: int, reps: int, turns: int = 4) -> dict:
    import grpc

    from colm.proto import load_proto
    from colm.proto.token_ids import pack_token_ids
    from colm.router.call_stream import CallStream

    kv_pb2, kv_pb2_grpc = load_proto("kv")
    md = (("x-colm-cluster-token", TOKEN),)
    ids8k = tuple(random.randrange(128000) for _ in range(8192))
    ids16 = ids8k[:16]

    async def run():
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        cp = grpc.aio.insecure_channel(f"127.0.0.1:{prefill_port}", options=opts)
        cd = grpc.aio.insecure_channel(f"127.0.0.1:{decode_port}", options=opts)
        p, d = kv_pb2_grpc.PrefillWorkerStub(cp), kv_pb2_grpc.DecodeWorkerStub(cd)
        sp, sd = CallStream(lambda: p.Calls(metadata=md)), CallStream(lambda: d.Calls(metadata=md))

        async def prefill_on_stream(ids, with_reserve, i):
            t0 = time.monotonic()
            req = kv_pb2.PrefillRequest(request_id=f"r{i}", token_ids_u32=pack_token_ids(ids))
            call = asyncio.ensure_future(sp.call("Prefill", req, kv_pb2.PrefillReply, 5))
            if with_reserve:  # a task of its own, as GrpcBackend sends it: the Prefill task made first goes first
                await asyncio.ensure_future(sd.call("Reserve", kv_pb2.ReserveRequest(
                    request_id=f"r{i}", prompt_len=len(ids)), kv_pb2.ReserveReply, 5))
            return ((await call).monotonic_s - t0) * 1000

        async def prefill(ids, packed, with_reserve, i):
            t0 = time.monotonic()
            req = (kv_pb2.PrefillRequest(request_id=f"r{i}", token_ids_u32=pack_token_ids(ids)) if packed
                   else kv_pb2.PrefillRequest(request_id=f"r{i}", token_ids=list(ids)))
            call = asyncio.ensure_future(p.Prefill(req, metadata=md, timeout=5))
            if with_reserve:
                await d.Reserve(kv_pb2.ReserveRequest(request_id=f"r{i}", prompt_len=len(ids)), metadata=md, timeout=5)
            return ((await call).monotonic_s - t0) * 1000

        async def stats(i):
            t0 = time.monotonic()
            await p.Stats(kv_pb2.PrefillStatsRequest(), metadata=md, timeout=5)
            return (time.monotonic() - t0) * 1000

        variants = {
            "prefill_16_tokens": lambda i: prefill(ids16, True, False, i),
            "prefill_8k_packed": lambda i: prefill(ids8k, True, False, i),
            "prefill_8k_repeated": lambda i: prefill(ids8k, False, False, i),
            "prefill_8k_packed_with_reserve": lambda i: prefill(ids8k, True, True, i),
            "prefill_16_tokens_on_calls_stream": lambda i: prefill_on_stream(ids16, False, i),
            "prefill_8k_packed_on_calls_stream": lambda i: prefill_on_stream(ids8k, False, i),
            "prefill_8k_packed_with_reserve_on_calls_streams": lambda i: prefill_on_stream(ids8k, True, i),
            "stats_round_trip": stats,
        }
        times = {v: [] for v in variants}
        for v, fn in variants.items():  # warm-up
            for i in range(10):
                await fn(i)
        for _ in range(turns):
            for v, fn in variants.items():
                for i in range(reps // turns):
                    times[v].append(await fn(i))
        await sp.close()
        await sd.close()
        await cp.close()
        await cd.close()
        return {v: statistics.median(t) for v, t in times.items()}

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    procs, ports, conns = [], {}, {}
    for role in ("prefill", "decode"):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(role, child), daemon=True)
        proc.start()
        ports[role], conns[role] = parent.recv(), parent
        procs.append(proc)
    try:
        res = measure(ports["prefill"], ports["decode"], args.reps)
    finally:
        for c in conns.values():
            c.send("stop")
        for proc in procs:
            proc.join(10)
    import grpc

    print(f"{'variant':48s} {'ms':>8s}")
    for v, ms in res.items():
        print(f"{v:48s} {ms:8.3f}")
    device = "cpu host"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name()
    except ImportError:
        pass
    payload = {"meta": {"benchmark": "rpc_latency", "device": device, "cpu": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "grpcio": grpc.__version__,
                        "date": time.strftime("%Y-%m-%d"), "reps": args.reps},
               "ms_call_to_handler": {k: v for k, v in res.items() if k != "stats_round_trip"},
               "stats_round_trip_ms": res["stats_round_trip"]}
    from _results import write_result

    write_result(payload, "rpc_latency", device, payload["meta"]["date"], args.out)


if __name__ == "__main__":
    main()
