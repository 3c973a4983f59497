"""Domain errors -> HTTP answers: the one mapping of this boundary.

It mirrors servicers/errors.py and reuses its domain-error -> status-code table, so an error
reads the same on both APIs: the gRPC status name, the message (which names the field or the
object), and for a bad request the field on its own. Anything else is a bug: it is logged with a
fresh error id and the client gets 500 with that id only.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from orchestrator import errors
from orchestrator.servicers.errors import status_for

log = logging.getLogger("pocketlora.orchestrator")

# gRPC status -> HTTP status, as Google's API design guide maps them.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}
_BY_HTTP = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.NOT_FOUND}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_body(code: grpc.StatusCode, message: str, field: str = "") -> dict[str, object]:
    """The JSON every failed API call answers with."""
    body: dict[str, object] = {"code": HTTP_STATUS.get(code, 500), "status": code.name, "message": message}
    if field:
        body["field"] = field
    return {"error": body}


def error_response(exc: errors.OrchestratorError) -> web.Response:
    """The answer for a domain error."""
    code = status_for(exc)
    field = exc.field if isinstance(exc, errors.InvalidArgument) else ""
    headers = {"WWW-Authenticate": "Bearer"} if code == grpc.StatusCode.UNAUTHENTICATED else None
    return web.json_response(error_body(code, str(exc), field), status=HTTP_STATUS.get(code, 500), headers=headers)


@web.middleware
async def map_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every API failure as JSON: domain errors by the mapping, unknown routes and methods
    as NOT_FOUND, anything else as 500 with an error id."""
    try:
        return await handler(request)
    except errors.OrchestratorError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        code = _BY_HTTP.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)
        return web.json_response(
            error_body(code, f"{exc.reason}: {request.method} {request.path[:200]}"), status=exc.status
        )
    except ConnectionResetError:
        raise
    except Exception:
        error_id = secrets.token_hex(6)
        log.exception("internal error %s in %s %s", error_id, request.method, request.path[:200])
        message = f"internal error (id {error_id}); see the orchestrator log"
        return web.json_response(error_body(grpc.StatusCode.INTERNAL, message), status=500)
