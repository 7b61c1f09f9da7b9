"""OpenAI-compatible HTTP front of the router (aiohttp).

Endpoints: ``POST /v1/completions`` (streaming as server-sent events, ``logprobs`` and ``echo`` of
prompt tokens, batched prompts), ``POST /v1/chat/completions`` (the prompt rendered with the checkpoint's
chat template, ``colm.chat_template``; 400 for a model without one), ``GET /v1/models``, ``GET /v1/models/{model}``,
``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``, ``GET /health``. The scale or a latency
budget rides in extra fields: ``scale``, ``ttft_ms``, ``tpot_ms``, ``deadline_ms``, ``on_miss`` (top level or
inside ``"colm": {}``).

Models: the served name (``router.served_model_name``) and one name per scale, ``NAME@k``, which pins
scale k (a different ``scale`` extra beside it is a 400); an omitted ``model`` is the served name; any
other name is a 404 ``NotFoundError``, as vLLM answers. Stop strings are cut from the returned text with
what follows them (OpenAI / vLLM semantics; ``include_stop_str_in_output: true`` keeps the stop string):
the router core stops at the token completing a stop string and streams that token's whole text, so
``StopTrimmer`` cuts at the HTTP layer and, while streaming, holds back the last ``len(longest stop) - 1``
characters until they cannot start a stop string. A streamed chat choice's log-prob entries go out with the chunk
that carries their tokens' text (a token held back, or holding part of a UTF-8 character, has its entry in that
choice's next chunk), and a chat log-prob's ``bytes`` are the token's own bytes where the tokenizer can say them.
With ``stream_options.include_usage``, every chunk but the last (the usage, no choices) has ``"usage": null``.
A request asking for ``speculative`` drafts gets each token's accepted-draft flag on its choice (``drafted``; a chat
chunk: a list, for the tokens of its text) and the usage's ``draft_accepted_tokens``, as gRPC's ``Token.drafted``.
Request bodies are validated by the pydantic models of ``colm.router.openai_schema`` (strict types,
finite numbers; unsupported OpenAI fields rejected unless they ask for a no-op; unknown fields ignored).
aiohttp is chosen because Ray's default extra already installs it, it runs on the router's asyncio
loop beside grpc.aio, and it supports streaming responses and TLS without further dependencies.

API key (the same rule as the gRPC service): when ``router.api_key`` is set, every path except
``/health`` needs the header ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (when both are sent,
``x-api-key`` is the one checked; the scheme ``Bearer`` in any case, a key without it refused), compared in
constant time; otherwise 401.

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` (``param`` names the bad
field, or is null): 400 bad request (body not JSON, nested too deeply, a bad field, a body that does
not decode with its Content-Encoding), 401 missing or wrong API key, 404 unknown path, 405 wrong
method, 413 body over ``router.max_message_bytes`` (after decompression), 429 overloaded or budget
unmet with ``Retry-After``, 503 no worker, 504 deadline exceeded, 500 a bug.

At shutdown (``router/drain.py``) every path but ``/health`` (503, saying why) and a running request's scale switch
answers 503 and closes the connection, and a request the drain's end cuts answers 503, or, when its stream is under
way, ends it with an error event.

Modules: this one (the app, its middleware, the request body, ``start_http``); ``http_errors`` (error bodies);
``http_spec`` (request -> sequence specs); ``http_generate`` (completions, chat); ``http_stream`` (server-sent
events); ``http_bodies`` (non-streamed bodies); ``http_info`` (models, tokenizer, scale switch, health).
"""

from __future__ import annotations

import asyncio
import json
import re

from aiohttp import web
from aiohttp.web import RequestPayloadError

from colm.router.core import Router
from colm.router.drain import CUT_GRACE_S, Drain
from colm.router.grpc_server import _key_ok
from colm.chat_template import TokenizerConfig
from colm.router.http_bodies import BodyMixin
from colm.router.http_errors import (HTTP_STATUS, HTTP_TYPE, ModelNotFound, _error, _error_body, _http_error,
                                     _shutting_down)
from colm.router.http_generate import GenerateMixin
from colm.router.http_guard import ConnectionGuard, default_max_connections, quiet_client_errors
from colm.router.http_info import InfoMixin
from colm.router.http_spec import SpecMixin
from colm.router.http_stream import STREAMING, StreamMixin
from colm.router.openai_errors import BadField

__all__ = ["HTTP_STATUS", "HTTP_TYPE", "STREAMING", "WHILE_DRAINING", "HttpApi", "ModelNotFound", "start_http"]


