"""OpenAI-compatible HTTP front of the router (aiohttp).

Endpoints: ``POST /v1/completions`` (streaming as server-sent events, ``logprobs`` and ``echo`` of
prompt tokens, batched prompts), ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``, ``GET /health``. The scale or a latency budget rides in extra fields:
``scale``, ``ttft_ms``, ``tpot_ms``, ``deadline_ms``, ``on_miss`` (top level or inside ``"colm": {}``).
aiohttp is chosen because Ray's default extra already installs it, it runs on the router's asyncio
loop beside grpc.aio, and it supports streaming responses and TLS without further dependencies.
Errors come back as OpenAI-style ``{"error": {...}}`` with 400 / 401 / 429 / 503 / 504 / 500.
"""

from __future__ import annotations

import hmac
import json
import time

from aiohttp import web

from colm.router.core import Router
from colm.router.grpc_server import status_for
from colm.router.policy import Budget
from colm.sampling import SamplingParams

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504, "UNAVAILABLE": 503,
               "INTERNAL": 500}
BUDGET_FIELDS = ("scale", "ttft_ms", "tpot_ms", "deadline_ms", "on_miss")


def _error(e: BaseException) -> web.Response:
    code, msg, retry = status_for(e)
    headers = {"Retry-After": f"{max(1, round(retry))}"} if retry is not None else None
    return web.json_response({"error": {"message": msg, "type": code.name.lower(), "code": HTTP_STATUS[code.name]}},
                             status=HTTP_STATUS[code.name], headers=headers)


def _prompts(body: dict) -> list:
    p = body.get("prompt")
    if p is None or p == "" or p == []:
        raise ValueError("prompt is empty: give a string, a list of token ids, or a list of either")
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and all(isinstance(t, int) for t in p):
        return [p]
    if isinstance(p, list) and all(isinstance(x, (str, list)) for x in p):
        return p
    raise ValueError("prompt: expected a string, a list of token ids, or a list of strings / token-id lists")


def _extras(body: dict) -> dict:
    ext = dict(body.get("colm") or {})
    ext.update({k: body[k] for k in BUDGET_FIELDS if k in body})
    return ext


class HttpApi:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.tok = router.tokenizer

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=self.router.cfg.max_message_bytes)
        app.add_routes([web.post("/v1/completions", self.completions), web.get("/v1/models", self.models),
                        web.post("/tokenize", self.tokenize), web.post("/detokenize", self.detokenize),
                        web.get("/tokenizer_info", self.tokenizer_info), web.get("/health", self.health)])
        return app

    @web.middleware
    async def _auth(self, request, handler):
        key = self.router.cfg.api_key
        if key and request.path != "/health":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return web.json_response({"error": {"message": "missing or wrong API key", "type": "unauthenticated",
                                                    "code": 401}}, status=401)
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as e:
            return _error(e)

    async def _json(self, request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        return body

    def _spec(self, body: dict, prompt, echo_logprobs: bool):
        ext = _extras(body)
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens={max_tokens!r}: must be an integer >= 0")
        stop = body.get("stop") or ()
        params = SamplingParams(max_new_tokens=max_tokens, temperature=float(body.get("temperature", 1.0)),
                                top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0) or 0),
                                seed=body.get("seed"), stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
                                ignore_eos=bool(body.get("ignore_eos", False)))
        budget = Budget(ttft_ms=ext.get("ttft_ms"), tpot_ms=ext.get("tpot_ms"), deadline_ms=ext.get("deadline_ms"),
                        on_miss=ext.get("on_miss", "degrade"))
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        return self.router.validate(ids, text, params, budget, ext.get("scale"), prompt_logprobs=echo_logprobs)

    def _piece(self, t: int) -> str:
        return self.tok.decode([t])

    async def completions(self, request):
        body = await self._json(request)
        prompts = _prompts(body)
        echo = bool(body.get("echo", False))
        want_lp = body.get("logprobs") is not None and body.get("logprobs") is not False
        if body.get("n", 1) != 1:
            raise ValueError(f"n={body.get('n')}: only n=1 is supported")
        specs = [self._spec(body, p, echo and want_lp) for p in prompts]
        created = int(time.time())
        cid = f"cmpl-{specs[0].request_id}"
        model = self.router.cfg.served_model_name
        if body.get("stream"):
            if len(specs) != 1:
                raise ValueError("stream=true takes a single prompt")
            return await self._stream(request, specs[0], cid, created, model, echo, body)
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

    async def _stream(self, request, spec, cid, created, model, echo, body):
        gen = self.router.generate(spec)
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
        except Exception as e:
            code, msg, _ = status_for(e)
            await send({"error": {"message": msg, "type": code.name.lower(), "code": HTTP_STATUS[code.name]}})
        if usage and (body.get("stream_options") or {}).get("include_usage"):
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
        body = await self._json(request)
        if "prompt" not in body or not isinstance(body["prompt"], str):
            raise ValueError("tokenize: give {\"prompt\": TEXT}")
        ids = self.tok.encode(body["prompt"])
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.router.model_cfg.max_seq_len})

    async def detokenize(self, request):
        body = await self._json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError("detokenize: give {\"tokens\": [ids]}")
        return web.json_response({"prompt": self.tok.decode(ids)})

    async def tokenizer_info(self, request):
        cfg = self.router.model_cfg
        return web.json_response({"tokenizer": self.tok.spec(), "vocab_size": cfg.vocab_size,
                                  "bos_token_id": self.tok.bos_id, "eos_token_id": self.tok.eos_id,
                                  "max_model_len": cfg.max_seq_len})

    async def health(self, request):
        ok = any(w.healthy and w.role == "decode" for w in self.router.registry.workers.values())
        return web.json_response({"status": "ok" if ok else "unavailable"}, status=200 if ok else 503)


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
