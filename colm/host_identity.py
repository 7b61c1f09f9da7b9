"""Which processes share a host, as far as the KV hand-off is concerned.

Two workers may take the same-host paths (shared memory, CUDA IPC) only when they share the kernel, the
mount namespace (so one ``/dev/shm``) and the network namespace (containers and the test clusters' network
namespaces on one machine count as different hosts: what crosses between them must take the cross-host
transport, as it would between machines). The id joins the host name, the boot id and those namespaces.
"""

from __future__ import annotations

import functools
import os
import socket


def _ns(kind: str) -> str:
    try:
        return str(os.stat(f"/proc/self/ns/{kind}").st_ino)
    except OSError:  # not Linux, or /proc hidden: the host name alone
        return ""


@functools.lru_cache(maxsize=1)
def host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = ""
    return "/".join(p for p in (socket.gethostname(), boot, _ns("mnt"), _ns("net")) if p)
