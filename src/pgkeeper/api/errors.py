"""Errors at the API's boundary: every failure becomes ``{"success": false, "error": "..."}``
with the error's status, one redacted line that quotes at most a short piece of any input."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from pgkeeper.api.context import ApiContext
from pgkeeper.api.guard import GuardError
from pgkeeper.errors import PgkeeperError, UsageError
from pgkeeper.redaction import redact

log = logging.getLogger(__name__)

# --- clipping echoed input ---------------------------------------------------------------------

ECHO_CHARS = 80  # the most of one input an error message shows
ERROR_CHARS = 300  # the longest error message sent

_LONG_WORD = re.compile(rf"\S{{{ECHO_CHARS + 1},}}")


def clip(text: str) -> str:
    """``text`` with every run of more than ECHO_CHARS non-blank characters cut to that many
    (its head and tail around an ellipsis) and the whole cut to ERROR_CHARS: an error quoting a
    huge input (a name, an id, a target) stays one short line."""
    text = _LONG_WORD.sub(lambda m: m.group(0)[:56] + "…" + m.group(0)[57 - ECHO_CHARS :], text)
    if len(text) > ERROR_CHARS:
        tail = ERROR_CHARS // 3
        text = text[: ERROR_CHARS - tail - 3] + " … " + text[-tail:]
    return text


# --- errors at the boundary -----------------------------------------------------------------------


def error_response(
    ctx: ApiContext | None, exc: PgkeeperError, headers: dict[str, str] | None = None
) -> JSONResponse:
    secrets = ctx.secrets if ctx is not None else ()
    # Redacted before it is cut: a cut could leave a password no pattern recognises.
    text = redact(exc.message.splitlines()[0] if exc.message else type(exc).__name__, secrets)
    text = clip(text)
    if exc.http_status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="pgkeeper"'}
    return JSONResponse(
        {"success": False, "error": text}, status_code=exc.http_status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    """One line from pydantic's errors, never echoing the input (it may hold a password)."""
    errors = exc.errors()
    if not errors:
        return "the request is malformed"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if first.get("type") == "extra_forbidden":
        field = str(first.get("loc", ("", "?"))[-1])
        return f"unknown field {field!r} (see /docs for this endpoint's fields)"
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body",)]
    where = {"query": "query parameter", "path": "path parameter", "header": "header"}
    if loc and loc[0] in where:
        what = f"{where[loc[0]]} {'.'.join(loc[1:])!r}"
    elif loc:
        what = f"field {'.'.join(loc)!r}"
    else:
        what = "the request body"
    message = str(first.get("msg", "is invalid")).lower()
    if first.get("type") == "missing":
        return f"{what} is required"
    return f"{what}: {message}"


_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _methods_of(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route of the request's path answers."""
    found: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        methods = getattr(route, "methods", None)
        if match is not Match.NONE and methods:
            found |= set(methods)
    known = len(_METHOD_ORDER)
    return sorted(found, key=lambda m: (_METHOD_ORDER.index(m) if m in _METHOD_ORDER else known, m))


def install_error_handlers(app: FastAPI) -> None:
    def context_of(request: Request) -> ApiContext | None:
        return getattr(request.app.state, "pgkeeper", None)

    async def pgkeeper_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PgkeeperError)  # noqa: S101 - registered for this type only
        if exc.http_status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return error_response(context_of(request), exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for this type
        error = UsageError(_validation_message(exc))
        if any(e.get("type") == "extra_forbidden" for e in exc.errors()):
            error.http_status = 422  # understood, but asks for something this API does not do
        return error_response(context_of(request), error)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for this type
        text = {404: "no such endpoint (see /docs)", 405: "method not allowed (see /docs)"}
        error = GuardError(text.get(exc.status_code, str(exc.detail)), exc.status_code)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # The router names only the first route of the path; a path has one route per method.
            headers["Allow"] = ", ".join(_methods_of(request.app, request.scope))
        return error_response(context_of(request), error, headers)

    async def unexpected_error(request: Request, exc: Exception) -> Response:
        # Logged in full for the operator; the client gets one line without any detail.
        log.error("%s %s crashed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            {"success": False, "error": "internal error (the server log has the details)"},
            status_code=500,
        )

    app.add_exception_handler(PgkeeperError, pgkeeper_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)

