"""colm.kv: the KV data plane's transports (``registry``: names, needs, ``choose``; one module per transport)."""
