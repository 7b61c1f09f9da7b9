"""The nixl transport between two network namespaces (two "hosts" on one machine, tests/netns_cluster.py): a
prefill worker process on 198.51.100.1 writes K/V into a decode worker process's pool on 198.51.100.2 over UCX's
TCP transport (``UCX_TLS=tcp``: with shared memory allowed, UCX would take it between namespaces of one machine),
the router in the root namespace over the bridge; greedy tokens equal ``colm generate`` at every scale.
Skipped where nixl does not import or namespaces cannot be made."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colm.kv import registry
from _engine_helpers import TOKEN
from netns_cluster import NetnsCluster, netns_unavailable

WHY = "" if registry.get("nixl").importable() else "nixl not importable (pip install -e '.[nixl]')"
WHY = WHY or netns_unavailable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=WHY or "-")


def _worker(cluster, node, role, model_dir, config) -> subprocess.Popen:
    env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN, "UCX_TLS": "tcp,self"}
    proc = subprocess.Popen(["ip", "netns", "exec", node.name, sys.executable, "-m", "colm.deploy.worker_main",
                             "--role", role, "--model", str(model_dir), "--host", node.ip, "--config", config,
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    cluster.procs.append(proc)
    return proc


def _ready_address(proc, role) -> str:
    ready = proc.stdout.readline().split()
    assert ready[:2] == ["READY", role], ready
    return ready[2]


def test_nixl_between_namespaces_gives_reference_tokens(tmp_path):
    from colm.proto import load_proto
    from colm.proto.rpc import make_channel
    from _engine_helpers import save_tiny_air, wait_pool_free
    from router_helpers import assert_router_gives_reference_tokens

    kv_pb2, kv_pb2_grpc = load_proto("kv")
    full = save_tiny_air(tmp_path / "model")
    c = NetnsCluster([{}, {}], tmp=tmp_path / "net")
    c.tmp.mkdir(parents=True, exist_ok=True)
    try:
        c.create_network()
        dproc = _worker(c, c.nodes[1], "decode", tmp_path / "model", '{"num_blocks": 128, "block_size": 4}')
        pproc = _worker(c, c.nodes[0], "prefill", tmp_path / "model", '{"nixl_arena_bytes": 4194304}')  # both at once
        daddr, paddr = _ready_address(dproc, "decode"), _ready_address(pproc, "prefill")
        assert daddr.startswith(c.nodes[1].ip + ":") and paddr.startswith(c.nodes[0].ip + ":")
        assert_router_gives_reference_tokens(full, tmp_path / "model", daddr, paddr, TOKEN, "nixl")
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(daddr))
        s = wait_pool_free(d)
        assert s.num_free_blocks == s.num_blocks
        # the K/V crossed the namespaces as TCP: prefill's namespace holds connections to decode's namespace
        # beyond the gRPC one (UCX's own)
        conns = c.ns(c.nodes[0], "ss", "-tnH", "state", "established").stdout
        peers = [line for line in conns.splitlines() if c.nodes[1].ip in line]
        assert len(peers) >= 2, conns
    finally:
        c.stop()
