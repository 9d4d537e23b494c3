"""The HTTP API (FastAPI): list, create, delete, restore, download and import backups.

A front door over the core, like the CLI: every request first passes ``guard.RequestGuard``
(Host, Origin, token, content type and body size, before any body is read); each handler
validates ids with ``naming.validate_id`` before anything touches storage, calls the core in the
threadpool (blocking work never runs on the event loop) and translates the project's errors at
the boundary into ``{"success": false, "error": "..."}`` with the error's ``http_status``. Error
text is redacted (connection URLs, passwords, configured secrets), shows at most a short piece
of any input it quotes, and never carries a traceback.

Paths and shapes are the seed's compatibility contract::

    GET    /api/health                      liveness (no token needed)
    GET    /api/backups                     list + totals + scheduler status
    POST   /api/backups                     back up now ({"wait": false}: 202 + a Prefect run)
    DELETE /api/backups?id=ID               delete from every target
    POST   /api/backups/restore             restore ({"wait": false}: 202 + a Prefect run)
    GET    /api/backups/download?id=ID      the stored file, streamed, with Range support
    POST   /api/backups/import?name=NAME    an external dump as the request body, streamed
    GET    /api/backups/{id}                one backup's record
    GET    /api/runs/{id}                   state of a Prefect flow run started here
    GET    /api/schedule                    the deployments' schedules on the Prefect server
    PUT    /api/schedule                    change them now (kept until the environment changes)
    GET    /metrics                         Prometheus metrics (the read token's rule)

Auth: ``Authorization: Bearer <token>``. ``BACKUP_API_TOKEN`` (admin) may do everything,
``BACKUP_API_READ_TOKEN`` only GET. With no token configured every request is allowed, so
``serve_api`` refuses to listen anywhere but the loopback interface and the guard serves only
loopback Host names (plus ``BACKUP_API_ALLOWED_HOSTS``): a web page cannot reach it by DNS
rebinding, nor by a cross-site request (Origin, content types).

The package, one job per module: ``app`` (the route table, the guard and ``serve_api``),
``guard`` (Host, Origin, tokens, bodies), ``routes`` (the handlers: parse, call the core,
render), ``models`` (request and response shapes), ``context`` (what handlers share),
``errors`` (the boundary's one-line answers). Downloads (ranges, the tar layout, file names)
are the core's ``pgkeeper.download``; the Prefect client is ``pgkeeper.prefect_api``.

Prefect is reached over its REST API with httpx (``PREFECT_API_URL`` from the environment or
the active Prefect profile), never by importing ``prefect``: importing it costs seconds and tens
of MiB, which no request should pay. Without a configured server, listing says the scheduler is
not running and ``"wait": false`` answers 503 with what to set.
"""

from __future__ import annotations

from pgkeeper.api.app import check_bind, create_app, serve_api
from pgkeeper.api.errors import ERROR_CHARS, clip
from pgkeeper.download import parse_range
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.redaction import redact

__all__ = [
    "ERROR_CHARS",
    "PrefectLink",
    "check_bind",
    "clip",
    "create_app",
    "parse_range",
    "redact",
    "serve_api",
]
