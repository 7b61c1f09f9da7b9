"""A real multi-node Ray cluster on one machine: each node in its own network namespace (tests only).

``NetnsCluster`` makes a bridge in the root namespace (198.51.100.254) and one namespace per node, joined
to it by a veth pair, each with an address from 198.51.100.0/24 (TEST-NET-2: never routed anywhere), and
starts ``ray start`` in each with the node's own IP: the head, then nodes with their own custom resources.
Processes in a namespace reach only loopback and the other nodes; the test process reaches every node over
the bridge. ``stop()`` kills every process started in the namespaces and removes them.

``netns_unavailable()`` says why namespaces cannot be made here (not root, no ``ip``, no permission), or "".
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.51.100"
BRIDGE_IP = f"{SUBNET}.254"
RAY_PORT = 6379


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=60)


def serve_yaml(head_ip: str, token: str, num_blocks: int = 512) -> str:
    """The serve.yaml of a cluster test: the demo model, one prefill and one decode worker pinned to the nodes that
    offer the `prefill` and `decode` resources, the router on the head's address, the cluster token given."""
    return f"""
model: {{path: demo}}
workers:
  num_prefill: 1
  num_decode: 1
  num_cpus_per_worker: 1
  prefill_resources: {{prefill: 1}}
  decode_resources: {{decode: 1}}
  max_restarts: 5
  host: auto
decode: {{num_blocks: {num_blocks}, block_size: 16}}
router:
  host: {head_ip}
  grpc_port: 50051
  http_port: 8000
  metrics_port: 9400
  metrics_host: {head_ip}
  poll_interval_s: 0.2
  max_retries: 3
  worker_wait_s: 60
security: {{cluster_token: {token}}}
ray: {{address: auto}}
"""


def netns_unavailable() -> str:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None or shutil.which("ss") is None:
        return "the ip and ss commands (iproute2) are not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"colm-probe-{uuid.uuid4().hex[:6]}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return ""


@dataclass
class Node:
    name: str  # namespace name
    ip: str
    resources: dict = field(default_factory=dict)
    num_cpus: int = 1


class NetnsCluster:
    def __init__(self, node_resources: list[dict], num_cpus: list[int] | None = None, tmp: Path | None = None) -> None:
        tag = uuid.uuid4().hex[:6]
        self.tag = tag
        self.bridge = f"cb{tag}"
        self.nodes = [Node(f"colm-{tag}-{i}", f"{SUBNET}.{i + 1}", res, (num_cpus or [1] * len(node_resources))[i])
                      for i, res in enumerate(node_resources)]
        self.tmp = Path(tmp or f"/tmp/colm-netns-{tag}")
        self.procs: list[subprocess.Popen] = []
        # a lost node is declared dead after ~3 s instead of Ray's default ~30 s: the kill drills wait less
        # the cluster's own auth token: `ray start` with token auth needs one, and a fresh machine has no
        # ~/.ray/auth_token (only an embedded ray.init writes it)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}

    @property
    def head(self) -> Node:
        return self.nodes[0]

    # ---- network ----------------------------------------------------------------------------
    def create_network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i, n in enumerate(self.nodes):
            host_end, ns_end = f"vh{self.tag}{i}", f"vn{self.tag}{i}"
            _run("ip", "netns", "add", n.name)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _run("ip", "link", "set", ns_end, "netns", n.name)
            _run("ip", "link", "set", host_end, "master", self.bridge)
            _run("ip", "link", "set", host_end, "up")
            self.ns(n, "ip", "addr", "add", f"{n.ip}/24", "dev", ns_end)
            self.ns(n, "ip", "link", "set", ns_end, "up")
            self.ns(n, "ip", "link", "set", "lo", "up")

    def ns(self, node: Node, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run("ip", "netns", "exec", node.name, *cmd, check=check)

    def popen(self, node: Node, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.tmp / log, "w")
        p = subprocess.Popen(["ip", "netns", "exec", node.name, *cmd], stdout=out, stderr=subprocess.STDOUT,
                             env={**self.env, **(env or {})}, start_new_session=True)
        self.procs.append(p)
        return p

    # ---- ray ----------------------------------------------------------------------------------
    def ray_start_args(self, node: Node) -> list[str]:
        """The ``ray start`` of docs/cluster.md, with this node's address and resources."""
        args = ["ray", "start", "--node-ip-address", node.ip, f"--num-cpus={node.num_cpus}", "--disable-usage-stats"]
        if node is self.head:
            args += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false",
                     f"--temp-dir={self.tmp / 'ray'}"]
        else:
            args += [f"--address={self.head.ip}:{RAY_PORT}"]
        if node.resources:
            args += [f"--resources={json.dumps(node.resources)}"]
        return args

    def start_ray(self, node: Node, timeout_s: float = 120.0) -> None:
        r = subprocess.run(["ip", "netns", "exec", node.name, *self.ray_start_args(node)], capture_output=True,
                           text=True, env=self.env, timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"ray start on {node.name} ({node.ip}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def start(self) -> "NetnsCluster":
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.create_network()
        for n in self.nodes:
            self.start_ray(n)
        return self

    def node_pids(self, node: Node) -> list[int]:
        r = _run("ip", "netns", "pids", node.name, check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process in the node's namespace (its raylet, workers, everything)."""
        for pid in self.node_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for n in self.nodes:
            self.kill_node(n)
        time.sleep(0.5)
        for i, n in enumerate(self.nodes):
            _run("ip", "netns", "del", n.name, check=False)
            _run("ip", "link", "del", f"vh{self.tag}{i}", check=False)
        _run("ip", "link", "del", self.bridge, check=False)


class LoopbackCluster(NetnsCluster):
    """The fallback where namespaces cannot be made: the same nodes on loopback aliases (127.0.0.11, .12, ...),
    each ``ray start`` with its own node IP, no isolation between them (same-host KV paths apply)."""

    def __init__(self, node_resources: list[dict], num_cpus: list[int] | None = None, tmp: Path | None = None) -> None:
        super().__init__(node_resources, num_cpus, tmp)
        for i, n in enumerate(self.nodes):
            n.name, n.ip = f"loopback-{self.tag}-{i}", f"127.0.0.{11 + i}"

    def create_network(self) -> None:
        pass  # 127.0.0.0/8 is loopback already

    def ns(self, node: Node, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(*cmd, check=check)

    def popen(self, node: Node, cmd: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        out = open(self.tmp / log, "w")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                             start_new_session=True)
        self.procs.append(p)
        return p

    def start_ray(self, node: Node, timeout_s: float = 120.0) -> None:
        r = subprocess.run(self.ray_start_args(node), capture_output=True, text=True, env=self.env, timeout=timeout_s)
        if r.returncode != 0:
            raise RuntimeError(f"ray start for {node.ip} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def node_pids(self, node: Node) -> list[int]:
        """Ray's processes of this cluster (their command lines name its temp dir) on this node's IP."""
        import psutil

        out = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or ())
            if str(self.tmp) in cmd and node.ip in cmd:
                out.append(p.pid)
        return out

    def stop(self) -> None:
        super().stop()  # the namespace commands it runs for cleanup fail harmlessly (check=False)
