"""The application: its routes (one table of path, method and access), the request guard in
front of every route, the error handlers, the offline Swagger UI, and ``serve_api``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from starlette.routing import Match
from starlette.types import Scope

from pgkeeper import __version__
from pgkeeper.api import routes as handlers
from pgkeeper.api.context import AdminAccess, ApiContext, ReadAccess, _token
from pgkeeper.api.errors import error_response, install_error_handlers
from pgkeeper.api.guard import (
    DUMP_TYPES,
    Access,
    BodyRule,
    HostRule,
    RequestGuard,
    Tokens,
    allowed_hosts,
    json_body,
)
from pgkeeper.api.models import (
    AUTH_ERRORS,
    BODY_ERRORS,
    BackupList,
    BackupResponse,
    CreatedBackupResponse,
    HealthResponse,
    ImportResponse,
    MessageResponse,
    RestoreResponse,
    RunAccepted,
    RunResponse,
    ScheduleResponse,
    _errors,
)
from pgkeeper.errors import ConfigError
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.redaction import secrets_of
from pgkeeper.settings import Settings

log = logging.getLogger(__name__)

# Interfaces a server without a token may listen on: only this machine can reach them.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# --- the app --------------------------------------------------------------------------------------

DESCRIPTION = """
Automated PostgreSQL backups over HTTP. Send `Authorization: Bearer <token>`:
`BACKUP_API_TOKEN` may do everything, `BACKUP_API_READ_TOKEN` only GET. JSON bodies need
`Content-Type: application/json` (at most 1 MiB), an import `application/octet-stream`; requests
from web pages of other origins are refused. Every error is `{"success": false, "error": "..."}`
with a meaningful status.
"""


DOCS_ASSETS = "/docs/assets"


def _install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with its JavaScript and CSS served from the swagger-ui-bundle
    package, so the docs work on hosts without internet (FastAPI's default uses a CDN)."""
    import swagger_ui_bundle
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    app.mount(
        DOCS_ASSETS,
        StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
        name="swagger-ui",
    )

    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="pgkeeper API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)


class _Routes:
    """The app's routes with the access each needs: one table that both declares a route's
    security dependency (for the OpenAPI schema) and tells the guard what to enforce."""

    OPEN = Access("open")
    NO_ROUTE = Access("read")  # a 404/405 tells only a caller with a token what is not there
    UNLISTED = Access("admin")  # a route missing from the table fails closed

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.table: dict[tuple[str, str], Access] = {}

    def add(self, path: str, endpoint: Any, method: str, access: Access, **kwargs: Any) -> None:
        dependencies = {"open": [], "read": ReadAccess, "admin": AdminAccess}[access.role]
        self.app.add_api_route(
            path, endpoint, methods=[method], dependencies=dependencies, **kwargs
        )
        self.table[(path, method)] = access

    def access_of(self, scope: Scope) -> Access:
        for route in self.app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                path = getattr(route, "path", "")
                listed = self.table.get((path, scope["method"])) or self.table.get((path, "*"))
                return listed or self.UNLISTED
        return self.NO_ROUTE


