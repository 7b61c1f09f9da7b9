"""OpenAI-compatible HTTP front of the router (aiohttp).

Endpoints: ``POST /v1/completions`` (streaming as server-sent events, ``logprobs`` and ``echo`` of
prompt tokens, batched prompts), ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``, ``GET /health``. The scale or a latency budget rides in extra fields:
``scale``, ``ttft_ms``, ``tpot_ms``, ``deadline_ms``, ``on_miss`` (top level or inside ``"colm": {}``).
Request bodies are validated by the pydantic models of ``colm.router.openai_schema`` (strict types,
finite numbers; unsupported OpenAI fields rejected unless they ask for a no-op; unknown fields ignored).
aiohttp is chosen because Ray's default extra already installs it, it runs on the router's asyncio
loop beside grpc.aio, and it supports streaming responses and TLS without further dependencies.

API key (the same rule as the gRPC service): when ``router.api_key`` is set, every path except
``/health`` needs the header ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (when both are sent,
``x-api-key`` is the one checked), compared in constant time; otherwise 401.

Every error is a JSON body ``{"error": {"message", "type", "param", "code"}}`` (``param`` names the bad
field, or is null): 400 bad request (body not JSON, nested too deeply, a bad field, a body that does
not decode with its Content-Encoding), 401 missing or wrong API key, 404 unknown path, 405 wrong
method, 413 body over ``router.max_message_bytes`` (after decompression), 429 overloaded or budget
unmet with ``Retry-After``, 503 no worker, 504 deadline exceeded, 500 a bug.
"""

from __future__ import annotations

import json
import logging
import re
import time

from aiohttp import web
from aiohttp.web import RequestPayloadError

from colm.router.core import Router
from colm.router.grpc_server import _key_ok, status_for
from colm.router.openai_schema import BadField, CompletionRequest, DetokenizeRequest, TokenizeRequest, parse
from colm.router.policy import Budget
from colm.sampling import SamplingParams

log = logging.getLogger("colm.router")

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504,
               "UNAVAILABLE": 503, "INTERNAL": 500}
