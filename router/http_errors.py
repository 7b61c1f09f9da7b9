"""The HTTP front's errors as JSON bodies ``{"error": {"message", "type", "param", "code"}}``.

A failure's gRPC status (``grpc_server.status_for``) maps to an HTTP status (``HTTP_STATUS``) and, for a 400, the
field it is about (``param``); aiohttp's own errors (unknown path, wrong method, body too large or too slow) and an
unknown model (404 ``NotFoundError``, as vLLM answers) take the same shape; during shutdown every refusal is a 503
that closes the connection.
"""

from __future__ import annotations

import logging
import re

from aiohttp import web

from colm.router.grpc_server import status_for
from colm.router.openai_completion import CompletionRequest
from colm.router.openai_errors import BadField

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


def _shutting_down(message: str) -> web.Response:
    resp = web.json_response(_error_body(message, "unavailable", 503), status=503)
    resp.force_close()  # a client on this connection must reconnect: to another router, or find none
    return resp