def create_app(settings: Settings, prefect: PrefectLink | None = None) -> FastAPI:
    """The FastAPI application serving ``settings``' backups (Prefect from the environment).

    Raises ConfigError when BACKUP_API_ALLOWED_HOSTS holds an entry that is no host.
    """
    app = FastAPI(
        title="pgkeeper",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,  # served by _install_docs from local files, not a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    tokens = Tokens(_token(settings.backup_api_token), _token(settings.backup_api_read_token))
    listed = allowed_hosts(settings.backup_api_allowed_hosts)
    ctx = app.state.pgkeeper = ApiContext(
        settings=settings,
        prefect=prefect if prefect is not None else PrefectLink.from_environment(),
        secrets=secrets_of(settings),
        tokens=tokens,
    )
    routes = _Routes(app)
    app.add_middleware(
        RequestGuard,
        # Without a token the Host rule is what keeps web pages out; with one, the operator
        # turns it on by listing the names the API is reached by.
        hosts=HostRule(allowed=listed, enforced=not tokens.enabled or bool(listed)),
        tokens=tokens,
        access_of=routes.access_of,
        render=lambda exc: error_response(ctx, exc),
    )
    install_error_handlers(app)
    _install_docs(app)
    for path in ("/docs", DOCS_ASSETS, "/openapi.json"):
        routes.table[(path, "*")] = routes.OPEN
    read, admin = Access("read"), Access("admin")
    limit = settings.backup_api_max_import_bytes
    dump = BodyRule(
        types=DUMP_TYPES, limit=limit, buffered=False,
        wanted="an import takes the dump as the raw body (send Content-Type: "
        "application/octet-stream, or application/gzip, application/zstd, application/sql)",
        too_large=handlers.too_large(limit).message,
    )  # fmt: skip
    add = routes.add
    add("/api/health", handlers.health, "GET", routes.OPEN, tags=["health"],
        response_model=HealthResponse, responses=_errors())  # fmt: skip
    add(
        "/api/backups", handlers.list_backups, "GET", read, tags=["backups"],
        response_model=BackupList, responses=_errors(*AUTH_ERRORS), summary="List backups",
    )  # fmt: skip
    add(
        "/api/databases", handlers.list_databases, "GET", read, tags=["databases"],
        responses=_errors(*AUTH_ERRORS), summary="The fleet's databases and their state",
    )  # fmt: skip
    add(
        "/api/backups", handlers.create_backup, "POST",
        Access("admin", json_body("POST /api/backups")), tags=["backups"],
        response_model=CreatedBackupResponse,
        responses={202: {"model": RunAccepted},
                   **_errors(*AUTH_ERRORS, *BODY_ERRORS, 404, 409, 422, 503)},
        summary="Back up now",
    )  # fmt: skip
    add(
        "/api/backups", handlers.delete_backup, "DELETE", admin, tags=["backups"],
        response_model=MessageResponse, responses=_errors(*AUTH_ERRORS, 404),
        summary="Delete a backup",
    )  # fmt: skip
    add(
        "/api/backups/restore", handlers.restore, "POST",
        Access("admin", json_body("POST /api/backups/restore")), tags=["backups"],
        response_model=RestoreResponse,
        responses={202: {"model": RunAccepted},
                   **_errors(*AUTH_ERRORS, *BODY_ERRORS, 404, 409, 422, 503)},
        summary="Restore a backup",
    )  # fmt: skip
    add(
        "/api/backups/download", handlers.download, "GET", read, tags=["backups"],
        response_class=StreamingResponse,
        responses={
            200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                       "format": "binary"}}},
                  "description": "the stored file"},
            206: {"description": "the requested byte range"},
            **_errors(*AUTH_ERRORS, 404, 416),
        },
        summary="Download a backup's file",
    )  # fmt: skip
    add(  # the same headers, no body (documented with GET)
        "/api/backups/download", handlers.download, "HEAD", read, include_in_schema=False,
    )  # fmt: skip
    add(
        "/api/backups/import", handlers.import_backup, "POST", Access("admin", dump),
        tags=["backups"], response_model=ImportResponse,
        responses=_errors(*AUTH_ERRORS, *BODY_ERRORS, 422),
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": "the dump; also accepted as application/gzip, application/zstd, "
                "application/sql, application/x-tar or application/x-gzip",
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
        summary="Import an external dump",
    )  # fmt: skip
    add(
        "/api/backups/{backup_id}", handlers.show_backup, "GET", read, tags=["backups"],
        response_model=BackupResponse, responses=_errors(*AUTH_ERRORS, 404),
        summary="Show one backup",
    )  # fmt: skip
    add(
        "/metrics", handlers.metrics, "GET", read, tags=["metrics"],
        response_class=Response, responses=_errors(*AUTH_ERRORS),
        summary="Prometheus metrics",
    )  # fmt: skip
    add(
        "/api/schedule", handlers.show_schedule, "GET", read, tags=["schedule"],
        response_model=ScheduleResponse, responses=_errors(*AUTH_ERRORS, 404, 503),
        summary="Show the schedules",
    )  # fmt: skip
    add(
        "/api/schedule", handlers.set_schedule, "PUT",
        Access("admin", json_body("PUT /api/schedule")), tags=["schedule"],
        response_model=ScheduleResponse,
        responses=_errors(*AUTH_ERRORS, *BODY_ERRORS, 404, 422, 503),
        summary="Change a schedule",
    )  # fmt: skip
    add(
        "/api/runs/{run_id}", handlers.read_run, "GET", read, tags=["runs"],
        response_model=RunResponse, responses=_errors(*AUTH_ERRORS, 404, 503),
        summary="State of a Prefect run",
    )  # fmt: skip
    return app


