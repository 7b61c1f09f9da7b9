"""The ``grpc`` transport: raw K/V bytes in ``PushKV`` chunk messages (any two hosts; the fallback).

Sender ``colm.prefill_worker.kv_push.GrpcKVSink``; receiver ``colm.kv.receivers.BytesReceiver`` (``PushKV``).
"""

from colm.kv.registry import SinkContext, Transport, register


def make_sink(ctx: SinkContext):
    from colm.prefill_worker.kv_push import GrpcKVSink

    c = ctx.config
    return GrpcKVSink(ctx.stub, ctx.request_id, ctx.cluster_token, c.kv_chunk_bytes, c.checksum, ctx.timeout_s)


TRANSPORT = register(Transport("grpc", make_sink))
