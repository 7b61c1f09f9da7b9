"""The ``cuda_ipc`` transport: a device staging tensor decode opens through CUDA IPC; ``PushKV`` only signals.

Same host, both on CUDA. Sender ``colm.prefill_worker.ipc_sink.IpcKVSink``; receiver ``colm.kv.receivers.BytesReceiver`` (``PushKV``)
(``KVHeader.ipc_*``). Never picked by ``auto`` (``cuda_pool`` does the same with one copy less).
"""

from colm.kv.registry import SinkContext, Transport, register


def make_sink(ctx: SinkContext):
    from colm.prefill_worker.ipc_sink import IpcKVSink

    c = ctx.config
    return IpcKVSink(ctx.stub, ctx.request_id, ctx.cluster_token, ctx.device, c.ipc_checksum, ctx.timeout_s,
                     c.ipc_chunk_layers)


TRANSPORT = register(Transport("cuda_ipc", make_sink, same_host=True, cuda=True))