def check_bind(settings: Settings, host: str) -> None:
    """Refuse to listen beyond this machine when no token is configured (ConfigError)."""
    if _token(settings.backup_api_token) or _token(settings.backup_api_read_token):
        return
    if host.strip("[]").lower() not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"refusing to serve the API on {host}: no API token is configured "
            "(set BACKUP_API_TOKEN, or listen on 127.0.0.1)"
        )


def check_tls(certfile: Path | None, keyfile: Path | None) -> bool:
    """Whether TLS is on; raise ConfigError for half a pair or a file that cannot be read."""
    if certfile is None and keyfile is None:
        return False
    if certfile is None or keyfile is None:
        raise ConfigError(
            "TLS needs both --ssl-certfile and --ssl-keyfile (the certificate chain and its key)"
        )
    for what, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not Path(path).is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"{what} {path} is not a readable file (check the path)")
    return True


def plaintext_warning(host: str, tls: bool) -> str | None:
    """The one warning a server reachable from other machines without TLS gets at start."""
    if tls or host.strip("[]").lower() in LOOPBACK_HOSTS:
        return None
    return (
        f"the API listens on {host} without TLS: tokens and backups cross the network in "
        "clear text (pass --ssl-certfile and --ssl-keyfile, or put a TLS proxy in front)"
    )


def serve_api(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    *,
    ssl_certfile: Path | None = None,
    ssl_keyfile: Path | None = None,
) -> None:
    """Serve the API with uvicorn until interrupted (``pgkeeper api``); over TLS (uvicorn's)
    with a certificate and key.

    Raises ConfigError, before listening, when ``host`` is not a loopback address and no token
    is configured, when only one of the TLS files is given or one cannot be read, or when a
    storage target is malformed. Listening beyond loopback without TLS warns once.
    """
    host = host or settings.backup_api_host
    port = settings.backup_api_port if port is None else port
    check_bind(settings, host)
    tls = check_tls(ssl_certfile, ssl_keyfile)
    warning = plaintext_warning(host, tls)
    if warning is not None:
        log.warning(warning)
    token = _token(settings.backup_api_token)
    if token is not None and len(token) < 16:
        log.warning("BACKUP_API_TOKEN is shorter than 16 characters: use a long random token")
    app = create_app(settings)
    app.state.pgkeeper.storages()  # a malformed target fails now, in one line, not per request
    import uvicorn

    uvicorn.run(
        app,
        host=host.strip("[]"),
        port=port,
        # h11 always, even where httptools is installed: its 16 KiB cap on a request's line and
        # headers, and its handling of a refused body (see guard.py), are what was tested.
        http="h11",
        server_header=False,
        log_level="info",
        ssl_certfile=str(ssl_certfile) if tls else None,
        ssl_keyfile=str(ssl_keyfile) if tls else None,
    )


__all__ = ["check_bind", "check_tls", "create_app", "plaintext_warning", "serve_api"]