def _metadata(request) -> list[tuple[str, str]]:
    """Headers as gRPC-style metadata (lower-case names) for ``_key_ok``. aiohttp keeps bytes that are not
    UTF-8 as surrogates, which the key's constant-time compare cannot encode: they become U+FFFD (no match)."""
    return [(k.lower(), v.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            for k, v in request.headers.items()]


# answered while the router shuts down too: health (which says so), and a scale switch of a request in flight
WHILE_DRAINING = re.compile(r"/health|/v1/requests/[^/]+/scale")


class HttpApi(GenerateMixin, SpecMixin, StreamMixin, BodyMixin, InfoMixin):
    """The app's state (router, connection guard, drain, tokenizer), its routes and middleware; the handlers come
    from the mixins."""

    def __init__(self, router: Router, guard: ConnectionGuard | None = None, drain: Drain | None = None) -> None:
        self.router = router
        self.guard = guard  # connection limits and head deadlines (start_http attaches it to the server)
        self.drain = drain or Drain(router.cfg.drain_s)  # the shutdown's (RouterServer.stop)
        self.tok = router.tokenizer
        self._raw_bytes = getattr(self.tok, "decode_bytes", None)  # ids -> their bytes, where the tokenizer says
        self.tcfg = getattr(self.tok, "tokenizer_config", None) or TokenizerConfig.load(
            getattr(self.tok, "model_dir", None), self.tok)

    def app(self) -> web.Application:
        from colm.router.metrics import metrics_endpoint

        app = web.Application(middlewares=[self._guard], client_max_size=self.router.cfg.max_message_bytes)
        # the metrics port's registry (workers' metrics included), where vLLM and SGLang serve it; the API key applies
        app.router.add_get("/metrics", metrics_endpoint(self.router.metrics.registry))
        app.add_routes([web.post("/v1/completions", self.completions), web.get("/v1/models", self.models),
                        web.get("/v1/models/{model}", self.model),
                        web.post("/v1/chat/completions", self.chat_completions),
                        web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize),
                        web.get("/tokenizer_info", self.tokenizer_info), web.get("/health", self.health),
                        web.post("/v1/requests/{request_id}/scale", self.set_scale),
                        web.post("/reset_prefix_cache", self.reset_prefix_cache)])
        return app

    @web.middleware
    async def _guard(self, request, handler):
        """The shutdown's drain, the API key check, then every failure as a JSON error body."""
        if self.guard is not None:
            self.guard.head_received(request)
            try:
                return await self._drained(request, handler)
            finally:
                self.guard.response_done(request)
        return await self._drained(request, handler)

    async def _drained(self, request, handler):
        """Refused once the router shuts down (but ``WHILE_DRAINING``); a request cut at the drain's end
        answers 503, unless its stream started (which ends with the error: ``_stream_events``)."""
        if self.drain.refusal and not WHILE_DRAINING.fullmatch(request.path):
            return _shutting_down(self.drain.refusal)
        with self.drain.serving():
            try:
                return await self._guarded(request, handler)
            except asyncio.CancelledError:
                why = self.drain.cut_error()
                if why is None or request.get(STREAMING):
                    raise
                return _shutting_down(why)

    async def _guarded(self, request, handler):
        if request.path != "/health" and not _key_ok(_metadata(request), self.router.cfg.api_key):
            return web.json_response(_error_body("missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                                 "'x-api-key: KEY'", "unauthenticated", 401), status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except ModelNotFound as e:
            return web.json_response(_error_body(str(e), "NotFoundError", 404, "model"), status=404)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _http_error(request, e, self.router.cfg.max_message_bytes)
        except Exception as e:
            return _error(e)

    async def _json(self, request):
        """The body as JSON (UTF-8, whatever the Content-Type says); ValueError (400) when it is not JSON."""
        enc = request.headers.get("Content-Encoding", "")
        try:  # HTTPRequestEntityTooLarge (413) past client_max_size, decompressed; a body trickled in is cut
            raw = await asyncio.wait_for(request.read(), self.router.cfg.http_head_timeout_s)
        except asyncio.TimeoutError:
            if self.guard is not None:
                self.guard.timed_out()
            raise web.HTTPRequestTimeout() from None
        except RequestPayloadError as e:
            raise BadField(f"request body could not be read (Content-Encoding: {enc or 'none'}): "
                           f"{str(e).splitlines()[-1].strip()}", None) from None
        try:
            return json.loads(raw)
        except RecursionError:
            raise BadField("request body is nested too deeply", None) from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
            after = f" (after decoding Content-Encoding: {enc})" if enc else ""
            raise BadField(f"request body is not valid JSON{after}: {e}", None) from None

    def _piece(self, t: int) -> str:
        return self.tok.decode([t])


async def start_http(router: Router, drain: Drain | None = None) -> tuple[web.AppRunner, int, ConnectionGuard]:
    """Serve the HTTP API on router.cfg.host:http_port (its shutdown drained by ``drain``: ``RouterServer.stop``);
    returns (runner, bound port, its connection guard)."""
    cfg = router.cfg
    # handler_cancellation: a client that hangs up cancels its handler, and with it the request (a non-streamed
    # completion kept its admission slot and decode rows for nobody until its deadline)
    quiet_client_errors()  # a malformed request is one INFO line, not an ERROR with a traceback each
    guard = ConnectionGuard(cfg.http_head_timeout_s, cfg.http_max_connections or default_max_connections(),
                            cfg.http_max_connections_per_client, router.metrics)
    # shutdown_timeout: what the drain left (requests cut, answering) gets that long before aiohttp cancels it
    runner = web.AppRunner(HttpApi(router, guard, drain).app(), access_log=None, handler_cancellation=True,
                           shutdown_timeout=CUT_GRACE_S)
    await runner.setup()
    guard.attach(runner.server)
    ssl_ctx = None
    if cfg.tls_cert:
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    site = web.TCPSite(runner, cfg.host, cfg.http_port, ssl_context=ssl_ctx, reuse_port=cfg.replicas > 1 or None)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"router.http_port: cannot listen on {cfg.host}:{cfg.http_port} ({e.strerror}); "
                               "choose another port (0 = any free one)") from None
    port = site._server.sockets[0].getsockname()[1]
    return runner, port, guard
