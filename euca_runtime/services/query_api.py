"""The HTTP front end of an AWS Query API (IAM, EC2) on any process.

A request is parsed (query string and form body), authenticated with SigV4 against the keys
the clc holds, checked for an Action the service knows, and forwarded over the bus to the
ENABLED clc as ``<service>.action``. The services differ only in what a `QueryApi` says:
their error document, a few error codes and how they validate Action/Version.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from aiohttp import web

from euca_runtime.component import RequestError, ServiceUnavailable
from euca_runtime.credentials import KeyInfo, authenticate, key_cache
from euca_runtime.log import get_logger
from euca_runtime.sigv4 import AuthError, parse_request, query_error

if TYPE_CHECKING:
    from euca_runtime.node import Node

log = get_logger("euca_runtime.services.query_api")

Refusal = tuple[int, str, str]
"""(HTTP status, error code, message)."""


@dataclass(frozen=True)
class QueryApi:
    """What one Query API service says differently from the others."""

    service: str
    """SigV4 service name and bus method prefix (``iam`` answers ``iam.action``)."""
    render_error: Callable[[int, str, str, str], str]
    """(status, code, message, request id) -> the service's XML error document."""
    render_result: Callable[[str, Any, str], str]
    """(action, result, request id) -> the service's XML response."""
    validate: Callable[[str, Mapping[str, str]], Refusal | None]
    """(action, params) -> a refusal for an action/version/flag the service does not take."""
    caller: Callable[[KeyInfo], dict[str, Any]]
    """The caller as the clc's handler wants it."""
    status: Mapping[str, int]
    """HTTP status per error code the clc answers."""
    default_status: int
    """Status for an error code not in `status`."""
    unavailable_code: str
    """Code of the 503 answer when the identity service or the clc cannot be reached."""
    internal_code: str
    """Code of the 500 answer when resolving the key failed inside the clc."""
    max_body: int
    """Largest request body taken."""
    control_params: frozenset[str] = frozenset({"Action", "Version"})
    """Parameters that are about the request, not the action (not forwarded)."""
    auth_error: Callable[[AuthError], Refusal] = query_error
    """The refusal for a failed authentication."""


def _xml(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/xml")


def _params(query: str, body: bytes) -> dict[str, str]:
    """Query string and form body, body last; ValueError/UnicodeDecodeError when malformed."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    if body:
        params.update(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    return params


def make_query_app(node: Node, api: QueryApi, *, timeout: float) -> web.Application:
    """The `api` Query API of one process; actions are forwarded to the ENABLED clc."""
    keys = key_cache(node)
    svc = api.service

    def error(status: int, code: str, message: str, rid: str) -> web.Response:
        return _xml(status, api.render_error(status, code, message, rid))

    async def handle(request: web.Request) -> web.StreamResponse:
        rid = str(uuid.uuid4())
        if request.method not in ("GET", "POST"):
            return error(405, "InvalidAction", f"method {request.method} is not supported", rid)
        body = await request.read()
        raw_path, _, raw_query = request.raw_path.partition("?")
        try:
            params = _params(raw_query, body)
        except (UnicodeDecodeError, ValueError):
            return error(400, "MalformedQueryString", "the request body is not a form-encoded query", rid)
        action = params.get("Action", "")
        try:
            parsed = parse_request(request.method, raw_path, raw_query, request.headers, datetime.now(UTC))
            if parsed.service != svc:
                raise AuthError(
                    "signature_mismatch",
                    f"Credential should be scoped to correct service: '{svc}'.",
                    presigned=parsed.presigned,
                )
            info = await authenticate(keys, parsed, hashlib.sha256(body).hexdigest())
        except AuthError as exc:
            status, code, message = api.auth_error(exc)
            if exc.kind == "signature_mismatch" and "scoped" in exc.message:
                message = exc.message
            log.info(
                "query request refused",
                extra={"service": svc, "action": action, "reason": exc.kind, "node": node.name},
            )
            return error(status, code, message, rid)
        except ServiceUnavailable as exc:
            return error(503, api.unavailable_code, f"the identity service is unavailable: {exc}", rid)
        except RequestError as exc:
            return error(500, api.internal_code, exc.message, rid)
        if not action:
            return error(400, "MissingAction", "the request has no Action", rid)
        refusal = api.validate(action, params)
        if refusal is not None:
            return error(*refusal, rid)
        call_params = {
            k: v for k, v in params.items() if k not in api.control_params and not k.startswith("X-Amz-")
        }
        try:
            result = await node.call(
                "clc",
                None,
                f"{svc}.action",
                {"action": action, "params": call_params, "caller": api.caller(info), "request_id": rid},
                timeout=timeout,
            )
        except RequestError as exc:
            return error(api.status.get(exc.kind, api.default_status), exc.kind, exc.message, rid)
        except ServiceUnavailable as exc:
            log.warning(
                "query request not served",
                extra={"service": svc, "action": action, "reason": str(exc), "node": node.name},
            )
            return error(503, api.unavailable_code, f"no ENABLED clc answered in time: {exc}", rid)
        return _xml(200, api.render_result(action, result, rid))

    app = web.Application(client_max_size=api.max_body)
    app.router.add_route("*", "/", handle)
    return app


__all__ = ["QueryApi", "Refusal", "make_query_app"]
