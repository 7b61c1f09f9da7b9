"""Where a worker listens and what address it tells others: bind vs advertise.

A worker on a multi-node cluster must be reached at its node's address, never at the string it bound
(``0.0.0.0`` or ``127.0.0.1`` mean nothing from another node). ``workers.host`` in serve.yaml:

* ``auto`` (default): bind and advertise the node's IP as Ray registered it; on the embedded single-node
  cluster, 127.0.0.1 (``WorkerPool.start``), so there nothing of colm's leaves loopback;
* ``0.0.0.0`` / ``::``: bind every interface, advertise the node's IP;
* an address: bind and advertise it (a node with several interfaces, one chosen for cluster traffic).
"""

from __future__ import annotations

WILDCARDS = ("0.0.0.0", "::", "[::]")


def node_ip() -> str:
    """This node's IP as Ray registered it (``ray start --node-ip-address``; the address other nodes reach it at).
    Not ``ray.util.get_node_ip_address()``: that guesses from the default route, which on the embedded cluster
    (node IP 127.0.0.1) names the machine's outside interface."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise RuntimeError(f"this process's Ray node {node_id} is not in ray.nodes()")


def worker_hosts(host: str, node_address=node_ip) -> tuple[str, str]:
    """(bind host, advertised host) for ``workers.host``; ``node_address()`` gives the node's IP."""
    if not host or not isinstance(host, str):
        raise ValueError(f"workers.host={host!r}: give 'auto', a wildcard (0.0.0.0) or an address of this node")
    if host == "auto":
        ip = node_address()
        return ip, ip
    if host in WILDCARDS:
        return host, node_address()
    return host, host
