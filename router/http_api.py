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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid

from aiohttp import web
from aiohttp.web import RequestPayloadError

from colm.router.coalesce import coalesced
from colm.router.core import Router
from colm.router.drain import CUT_GRACE_S, Drain
from colm.router.stop_trim import StopTrimmer
from colm.router.grpc_server import _key_ok, status_for
from colm.chat_template import TokenizerConfig
from colm.tokenizer import check_fits
from colm.router.http_guard import ConnectionGuard, default_max_connections, quiet_client_errors
from colm.router.openai_schema import (BadField, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                       TokenizeRequest, parse)
from colm.router.policy import Budget
from colm.proto.convert import SEED_MAX
from colm.sampling import SamplingParams

log = logging.getLogger("colm.router")

HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "DEADLINE_EXCEEDED": 504,
               "UNAVAILABLE": 503, "INTERNAL": 500}
HTTP_TYPE = {401: "unauthenticated", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
             408: "request_timeout"}


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


async def _off_loop(build) -> web.Response:
    """A JSON response whose body ``build()`` makes (bytes) on a thread: a completion of 16 choices of 1,000 tokens
    with 20 top log-probs each is 8.7 MB, whose building and serialising held the event loop (health included)
    for half a second."""
    body = await asyncio.get_running_loop().run_in_executor(None, build)
    return web.Response(body=body, content_type="application/json")


def _param(e: BaseException, msg: str) -> str | None:
    """The field a 400 is about: BadField says; the router core's messages start with the field's name."""
    if isinstance(e, BadField) or not isinstance(e, ValueError):
        return getattr(e, "param", None)
    m = re.match(r"(?:budget\.)?(\w+)", msg)
    name = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}.get(m.group(1), m.group(1)) if m else None
    return name if name in CompletionRequest.model_fields else None


class ModelNotFound(Exception):
    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.")


def _http_error(request, e: web.HTTPException, max_body: int) -> web.Response:
    """aiohttp's own errors (unknown path, wrong method, body too large) in the JSON error shape."""
    msg = {404: f"no such path: {request.path}",
           405: f"method {request.method} is not allowed on {request.path}; allowed: "
                f"{', '.join(sorted(getattr(e, 'allowed_methods', ()) or ()))}",
           413: f"request body exceeds the limit of {max_body} bytes (router.max_message_bytes)",
           408: "the request body did not arrive within router.http_head_timeout_s"}
    headers = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
    resp = web.json_response(_error_body(msg.get(e.status, e.reason), HTTP_TYPE.get(e.status, "http_error"), e.status),
                             status=e.status, headers=headers)
    if e.status == 408:
        resp.force_close()  # the rest of that body may still come: the connection cannot carry another request
    return resp


