"""The ``cuda_pool`` transport: prefill writes straight into decode's blocks (pool opened through CUDA IPC).

Same host, both on CUDA. Sender ``colm.prefill_worker.pool_sink.PoolKVSink``; receiver ``colm.kv.receivers.GrantReceiver`` (``WriteKV``)
with ``DecodeEngine.grant_kv`` / ``mark_kv`` / ``end_external_writes`` (blocks held while the sender may write).
The router sends Reserve and Prefill at once on this transport (decode's grant waits for the reservation).
"""

from colm.kv.registry import SinkContext, Transport, register


def make_sink(ctx: SinkContext):
    from colm.errors import RequestAbortedError
    from colm.prefill_worker.pool_sink import PoolKVSink

    sink = PoolKVSink(ctx.stub, ctx.request_id, ctx.cluster_token, ctx.timeout_s)
    if ctx.on_cancel is not None:
        # The router sends Reserve and Prefill at once here; if its Reserve fails it cancels the Prefill call, and the
        # grant will never come: fail the sink, so the request ends now (not after the grant wait) and the K/V it
        # kept for the grant are dropped.
        ctx.on_cancel(lambda: sink.fail(RequestAbortedError(f"request {ctx.request_id}: Prefill cancelled by the "
                                                            "caller")))
    return sink


TRANSPORT = register(Transport("cuda_pool", make_sink, same_host=True, cuda=True, reserve_with_prefill=True))
