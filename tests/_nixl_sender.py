"""A NIXL KV sender in its own process, for the nixl transport's fault tests (tests/test_kv_transport_nixl.py).

    python tests/_nixl_sender.py MODE DECODE_ADDRESS REQUEST_ID LAYERS KV_HEADS HEAD_DIM TOKENS [CHECKSUM]

MODE: "kill" (writes layer 0, prints "sent", then waits to be killed), "never" (opens the stream, gets the
grant, prints "sent", writes nothing: decode cancels the stream at the request's KV deadline), "corrupt" (a byte of each range flipped after its checksum: decode must
refuse it; prints the sender's outcome).
"""

import sys
import time

import torch

from colm.kv import nixl as kv_nixl
from colm.kv_wire import KVLayout
from colm.prefill_worker.kv_push import decode_stub

TOKEN = "test-cluster-token"


def main() -> None:
    mode, address, rid = sys.argv[1:4]
    L, H, D, T = (int(x) for x in sys.argv[4:8])
    kind = sys.argv[8] if len(sys.argv) > 8 else "crc32"
    if mode == "corrupt":
        post = kv_nixl.NixlEndpoint.post_write

        def flipped(self, local, *args, **kwargs):
            self.buf[int(local[0, 0]) - self.base] ^= 0xFF  # after the checksum was taken: the bytes that land differ
            return post(self, local, *args, **kwargs)

        kv_nixl.NixlEndpoint.post_write = flipped
    sink = kv_nixl.NixlKVSink(decode_stub(address), rid, TOKEN, checksum_kind=kind, timeout_s=30,
                              arena_bytes=1 << 20)
    sink.begin(KVLayout(L, T, H, D, "float32"))
    g = torch.Generator().manual_seed(0)
    if mode == "never":
        sink.granted.wait(10)
        print("sent", flush=True)
        time.sleep(60)
        return
    sink.put(0, 1, 0, T, torch.randn(1, T, 2, H, D, generator=g))
    if mode == "kill":
        time.sleep(0.5)
        print("sent", flush=True)
        time.sleep(60)
        return
    for layer in range(1, L):
        sink.put(layer, layer + 1, 0, T, torch.randn(1, T, 2, H, D, generator=g))
    try:
        sink.finish(20)
        print("finished", flush=True)
    except Exception as e:  # noqa: BLE001 - the outcome is what the test reads
        print(f"failed {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
