"""The ``shm`` transport: K/V in a POSIX shared-memory segment the sender creates; ``PushKV`` chunks carry offsets.

Same host only. Sender ``GrpcKVSink(shm=True)``; receiver ``colm.kv.receivers.BytesReceiver`` (``PushKV``, ``KVHeader.shm_name``).
"""

from colm.kv.registry import SinkContext, Transport, register


def make_sink(ctx: SinkContext):
    from colm.prefill_worker.kv_push import GrpcKVSink

    c = ctx.config
    return GrpcKVSink(ctx.stub, ctx.request_id, ctx.cluster_token, c.kv_chunk_bytes, c.shm_checksum, ctx.timeout_s,
                      shm=True)


TRANSPORT = register(Transport("shm", make_sink, same_host=True))
