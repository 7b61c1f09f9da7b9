"""The router's public gRPC service (``colm.v1.Colm``), with health checking and reflection.

One interceptor guards every method: it checks the API key when one is configured (metadata
``authorization: Bearer KEY`` or ``x-api-key: KEY``, constant-time compare), answers a request that
does not parse as its message type with INVALID_ARGUMENT (its deserializer is wrapped: an exception
there would reach grpc as UNKNOWN with a traceback), and maps exceptions to status codes
(ValueError -> INVALID_ARGUMENT, Overloaded / BudgetUnmet / full pools -> RESOURCE_EXHAUSTED with a
``retry-after-s`` trailer, deadline -> DEADLINE_EXCEEDED, no worker -> UNAVAILABLE, anything else ->
INTERNAL), logging one line with the request id. At shutdown it refuses new calls (UNAVAILABLE; but ``Health``,
which says why, and ``UpdateRequest``) and answers UNAVAILABLE for those the drain's end cuts (``router/drain.py``).
The servicer only converts messages to the router core's types and back; ``spec_from_proto`` checks every field of a
GenerateRequest first, naming the field by its proto path (``sampling.temperature``, ``budget.deadline_ms``); sampling
and budget go through ``colm.proto.convert``, the one module that converts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re

import grpc

from colm.proto import load_proto
from colm.proto.convert import budget_from_public, sampling_from_public, structured_from_proto
from colm.proto.rpc import SERVER_OPTIONS, bind_port
from colm.router.admission import Overloaded
from colm.router.backend import WorkerFailed
from colm.router.coalesce import coalesced
from colm.router.core import Router
from colm.router.drain import Drain
from colm.router.placement import NoWorker
from colm.router.policy import BudgetUnmet
from colm.router.request import DeadlineExceeded, Unavailable, UnknownRequest
from colm.router.stop_trim import StopTrimmer
from colm.tokenizer import encode_prompt

log = logging.getLogger("colm.router")
pb2, pb2_grpc = load_proto("public")
SERVICE_NAME = "colm.v1.Colm"
# answered while the router shuts down too: health (which says so), and a scale switch of a request in flight
WHILE_DRAINING = {f"/{SERVICE_NAME}/Health", f"/{SERVICE_NAME}/UpdateRequest"}

REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: ids go into logs and worker keys


def status_for(e: BaseException) -> tuple[grpc.StatusCode, str, float | None]:
    if isinstance(e, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(e), None
    if isinstance(e, (Overloaded, BudgetUnmet)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after_s
    if isinstance(e, NoWorker) and e.full:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), 1.0
    if isinstance(e, (DeadlineExceeded, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(e) or "deadline exceeded", None
    if isinstance(e, (Unavailable, NoWorker, WorkerFailed)):  # a worker's outage, never the request's fault
        return grpc.StatusCode.UNAVAILABLE, str(e), None
    if isinstance(e, UnknownRequest):
        return grpc.StatusCode.NOT_FOUND, str(e), None
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", None


def _request_id(request) -> str:
    rid = getattr(request, "request_id", "")
    return repr(rid[:64]) if rid and not REQUEST_ID_RE.fullmatch(rid) else (rid or "-")


class Unparseable:
    """What a wrapped deserializer hands the handler for bytes that are not a valid message of its type."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as e:  # noqa: BLE001 - DecodeError, and whatever else a parser may raise on garbage
            return Unparseable(str(e) or type(e).__name__)

    return parse


