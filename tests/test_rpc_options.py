"""The internal gRPC options agree between clients and servers: every worker channel pings every
``keepalive_time_ms`` even between calls, so a server must accept pings without data at least that
often, or it answers with GOAWAY "too_many_pings" (an error in the logs, a reconnect, a doubled
keepalive). Reproduced before the fix with a channel idle for 45 s; this checks the numbers."""

from __future__ import annotations

from colm.proto.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS


def test_servers_accept_the_clients_keepalive_pings():
    client = dict(CHANNEL_OPTIONS)
    server = dict(CHANNEL_OPTIONS + SERVER_OPTIONS)
    assert client["grpc.keepalive_permit_without_calls"] == 1  # clients ping between calls...
    assert server["grpc.keepalive_permit_without_calls"] == 1  # ...and servers allow it
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
