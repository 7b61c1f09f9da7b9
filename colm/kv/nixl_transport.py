"""The ``nixl`` transport's registration (the transport itself: ``colm.kv.nixl``, which imports nixl lazily).

Needs ``nixl`` importable on both workers (``pip install 'colm[nixl]'``); any two hosts.
"""

from colm.kv.registry import SinkContext, Transport, register


def make_sink(ctx: SinkContext):
    from colm.kv.nixl import NixlKVSink

    c = ctx.config
    arena_device, kind = c.nixl_send(ctx.device, ctx.same_host)
    return NixlKVSink(ctx.stub, ctx.request_id, ctx.cluster_token, kind, ctx.timeout_s, c.nixl_arena_bytes,
                      arena_device=arena_device)


# decode's grant waits for the reservation (as cuda_pool's): the router sends Reserve and Prefill at once
TRANSPORT = register(Transport("nixl", make_sink, needs_import="nixl._api", reserve_with_prefill=True))