def _key_ok(metadata, api_key: str | None) -> bool:
    """Whether the metadata carries ``api_key``: ``x-api-key: KEY``, or ``authorization: Bearer KEY`` (the scheme
    matched without regard to case, as HTTP auth schemes are); a bare key in ``authorization`` is refused."""
    if not api_key:
        return True
    md = dict(metadata or ())
    given = md.get("x-api-key")
    if not given:
        scheme, _, token = md.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """API key check, the shutdown's drain and exception -> status mapping for the public service."""

    def __init__(self, api_key: str | None, drain: Drain) -> None:
        self.api_key = api_key
        self.drain = drain

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        key_ok = _key_ok(details.invocation_metadata, self.api_key)
        method = details.method
        drain = self.drain

        async def check(request, context):
            if not key_ok:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong API key")
            if isinstance(request, Unparseable):
                log.info("%s -> INVALID_ARGUMENT: unparseable request: %s", method, request.error)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.error}")
            if drain.refusal and method not in WHILE_DRAINING:
                await context.abort(grpc.StatusCode.UNAVAILABLE, drain.refusal)

        async def cut(context):  # in ``except CancelledError``: the drain's cut answers UNAVAILABLE, saying so
            why = drain.cut_error()
            if why is not None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, why)

        async def fail(request, context, e: BaseException):
            code, msg, retry = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s request_id=%s -> INTERNAL", method, _request_id(request), exc_info=e)
            else:
                log.info("%s request_id=%s -> %s: %s", method, _request_id(request), code.name, msg)
            if retry is not None:
                context.set_trailing_metadata((("retry-after-s", f"{retry:.3f}"),))
            await context.abort(code, msg)

        @contextlib.asynccontextmanager
        async def guarded(request, context):
            """Around a call's handling, on its task: in flight for the drain; the drain's cut answers UNAVAILABLE,
            any other failure its status (``fail``); aborts and other cancellations pass."""
            with drain.serving() as call:
                try:
                    yield call
                except asyncio.CancelledError:
                    await cut(context)
                    raise
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await fail(request, context, e)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                await check(request, context)
                async with guarded(request, context):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, _tolerant(handler.request_deserializer),
                                                       handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                await check(request, context)
                async with guarded(request, context) as call, \
                        contextlib.aclosing(inner_stream(request, context)) as items:
                    async for item in items:
                        call.outside = True  # grpc writes it: a cancellation there ends the call silently
                        yield item
                        call.outside = False
                        if call.cut:  # the drain ended while grpc wrote
                            await context.abort(grpc.StatusCode.UNAVAILABLE, call.cut)

            return grpc.unary_stream_rpc_method_handler(stream, _tolerant(handler.request_deserializer),
                                                        handler.response_serializer)
        return handler


def _check_size(router: Router, req) -> None:
    if req.ByteSize() > router.cfg.max_message_bytes:
        raise ValueError(f"request of {req.ByteSize()} bytes exceeds the limit of {router.cfg.max_message_bytes}")


def spec_from_proto(router: Router, req) -> "object":
    """GenerateRequest -> RequestSpec (ValueError naming the field's proto path on anything malformed)."""
    _check_size(router, req)
    if req.request_id and not REQUEST_ID_RE.fullmatch(req.request_id):
        raise ValueError(f"request_id={req.request_id[:64]!r}{'...' if len(req.request_id) > 64 else ''}: must be 1 to "
                         f"128 printable ASCII characters without spaces (or empty: the router assigns one)")
    params = sampling_from_public(req.sampling, router.cfg.default_max_new_tokens)
    if req.scale < 0:
        raise ValueError(f"scale={req.scale}: must be >= 1 (or 0 to let the router choose)")
    if req.prompt_logprobs < 0:
        raise ValueError(f"prompt_logprobs={req.prompt_logprobs}: must be >= 0 (0 = off)")
    budget = budget_from_public(req.budget)
    which = req.WhichOneof("prompt")
    text = req.text if which == "text" else None
    ids = list(req.token_ids.ids) if which == "token_ids" else None
    return router.validate(ids, text, params, budget, req.scale or None, req.request_id, req.prompt_logprobs > 0,
                           req.speculative, req.cache_salt)


def _decision(d, prompt_tokens: int):
    return pb2.Decision(scale=d.scale, predicted_ttft_ms=d.ttft_ms, predicted_tpot_ms=d.tpot_ms, degraded=d.degraded,
                        prompt_tokens=prompt_tokens)