def _metadata(request) -> list[tuple[str, str]]:
    """Headers as gRPC-style metadata (lower-case names) for ``_key_ok``. aiohttp keeps bytes that are not
    UTF-8 as surrogates, which the key's constant-time compare cannot encode: they become U+FFFD (no match)."""
    return [(k.lower(), v.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
            for k, v in request.headers.items()]


# request key: set once the request's event stream has started (aiohttp < 3.13 has no RequestKey: a plain name)
STREAMING = web.RequestKey("colm_streaming", bool) if hasattr(web, "RequestKey") else "colm_streaming"


# answered while the router shuts down too: health (which says so), and a scale switch of a request in flight
WHILE_DRAINING = re.compile(r"/health|/v1/requests/[^/]+/scale")


def _shutting_down(message: str) -> web.Response:
    resp = web.json_response(_error_body(message, "unavailable", 503), status=503)
    resp.force_close()  # a client on this connection must reconnect: to another router, or find none
    return resp


class HttpApi:
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

    def _model(self, req) -> tuple[str, int | None]:
        """(the model name to answer with, the scale it pins or None); ModelNotFound (404) for other names."""
        name = self.router.cfg.served_model_name
        if req.model is None or req.model == name:
            return name, None
        base, at, k = req.model.rpartition("@")
        if at and base == name and k.isdigit() and k == str(int(k)) and int(k) in self.router.served_scales():
            return req.model, int(k)
        raise ModelNotFound(req.model)

    def _stops(self, req) -> tuple[str, ...]:
        stop = req.stop or ()
        return (stop,) if isinstance(stop, str) else tuple(stop)

    def _spec(self, req, prompt, echo_logprobs: bool, max_new_tokens: int | None = None,
              stop_token_ids: tuple[int, ...] = (), choice: int = 0, request_id: str = ""):
        """The router's spec of one sequence of ``prompt``; ``choice`` j of n is seeded ``seed + j`` (wrapping).
        ``request_id``: the completion's id, which all its sequences share (a scale switch names them all)."""
        ext = req.extras()
        _, pinned = self._model(req)
        scale = ext.get("scale")
        if pinned is not None and scale is not None and scale != pinned:
            raise BadField(f"scale={scale} conflicts with model {req.model!r}, which serves scale {pinned}", "scale")
        if max_new_tokens is None:
            max_new_tokens = 16 if req.max_tokens is None else req.max_tokens
        seed = None if req.seed is None else (req.seed + choice) % (SEED_MAX + 1)
        params = SamplingParams(max_new_tokens=max_new_tokens,
                                temperature=1.0 if req.temperature is None else req.temperature,
                                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(0, req.top_k or 0),
                                seed=seed, stop_strings=self._stops(req),
                                stop_token_ids=tuple(dict.fromkeys((*stop_token_ids, *(req.stop_token_ids or ())))),
                                ignore_eos=bool(req.ignore_eos), top_logprobs=req.num_top_logprobs(),
                                **req.adjustments())
        budget = Budget(ttft_ms=ext.get("ttft_ms"), tpot_ms=ext.get("tpot_ms"), deadline_ms=ext.get("deadline_ms"),
                        on_miss=ext.get("on_miss", "degrade"))
        if isinstance(prompt, str):
            if not req.truncate_prompt_tokens:  # a truncated prompt is kept from its end: it is tokenized whole
                check_fits(self.tcfg.encode, prompt, self.router.model_cfg.max_seq_len)
            ids = self.tcfg.encode(prompt, req.add_special_tokens is not False)
        else:
            ids = prompt
        if req.truncate_prompt_tokens:
            ids = ids[-req.truncate_prompt_tokens:]
        return self.router.validate(ids, None, params, budget, pinned or scale, request_id,
                                    prompt_logprobs=echo_logprobs,
                                    speculative=ext.get("speculative") or 0, cache_salt=req.cache_salt or "")

    def _trimmer(self, req) -> StopTrimmer:
        return StopTrimmer(self._stops(req), bool(req.include_stop_str_in_output))

    def _piece(self, t: int) -> str:
        return self.tok.decode([t])

    async def _gather(self, jobs):
        """Run the coroutines ``jobs`` at once (the choices of a request); one failing cancels the others and its
        error is the request's."""
        tasks = [asyncio.ensure_future(j) for j in jobs]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _run(self, spec, trim):
        """One sequence to its end: (token ids, text pieces, logprobs, finish reason, scale, prompt logprobs, usage,
        top logprobs per token)."""
        toks, text, lps, finish, scale, plp, usage, tops = [], [], [], "length", 0, None, None, []
        async with contextlib.aclosing(self.router.generate(spec)) as gen:
            async for ev in gen:
                if ev.kind == "decision":
                    scale = ev.decision.scale
                elif ev.kind == "prompt_logprobs":
                    plp = ev.prompt_logprobs
                elif ev.kind == "token":
                    toks.append(ev.token_id)
                    text.append(trim.add(ev.text))
                    lps.append(ev.logprob)
                    tops.append(ev.top_logprobs)
                else:
                    text.append(trim.add(ev.text) + trim.flush())
                    finish, usage = ev.finish_reason, ev.usage
        return toks, text, lps, finish, scale, plp, usage, tops

    @staticmethod
    def _usage(usages: list, prompt_of: list[int], speculative: bool = False) -> dict:
        """Totals over the choices: each prompt's tokens once (its n choices share it), every choice's output;
        ``speculative`` (the request asked for drafts): the output tokens that were accepted chain-1 drafts too."""
        seen, prompt, completion, drafted = set(), 0, 0, 0
        for u, p in zip(usages, prompt_of):
            if u is None:
                continue
            if p not in seen:
                seen.add(p)
                prompt += u["prompt_tokens"]
            completion += u["completion_tokens"]
            drafted += u.get("draft_accepted_tokens", 0)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        if speculative:
            usage["draft_accepted_tokens"] = drafted
        return usage

    async def completions(self, request):
        req = parse(CompletionRequest, await self._json(request))
        prompts = req.prompt  # a list of prompts, each a string or a list of token ids
        echo = bool(req.echo)
        want_lp = req.logprobs is not None and req.logprobs is not False
        model, _ = self._model(req)
        n = req.n or 1
        cap = self.router.cfg.max_running + self.router.cfg.max_queued
        if len(prompts) * n > cap:  # before any prompt is tokenized: a huge batch must not hold the event loop
            raise BadField(f"prompt: {len(prompts)} prompts x n={n} = {len(prompts) * n} completions in one request; "
                           f"at most {cap} (router.max_running + router.max_queued) can be admitted at once", "prompt")
        # choice i * n + j: the j-th sequence of prompt i (OpenAI's and vLLM's order)
        await self.router.precompile(req.structured())  # off the event loop; _spec then finds it compiled
        rid = uuid.uuid4().hex
        specs = [self._spec(req, p, echo and want_lp, choice=j, request_id=rid) for p in prompts for j in range(n)]
        prompt_of = [i for i in range(len(prompts)) for _ in range(n)]
        created = int(time.time())
        cid = f"cmpl-{rid}"
        ids = {"id": cid, "object": "text_completion", "created": created, "model": model}
        speculative = any(s.speculative for s in specs)  # tokens say whether they were accepted drafts
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            offsets = [0] * len(specs)  # text_offset of each choice's next token
            extra = {"usage": None} if include_usage else {}  # OpenAI: every chunk but the last has a null usage

            def chunk(index, text, finish=None, ev=None):
                c = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
                if ev is not None:
                    c.update({"scale": ev.scale, "token_id": ev.token_id})
                    if speculative:
                        c["drafted"] = ev.drafted
                    if want_lp:
                        piece = self._piece(ev.token_id)
                        c["logprobs"] = {"tokens": [piece], "token_logprobs": [ev.logprob],
                                         "top_logprobs": [self._top_dict(ev.token_id, ev.logprob, ev.top_logprobs)],
                                         "text_offset": [offsets[index]]}
                        offsets[index] += len(piece)
                return {**ids, "choices": [c], **extra}

            head = [chunk(i, self.tok.decode(s.prompt_ids)) for i, s in enumerate(specs)] if echo else []
            return await self._stream(request, specs, chunk, head, [self._trimmer(req) for _ in specs],
                                      include_usage, ids, prompt_of)
        runs = await self._gather(self._run(spec, self._trimmer(req)) for spec in specs)
        return await _off_loop(lambda: self._completion_body(specs, runs, ids, echo, want_lp, prompt_of, speculative))

    def _completion_body(self, specs, runs, ids, echo: bool, want_lp: bool, prompt_of, speculative: bool) -> bytes:
        """The JSON of a non-streamed completion: every choice, its log-probs, the usage."""
        choices = []
        for i, (spec, (toks, text, lps, finish, scale, plp, _, top)) in enumerate(zip(specs, runs)):
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
                tops += [self._top_dict(t, lp, alts) for t, lp, alts in zip(toks, lps, top)]
                offsets, pos = [], 0
                for t in all_ids:
                    offsets.append(pos)
                    pos += len(self._piece(t))
                choice["logprobs"] = {"tokens": [self._piece(t) for t in all_ids], "token_logprobs": token_lps,
                                      "top_logprobs": tops, "text_offset": offsets}
            choices.append(choice)
        usage = self._usage([r[6] for r in runs], prompt_of, speculative)
        return json.dumps({**ids, "choices": choices, "usage": usage}).encode()

    async def chat_completions(self, request):
        req = parse(ChatCompletionRequest, await self._json(request))
        model, _ = self._model(req)
        forced = req.forced_tool()
        if forced is not None and forced.name is None and req.stream:
            raise BadField('stream: tool_choice "required" is returned whole (its calls are known once the array '
                           "ends); set stream to false, or name the function", "stream")
        text = self.tcfg.render(req.messages, add_generation_prompt=req.add_generation_prompt is not False,
                                tools=req.tools)
        if not req.truncate_prompt_tokens:
            try:
                check_fits(self.tcfg.encode, text, self.router.model_cfg.max_seq_len, "messages")
            except ValueError as e:
                raise BadField(str(e), "messages") from None
        ids = self.tcfg.encode(text, bool(req.add_special_tokens))
        if not ids:
            raise BadField("messages: the chat template rendered an empty prompt", "messages")
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is None:  # OpenAI's default: up to the end of the context
            max_new = max(0, self.router.model_cfg.max_seq_len - len(ids))
        eos = self.tcfg.token_id("eos_token")  # the template's end of turn, which may not be the tokenizer's EOS
        await self.router.precompile(req.structured())
        rid = uuid.uuid4().hex
        specs = [self._spec(req, ids, False, max_new, () if eos is None or req.ignore_eos else (eos,), choice=j,
                            request_id=rid) for j in range(req.n or 1)]
        created, cid = int(time.time()), f"chatcmpl-{rid}"
        head = {"id": cid, "object": "chat.completion", "created": created, "model": model}
        want_lp = bool(req.logprobs)
        speculative = any(s.speculative for s in specs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            head["object"] = "chat.completion.chunk"
            extra = {"usage": None} if include_usage else {}

            call_ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in specs] if forced is not None else []
            # each choice's log-prob entries of tokens whose text is not out yet (held back by a stop string, or a
            # part of a UTF-8 character): they go out with the next chunk of that choice, the finish chunk at the
            # latest, so that a stream carries every token's entry, as the unstreamed response does
            pending: list[list[dict]] = [[] for _ in specs]
            drafted: list[list[bool]] = [[] for _ in specs]  # speculative: the same tokens' accepted-draft flags

            def chunk(index, text, finish=None, ev=None, role=False):
                if ev is not None and want_lp:
                    pending[index].append(self._chat_logprob(ev.token_id, ev.logprob, ev.top_logprobs))
                if ev is not None and speculative:
                    drafted[index].append(ev.drafted)
                if not text and finish is None and not role:
                    return None
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                if forced is not None:  # a named function: its arguments stream as the call's (OpenAI's deltas)
                    call = {"index": 0, "id": call_ids[index], "type": "function",
                            "function": {"name": forced.name, "arguments": ""}} if role else \
                        {"index": 0, "function": {"arguments": text}}
                    delta = {"role": "assistant", "content": None, "tool_calls": [call]} if role else \
                        ({"tool_calls": [call]} if text else {})
                c = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                if ev is not None:
                    c["scale"] = ev.scale
                if pending[index] and not role:
                    c["logprobs"], pending[index] = {"content": pending[index]}, []
                if drafted[index] and not role:
                    c["drafted"], drafted[index] = drafted[index], []
                return {**head, "choices": [c], **extra}

            return await self._stream(request, specs, chunk, [chunk(j, "", role=True) for j in range(len(specs))],
                                      [self._trimmer(req) for _ in specs], include_usage, head, [0] * len(specs))
        runs = await self._gather(self._run(spec, self._trimmer(req)) for spec in specs)
        return await _off_loop(lambda: self._chat_body(runs, head, want_lp, forced, speculative))

    def _chat_body(self, runs, head, want_lp: bool, forced, speculative: bool) -> bytes:
        """The JSON of a non-streamed chat completion: every choice (tool calls parsed), its log-probs, the usage."""
        choices = [{"index": j, "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": {"content": [self._chat_logprob(t, lp, alts) for t, lp, alts in zip(toks, lps, top)]}
                    if want_lp else None, "finish_reason": finish, "scale": scale}
                   for j, (toks, text, lps, finish, scale, _, _, top) in enumerate(runs)]
        for c in choices if forced is not None else ():
            calls = forced.calls(c["message"]["content"]) if c["finish_reason"] == "stop" else None
            if calls:  # a finished call: OpenAI's form (a truncated one stays text, finish_reason "length")
                c["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
                c["finish_reason"] = "stop" if forced.name is not None else "tool_calls"
        return json.dumps({**head, "choices": choices, "usage": self._usage([r[6] for r in runs], [0] * len(runs),
                                                                            speculative)}).encode()

    def _chat_logprob(self, token_id: int, logprob: float, alts=()) -> dict:
        return {**self._chat_token(token_id), "logprob": logprob,
                "top_logprobs": [{**self._chat_token(t), "logprob": lp} for t, lp in alts]}

    def _chat_token(self, token_id: int) -> dict:
        """A chat log-prob's ``token`` and ``bytes``: OpenAI's ``bytes`` are the token's own, which joined make the
        text, so a token holding part of a UTF-8 character has that part (its ``token`` text shows U+FFFD).
        Tokenizers that cannot say a token's bytes (no ``decode_bytes``) give its text's UTF-8."""
        piece = self._piece(token_id)
        raw = self._raw_bytes([token_id]) if self._raw_bytes is not None else piece.encode("utf-8")
        return {"token": piece, "bytes": list(raw)}

    def _top_dict(self, token_id: int, logprob: float, alts) -> dict:
        """A completion token's ``top_logprobs`` entry: the most likely tokens' text -> log-prob, and the token itself
        (as vLLM adds it when it is not among them)."""
        top = {self._piece(t): lp for t, lp in alts}
        top.setdefault(self._piece(token_id), logprob)
        return top

    async def _stream(self, request, specs, chunk, head: list, trims: list, include_usage: bool, ids: dict,
                      prompt_of: list[int]):
        """Server-sent events of the choices ``specs``: ``head``, then ``chunk(index, text, finish, event)`` per token
        and at each choice's finish (None skips it), the choices' events as they come, then the usage when asked
        for, then [DONE]. ``ids`` are the id / object / created / model of the usage chunk; ``prompt_of[i]``: the
        prompt of choice i (its tokens count once in the usage)."""
        gens = [self.router.generate(s) for s in specs]
        try:
            return await self._stream_events(request, gens, chunk, head, trims, include_usage, ids, prompt_of,
                                             any(s.speculative for s in specs))
        except ConnectionResetError:  # the client went away mid-stream: nobody is left to answer
            return web.Response(status=499)
        finally:
            for gen in gens:  # a client gone mid-stream must not leave its requests decoding
                await gen.aclose()

    @staticmethod
    async def _merged(gens):
        """(choice index, batch of events) from every generator as they come; one's failure ends the stream with
        its error."""
        if len(gens) == 1:
            async with contextlib.aclosing(coalesced(gens[0])) as batches:
                async for batch in batches:
                    yield 0, batch
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index, gen):
            try:
                async with contextlib.aclosing(coalesced(gen)) as batches:
                    async for batch in batches:
                        await queue.put((index, batch))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((index, e))
            await queue.put((index, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
        try:
            left = len(tasks)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_events(self, request, gens, chunk, head, trims, include_usage: bool, ids: dict, prompt_of,
                             speculative: bool = False):
        for gen in gens:  # the decisions: admission and the scale decision happen here: errors become plain HTTP errors
            await anext(gen)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        request[STREAMING] = True
        await resp.prepare(request)

        async def send(*objs) -> None:
            body = "".join(f"data: {json.dumps(obj)}\n\n" for obj in objs if obj is not None)
            if body:
                await resp.write(body.encode())

        await send(*head)
        usages = [None] * len(gens)
        try:
            # one write per batch of events (several when the client or this process falls behind), a chunk per token
            async with contextlib.aclosing(self._merged(gens)) as batches:
                async for index, batch in batches:
                    out, trim = [], trims[index]
                    for ev in batch:
                        if ev.kind == "token":
                            out.append(chunk(index, trim.add(ev.text), None, ev))
                        elif ev.kind == "finish":
                            usages[index] = ev.usage
                            out.append(chunk(index, trim.add(ev.text) + trim.flush(), ev.finish_reason))
                    await send(*out)
        except ConnectionResetError:
            raise
        except asyncio.CancelledError:
            why = self.drain.cut_error()
            if why is None:
                raise
            await send(_error_body(why, "unavailable", 503))
        except Exception as e:
            code, msg, _ = status_for(e)
            if code.name == "INTERNAL":
                log.error("HTTP stream failed", exc_info=e)
            await send(_error_body(msg, code.name.lower(), HTTP_STATUS[code.name]))
        if include_usage and all(u is not None for u in usages):
            await send({**ids, "choices": [], "usage": self._usage(usages, prompt_of, speculative)})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def reset_prefix_cache(self, request):
        """vLLM's ``POST /reset_prefix_cache``: every decode worker forgets its cached prefixes (benchmarks between
        passes; the API key applies). Answers {"workers": {worker: idle blocks freed, or its error}}."""
        return web.json_response({"workers": await self.router.reset_prefix_cache()})

    def _cards(self) -> list[dict]:
        """The model cards: the served name, then ``NAME@k`` for every scale k it serves."""
        cfg, name = self.router.model_cfg, self.router.cfg.served_model_name
        scales = self.router.served_scales()
        card = {"object": "model", "created": 0, "owned_by": "colm", "max_model_len": cfg.max_seq_len}
        data = [{"id": name, **card, "root": name, "parent": None, "scales": scales}]
        data += [{"id": f"{name}@{k}", **card, "root": name, "parent": name, "scale": k} for k in scales]
        return data

    async def models(self, request):
        return web.json_response({"object": "list", "data": self._cards()})

    async def model(self, request):
        """OpenAI's ``GET /v1/models/{model}`` (``client.models.retrieve``): a listed model's card; 404 others."""
        name = request.match_info["model"]
        card = next((c for c in self._cards() if c["id"] == name), None)
        if card is None:
            raise ModelNotFound(name)
        return web.json_response(card)

    async def tokenize(self, request):
        req = parse(TokenizeRequest, await self._json(request))
        ids = self.tcfg.encode(req.prompt, req.add_special_tokens is not False)
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
        # the special tokens by name, as vLLM's /tokenizer_info gives them: lm-eval's remote tokenizer reads
        # eos_token and finds its id through /tokenize
        return web.json_response({"tokenizer": self.tok.spec(), "tokenizer_class": type(self.tok).__name__,
                                  "vocab_size": cfg.vocab_size, "bos_token_id": self.tok.bos_id,
                                  "eos_token_id": self.tok.eos_id, "max_model_len": cfg.max_seq_len,
                                  "model_max_length": cfg.max_seq_len, **self.tcfg.special,
                                  "chat_template": self.tcfg.chat_template})

    async def set_scale(self, request):
        """Switch a running completion's scale: ``POST /v1/requests/{id}/scale {"scale": k}``, ``id`` as the
        response's ``id`` (``cmpl-...`` / ``chatcmpl-...``) or without its prefix. Same rules as gRPC's
        UpdateRequest; answers ``{"id", "scale"}``."""
        rid = request.match_info["request_id"]
        for prefix in ("chatcmpl-", "cmpl-"):
            rid = rid.removeprefix(prefix)
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadField(f"request body must be a JSON object like {{\"scale\": 1}}, got {type(body).__name__}", None)
        extra = sorted(set(body) - {"scale"})
        if extra:
            raise BadField(f"{extra[0]}: not a field of the scale switch (its body is {{\"scale\": k}})", extra[0])
        scale = body.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ValueError(f"scale={scale!r}: give an integer in 1..{self.router.model_cfg.num_chains}")
        return web.json_response({"id": request.match_info["request_id"], "scale": await self.router.set_scale(rid, scale)})

    async def health(self, request):
        ok, reason = self.router.health()  # a healthy prefill AND decode worker, as gRPC's Health says
        body = {"status": "ok"} if ok else {"status": "unavailable", "reason": reason}
        return web.json_response(body, status=200 if ok else 503)


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
