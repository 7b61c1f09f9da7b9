"""A router on a background event loop for tests (real gRPC and HTTP on loopback)."""

from __future__ import annotations

from colm.router.server import ThreadedRouterServer


BackgroundRouter = ThreadedRouterServer


def post_json(url: str, body, headers=None, raw: bytes | None = None):
    """POST and return (status, parsed JSON or text)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def get_json(url: str, headers=None):
    """GET and return (status, parsed JSON or text)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text, status = r.read().decode(), r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