def _fill_prompt_logprobs(msg, rows) -> None:
    msg.prompt_logprobs.extend(r[0] for r in rows)
    msg.prompt_top_ids.extend(r[1] for r in rows)
    msg.prompt_top_logprobs.extend(r[2] for r in rows)


class ColmServicer(pb2_grpc.ColmServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def _tops(self, ev) -> list:
        """A token event's top log-probs as ``TopLogprob`` messages (each token's own text)."""
        decode = self.router.tokenizer.decode
        return [pb2.TopLogprob(id=t, logprob=lp, text=decode([t])) for t, lp in ev.top_logprobs]

    async def _precompile(self, request) -> None:
        if request.HasField("sampling") and request.sampling.HasField("structured_output"):
            with contextlib.suppress(ValueError):  # a malformed one is spec_from_proto's to refuse
                await self.router.precompile(structured_from_proto(request.sampling.structured_output))

    async def Generate(self, request, context):
        await self._precompile(request)
        spec = spec_from_proto(self.router, request)
        trim = StopTrimmer(spec.params.stop_strings, request.include_stop_str_in_output)
        first = pb2.GenerateResponse(request_id=spec.request_id)
        # one message per batch of tokens: one token each while the client keeps up, several when it (or this
        # process) falls behind
        async for batch in coalesced(self.router.generate(spec)):
            tokens = []
            for ev in batch:
                if ev.kind == "token":
                    tokens.append(pb2.Token(id=ev.token_id, text=trim.add(ev.text), scale=ev.scale, time_ms=ev.time_ms,
                                            logprob=ev.logprob, drafted=ev.drafted, top_logprobs=self._tops(ev)))
                    continue
                if tokens:
                    yield pb2.GenerateResponse(request_id=spec.request_id, tokens=tokens)
                    tokens = []
                if ev.kind == "decision":
                    first.decision.CopyFrom(_decision(ev.decision, len(spec.prompt_ids)))
                    if not spec.prompt_logprobs:
                        yield first
                elif ev.kind == "prompt_logprobs":
                    _fill_prompt_logprobs(first, ev.prompt_logprobs)
                    yield first
                else:
                    yield pb2.GenerateResponse(request_id=spec.request_id, text=trim.add(ev.text) + trim.flush(),
                                               finish_reason=ev.finish_reason, usage=pb2.Usage(**ev.usage))
            if tokens:
                yield pb2.GenerateResponse(request_id=spec.request_id, tokens=tokens)

    async def Complete(self, request, context):
        await self._precompile(request)
        spec = spec_from_proto(self.router, request)
        resp = pb2.CompleteResponse(request_id=spec.request_id)
        trim = StopTrimmer(spec.params.stop_strings, request.include_stop_str_in_output)
        text = []
        async for ev in self.router.generate(spec):
            if ev.kind == "decision":
                resp.decision.CopyFrom(_decision(ev.decision, len(spec.prompt_ids)))
            elif ev.kind == "prompt_logprobs":
                _fill_prompt_logprobs(resp, ev.prompt_logprobs)
            elif ev.kind == "token":
                resp.tokens.append(pb2.Token(id=ev.token_id, text=ev.text, scale=ev.scale, time_ms=ev.time_ms,
                                             logprob=ev.logprob, drafted=ev.drafted, top_logprobs=self._tops(ev)))
                text.append(trim.add(ev.text))
            else:
                text.append(trim.add(ev.text) + trim.flush())
                resp.finish_reason = ev.finish_reason
                resp.usage.CopyFrom(pb2.Usage(**ev.usage))
        resp.text = "".join(text)
        return resp

    async def Tokenize(self, request, context):
        _check_size(self.router, request)
        try:
            text = request.text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        cfg = self.router.model_cfg
        ids = encode_prompt(self.router.tokenizer, text)
        if len(ids) > cfg.max_seq_len:
            raise ValueError(f"text of {len(ids)} tokens exceeds the context of {cfg.max_seq_len} tokens")
        return pb2.TokenizeResponse(ids=ids, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len)

    async def ListScales(self, request, context):
        r = self.router
        cfg = r.model_cfg
        est = r.policy.estimates()
        out = pb2.ListScalesResponse(model=r.cfg.served_model_name, kv_sharing=cfg.kv_sharing)
        for k in r.served_scales():
            out.scales.append(pb2.ScaleInfo(scale=k, num_params=cfg.num_params(k), dim=cfg.scale_dim(k),
                                            predicted_ttft_ms=est[k]["ttft_ms"], predicted_tpot_ms=est[k]["tpot_ms"],
                                            measured_step_ms=r.policy.model.step_ms.get(k, 0.0)))
        return out

    async def UpdateRequest(self, request, context):
        rid = request.request_id
        if not rid or len(rid) > 128:
            raise ValueError(f"request_id={rid[:40]!r}: give the id of a running request (1-128 characters)")
        scale = await self.router.set_scale(rid, request.scale)
        return pb2.UpdateRequestResponse(request_id=rid, scale=scale)

    async def Health(self, request, context):
        r = self.router
        out = pb2.HealthResponse(queued=r.admission.num_queued, running=r.admission.num_running)
        for w in r.registry.workers.values():
            state = r.registry.state(w)
            rep = w.report if state != "dead" else None  # a dead worker's last report no longer holds
            out.workers.append(pb2.WorkerHealth(worker_id=w.worker_id, role=w.role, healthy=state == "healthy",
                                                inflight=len(w.inflight),
                                                free_blocks=rep.free_blocks if rep else 0,
                                                total_blocks=rep.total_blocks if rep else 0, state=state,
                                                detail=r.registry.detail(w), address=w.address))
        out.serving, out.reason = r.health()
        return out


async def start_grpc(router: Router, drain: Drain | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the public gRPC server (its shutdown drained by ``drain``: ``RouterServer.stop``); returns (server, bound
    port)."""
    cfg = router.cfg
    # gRPC's own limit sits above ours so that an oversized request gets our INVALID_ARGUMENT message.
    opts = [("grpc.max_receive_message_length", 2 * cfg.max_message_bytes + (1 << 20)),
            ("grpc.max_send_message_length", 2 * cfg.max_message_bytes + (1 << 20)),
            *[(k, int(cfg.replicas > 1) if k == "grpc.so_reuseport" else v) for k, v in SERVER_OPTIONS]]
    server = grpc.aio.server(interceptors=[GuardInterceptor(cfg.api_key, drain or Drain(cfg.drain_s))], options=opts)
    pb2_grpc.add_ColmServicer_to_server(ColmServicer(router), server)
    names = [SERVICE_NAME]
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        hs = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(hs, server)

        async def publish(serving: bool) -> None:  # grpc.health.v1 says what Router.health says
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await hs.set(SERVICE_NAME, status)
            await hs.set("", status)

        await publish(router.health()[0])
        router.health_listeners.append(lambda serving: asyncio.ensure_future(publish(serving)))
        names.append(health.SERVICE_NAME)
    except ImportError:
        log.info("grpcio-health-checking not installed: no grpc.health.v1")
    try:
        from grpc_reflection.v1alpha import reflection

        names.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    except ImportError:
        log.info("grpcio-reflection not installed: no server reflection")
    addr = f"{cfg.host}:{cfg.grpc_port}"
    creds = None
    if cfg.tls_cert:
        with open(cfg.tls_key, "rb") as fk, open(cfg.tls_cert, "rb") as fc:
            creds = grpc.ssl_server_credentials([(fk.read(), fc.read())])
    port = bind_port(server, addr, "router.grpc_port", creds)
    await server.start()
    return server, port