HTTP_TYPE = {401: "unauthenticated", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _error_body(message: str, type_: str, code: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(e: BaseException) -> web.Response:
    code, msg, retry = status_for(e)
    if code.name == "INTERNAL":
        log.error("HTTP request failed", exc_info=e)
    status = HTTP_STATUS[code.name]
    headers = {"Retry-After": f"{max(1, round(retry))}"} if retry is not None else None
    return web.json_response(_error_body(msg, code.name.lower(), status, _param(e, msg)), status=status,
                             headers=headers)


def _param(e: BaseException, msg: str) -> str | None:
    """The field a 400 is about: BadField says; the router core's messages start with the field's name."""
    if isinstance(e, BadField) or not isinstance(e, ValueError):
        return getattr(e, "param", None)
    m = re.match(r"(?:budget\.)?(\w+)", msg)
    name = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(m.group(1), m.group(1)) if m else None
    return name if name in CompletionRequest.model_fields else None


def _http_error(request, e: web.HTTPException, max_body: int) -> web.Response:
    """aiohttp's own errors (unknown path, wrong method, body too large) in the JSON error shape."""
    msg = {404: f"no such path: {request.path}",
           405: f"method {request.method} is not allowed on {request.path}; allowed: "
                f"{', '.join(sorted(getattr(e, 'allowed_methods', ()) or ()))}",
           413: f"request body exceeds the limit of {max_body} bytes (router.max_message_bytes)"}
    headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
    return web.json_response(_error_body(msg.get(e.status, e.reason), HTTP_TYPE.get(e.status, "http_error"), e.status),
                             status=e.status, headers=headers)


def _metadata(request) -> list[tuple[str, str]]:
    """Headers as gRPC-style metadata (lower-case names) for ``_key_ok``. aiohttp keeps bytes that are not
    UTF-8 as surrogates, which the key's constant-time compare cannot encode: they become U+FFFD (no match)."""
    return [(k.lower(), v.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            for k, v in request.headers.items()]


class HttpApi:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.tok = router.tokenizer

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=self.router.cfg.max_message_bytes)
        app.add_routes([web.post("/v1/completions", self.completions), web.get("/v1/models", self.models),
                        web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize),
                        web.get("/tokenizer_info", self.tokenizer_info), web.get("/health", self.health),
                        web.post("/v1/requests/{request_id}/scale", self.set_scale)])
        return app

    @web.middleware
    async def _guard(self, request, handler):
        """The API key check, then every failure as a JSON error body."""
        if request.path != "/health" and not _key_ok(_metadata(request), self.router.cfg.api_key):
            return web.json_response(_error_body("missing or wrong API key: send 'Authorization: Bearer KEY' or "
                                                 "'x-api-key: KEY'", "unauthenticated", 401), status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _http_error(request, e, self.router.cfg.max_message_bytes)
        except Exception as e:
            return _error(e)

    async def _json(self, request):
        """The body as JSON (UTF-8, whatever the Content-Type says); ValueError (400) when it is not JSON."""
        enc = request.headers.get("Content-Encoding", "")
        try:
            raw = await request.read()  # HTTPRequestEntityTooLarge (413) past client_max_size, decompressed
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

    def _spec(self, req: CompletionRequest, prompt, echo_logprobs: bool):
        ext = req.extras()
        stop = req.stop or ()
        params = SamplingParams(max_new_tokens=16 if req.max_tokens is None else req.max_tokens,
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
                                seed=req.seed, stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
                                ignore_eos=bool(req.ignore_eos))
        budget = Budget(ttft_ms=ext.get("ttft_ms"), tpot_ms=ext.get("tpot_ms"), deadline_ms=ext.get("deadline_ms"),
                        on_miss=ext.get("on_miss", "degrade"))
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        return self.router.validate(ids, text, params, budget, ext.get("scale"), prompt_logprobs=echo_logprobs)

    def _piece(self, t: int) -> str:
        return self.tok.decode([t])

    async def completions(self, request):
        req = parse(CompletionRequest, await self._json(request))
        prompts = req.prompt  # a list of prompts, each a string or a list of token ids
        echo = bool(req.echo)
        want_lp = req.logprobs is not None and req.logprobs is not False
        specs = [self._spec(req, p, echo and want_lp) for p in prompts]
        created = int(time.time())
        cid = f"cmpl-{specs[0].request_id}"
        model = self.router.cfg.served_model_name
        if req.stream:
            if len(specs) != 1:
                raise BadField("stream=true takes a single prompt", "stream")
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(request, specs[0], cid, created, model, echo, include_usage)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i, spec in enumerate(specs):
            toks, text, lps, finish, scale, plp = [], [], [], "length", 0, None
            async for ev in self.router.generate(spec):
                if ev.kind == "decision":
                    scale = ev.decision.scale
                elif ev.kind == "prompt_logprobs":
                    plp = ev.prompt_logprobs
                elif ev.kind == "token":
                    toks.append(ev.token_id)
                    text.append(ev.text)
                    lps.append(ev.logprob)
                else:
                    text.append(ev.text)
                    finish = ev.finish_reason
                    for k in ("prompt_tokens", "completion_tokens"):
                        usage[k] += ev.usage[k]
            out_text = "".join(text)
            prompt_text = self.tok.decode(spec.prompt_ids) if echo else ""
            choice = {"index": i, "text": prompt_text + out_text, "finish_reason": finish, "scale": scale,
                      "logprobs": None}
            if want_lp:
                all_ids = (spec.prompt_ids if echo else []) + toks
                token_lps = ([None] + [r[0] for r in plp[1:]] if echo else []) + lps
                # top id -1: the worker did not name the most likely token; report the token itself
                tops = ([None] + [{self._piece(r[1] if r[1] >= 0 else t): r[2]}
                                  for r, t in zip(plp[1:], spec.prompt_ids[1:])] if echo else [])
                tops += [{self._piece(t): lp} for t, lp in zip(toks, lps)]
                offsets, pos = [], 0
                for t in all_ids:
                    offsets.append(pos)
                    pos += len(self._piece(t))
                choice["logprobs"] = {"tokens": [self._piece(t) for t in all_ids], "token_logprobs": token_lps,
                                      "top_logprobs": tops, "text_offset": offsets}
            choices.append(choice)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                                  "choices": choices, "usage": usage})

    async def _stream(self, request, spec, cid, created, model, echo, include_usage: bool):
        gen = self.router.generate(spec)
        try:
            return await self._stream_events(request, gen, spec, cid, created, model, echo, include_usage)
        except ConnectionResetError:  # the client went away mid-stream: nobody is left to answer
            return web.Response(status=499)
        finally:
            await gen.aclose()  # a client gone mid-stream must not leave its request decoding

    async def _stream_events(self, request, gen, spec, cid, created, model, echo, include_usage: bool):
        await anext(gen)  # the decision: admission and the scale decision happen here: errors become plain HTTP errors
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        def chunk(text, finish=None, extra=None):
            c = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            c.update(extra or {})
            return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [c]}

        if echo:
            await send(chunk(self.tok.decode(spec.prompt_ids)))
        usage = None
        try:
            async for ev in gen:
                if ev.kind == "token":
                    await send(chunk(ev.text, extra={"scale": ev.scale, "token_id": ev.token_id}))
                elif ev.kind == "finish":
                    usage = ev.usage
                    await send(chunk(ev.text, ev.finish_reason))
        except ConnectionResetError:
            raise
        except Exception as e:
            code, msg, _ = status_for(e)
            if code.name == "INTERNAL":
                log.error("HTTP stream failed", exc_info=e)
            await send(_error_body(msg, code.name.lower(), HTTP_STATUS[code.name]))
        if usage and include_usage:
            u = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                 "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            await send({"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                        "usage": u})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(self, request):
        cfg = self.router.model_cfg
        return web.json_response({"object": "list", "data": [{
            "id": self.router.cfg.served_model_name, "object": "model", "owned_by": "colm",
            "max_model_len": cfg.max_seq_len, "scales": list(range(1, cfg.num_chains + 1))}]})

    async def tokenize(self, request):
        ids = self.tok.encode(parse(TokenizeRequest, await self._json(request)).prompt)
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.router.model_cfg.max_seq_len})

    async def detokenize(self, request):
        ids = parse(DetokenizeRequest, await self._json(request)).tokens
        vocab = self.router.model_cfg.vocab_size
        bad = next((i for i, t in enumerate(ids) if t >= vocab), None)
        if bad is not None:
            raise BadField(f"tokens[{bad}]={ids[bad]} is outside the vocabulary 0..{vocab - 1}", f"tokens[{bad}]")
        return web.json_response({"prompt": self.tok.decode(ids)})

    async def tokenizer_info(self, request):
        cfg = self.router.model_cfg
        return web.json_response({"tokenizer": self.tok.spec(), "vocab_size": cfg.vocab_size,
                                  "bos_token_id": self.tok.bos_id, "eos_token_id": self.tok.eos_id,
                                  "max_model_len": cfg.max_seq_len})

    async def set_scale(self, request):
        """Switch a running completion's scale: ``POST /v1/requests/{id}/scale {"scale": k}``, ``id`` as the
        response's ``id`` (``cmpl-...`` / ``chatcmpl-...``) or without its prefix. Same rules as gRPC's
        UpdateRequest; answers ``{"id", "scale"}``."""
        rid = request.match_info["request_id"]
        for prefix in ("chatcmpl-", "cmpl-"):
            rid = rid.removeprefix(prefix)
        body = await self._json(request)
        scale = body.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ValueError(f"scale={scale!r}: give an integer in 1..{self.router.model_cfg.num_chains}")
        return web.json_response({"id": request.match_info["request_id"], "scale": await self.router.set_scale(rid, scale)})

    async def health(self, request):
        ok, reason = self.router.health()  # a healthy prefill AND decode worker, as gRPC's Health says
        body = {"status": "ok"} if ok else {"status": "unavailable", "reason": reason}
        return web.json_response(body, status=200 if ok else 503)


async def start_http(router: Router) -> tuple[web.AppRunner, int]:
    """Serve the HTTP API on router.cfg.host:http_port; returns (runner, bound port)."""
    cfg = router.cfg
    runner = web.AppRunner(HttpApi(router).app(), access_log=None)
    await runner.setup()
    ssl_ctx = None
    if cfg.tls_cert:
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    site = web.TCPSite(runner, cfg.host, cfg.http_port, ssl_context=ssl_ctx)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(e.errno, f"router.http_port: cannot listen on {cfg.host}:{cfg.http_port} ({e.strerror}); "
                               "choose another port (0 = any free one)") from None
    port = site._server.sockets[0].getsockname()[1]
    return runner, port
