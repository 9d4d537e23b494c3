"""What every handler needs (settings, storage targets opened once, tokens, Prefect) and the
per-route access dependencies that declare each route's security in the OpenAPI schema."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pgkeeper.api.guard import Tokens
from pgkeeper.api.models import SchedulerStatus
from pgkeeper.inventory import Inventory
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.redaction import redact
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets

SCHEDULER_CACHE_SECONDS = 5.0  # a listing asks Prefect at most this often

# --- the app's shared state ----------------------------------------------------------------------


@dataclass
class ApiContext:
    """What every handler needs: settings, opened storage targets, tokens, Prefect."""

    settings: Settings
    prefect: PrefectLink
    secrets: tuple[str, ...]
    tokens: Tokens = field(default_factory=Tokens)
    _storages: list[Storage] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _scheduler: tuple[float, bool, str] | None = field(default=None, repr=False)

    def inventory(self) -> Inventory:
        """The inventory as configured (no server is asked: '*' servers' databases are found
        by name, with the server's settings)."""
        from pgkeeper.inventory import load_inventory

        return load_inventory(self.settings, expand=False)

    def storages(self) -> list[Storage]:
        """The storage targets, opened once (cloud clients are costly to build, thread-safe)."""
        with self._lock:
            if self._storages is None:
                self._storages = targets(self.settings)
            return self._storages

    def scheduler(self) -> SchedulerStatus:
        now = time.monotonic()
        cached = self._scheduler
        if cached is None or now - cached[0] > SCHEDULER_CACHE_SECONDS:
            running, detail = self.prefect.scheduler_status()
            cached = self._scheduler = (now, running, detail)
        return SchedulerStatus(
            schedule=self.settings.backup_schedule,
            enabled=self.settings.backup_enabled,
            running=cached[1],
            detail=redact(cached[2], self.secrets),
        )


def _token(secret: Any) -> bytes | None:
    value = secret.get_secret_value() if secret is not None else ""
    return value.encode() if value else None


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.pgkeeper
    return context


Ctx = Annotated[ApiContext, Depends(get_context)]

# The security scheme shown in /docs ("Authorize"); auto_error=False: we answer 401 ourselves.
bearer = HTTPBearer(
    auto_error=False,
    description="BACKUP_API_TOKEN (everything) or BACKUP_API_READ_TOKEN (GET only).",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _credentials(credentials: HTTPAuthorizationCredentials | None) -> tuple[str, str]:
    return (credentials.scheme, credentials.credentials) if credentials else ("", "")


# The guard middleware has already checked the token before any body was read; these checks
# declare each route's security in the OpenAPI schema and hold should a route ever be mounted
# without the guard.
def require_read(ctx: Ctx, credentials: Credentials) -> None:
    """Any configured token (admin or read-only)."""
    ctx.tokens.require("read", *_credentials(credentials))


def require_admin(ctx: Ctx, credentials: Credentials) -> None:
    """The admin token: every request that changes something."""
    ctx.tokens.require("admin", *_credentials(credentials))


ReadAccess = [Depends(require_read)]
AdminAccess = [Depends(require_admin)]

BackupIdQuery = Annotated[
    str,
    Query(
        alias="id",
        description="backup id, e.g. manual_backup_2025-10-02T10-00-00Z",
        examples=["manual_backup_2025-10-02T10-00-00Z"],
    ),
]

