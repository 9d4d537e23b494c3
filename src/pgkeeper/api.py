"""The HTTP API (FastAPI): list, create, delete, restore, download and import backups.

A front door over the core, like the CLI: every request first passes ``api_guard.RequestGuard``
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
    GET    /metrics                         Prometheus metrics (the read token's rule)

Auth: ``Authorization: Bearer <token>``. ``BACKUP_API_TOKEN`` (admin) may do everything,
``BACKUP_API_READ_TOKEN`` only GET. With no token configured every request is allowed, so
``serve_api`` refuses to listen anywhere but the loopback interface and the guard serves only
loopback Host names (plus ``BACKUP_API_ALLOWED_HOSTS``): a web page cannot reach it by DNS
rebinding, nor by a cross-site request (Origin, content types).

Prefect is reached over its REST API with httpx (``PREFECT_API_URL`` from the environment or
the active Prefect profile), never by importing ``prefect``: importing it costs seconds and tens
of MiB, which no request should pay. Without a configured server, listing says the scheduler is
not running and ``"wait": false`` answers 503 with what to set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tarfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import anyio.from_thread
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from pgkeeper import __version__, catalog, naming
from pgkeeper.api_guard import (
    DUMP_TYPES,
    Access,
    BodyRule,
    GuardError,
    HostRule,
    RequestGuard,
    Tokens,
    allowed_hosts,
    json_body,
)
from pgkeeper.errors import (
    ConfigError,
    ConfirmationRequiredError,
    PgkeeperError,
    UsageError,
    VerificationError,
)
from pgkeeper.manifest import Manifest, StoredObject
from pgkeeper.postgres import ConnInfo
from pgkeeper.prefect_api import PrefectLink, RunHandle, RunState
from pgkeeper.redaction import redact
from pgkeeper.redaction import secrets_of as _secrets_of
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK

log = logging.getLogger(__name__)

# Interfaces a server without a token may listen on: only this machine can reach them.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
DEFAULT_BACKUP_NAME = "manual_backup"  # the seed's name for backups made over the API
DEFAULT_IMPORT_NAME = "imported"
SCHEDULER_CACHE_SECONDS = 5.0  # a listing asks Prefect at most this often


# --- errors of this front door ------------------------------------------------------------------


class ImportTooLargeError(UsageError):
    """The uploaded dump is larger than BACKUP_API_MAX_IMPORT_BYTES."""

    http_status = 413


class RangeNotSatisfiableError(UsageError):
    """A Range header none of whose bytes exist."""

    http_status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


# --- request and response models (module level: FastAPI resolves these annotations) ------------


class ErrorResponse(BaseModel):
    success: Literal[False] = False
    error: str = Field(description="one line saying what is wrong and what to do")


class BackupRecord(BaseModel):
    """The seed's fields first; every other manifest field follows."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(examples=["manual_backup_2025-10-02T10-00-00Z"])
    filename: str
    size: int = Field(description="bytes stored")
    timestamp: str = Field(description="start time, ISO 8601 UTC")
    database: str
    compressed: bool


class SchedulerStatus(BaseModel):
    schedule: str = Field(description="BACKUP_SCHEDULE")
    enabled: bool = Field(description="BACKUP_ENABLED")
    running: bool = Field(description="true only when Prefect reports a live scheduler")
    detail: str = Field(description="why running is what it is")


class BackupList(BaseModel):
    success: Literal[True] = True
    backups: list[BackupRecord]
    total: int
    totalSize: int
    scheduler: SchedulerStatus


class BackupResponse(BaseModel):
    success: Literal[True] = True
    backup: BackupRecord


class StrictRequest(BaseModel):
    """A request body: a field the API does not know is refused (422, naming it), never
    silently dropped (``{"includeData": false}`` used to make a full backup)."""

    model_config = ConfigDict(extra="forbid")


class CreateBackupRequest(StrictRequest):
    name: str | None = Field(
        default=None,
        description=f"the id's prefix (default {DEFAULT_BACKUP_NAME!r})",
        examples=[DEFAULT_BACKUP_NAME],
    )
    compress: bool = Field(default=True, description="false stores the dump uncompressed")
    compression: Literal["zstd", "gzip", "none"] | None = Field(
        default=None, description="default BACKUP_COMPRESSION"
    )
    format: Literal["custom", "plain", "directory"] | None = Field(
        default=None, description="default BACKUP_FORMAT"
    )
    includeData: bool = Field(default=True, description="false: the schema only")
    includeSchema: bool = Field(default=True, description="false: the data only")
    tables: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100,
        description="only tables matching these patterns (pg_dump -t: 'public.orders', 'shop.*')",
    )  # fmt: skip
    excludeTables: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100,
        description="leave out tables matching these patterns (pg_dump -T)",
    )  # fmt: skip
    rotate: bool = Field(default=True, description="apply the retention policy afterwards")
    wait: bool = Field(
        default=True, description="false: start a Prefect flow run and answer 202 at once"
    )


class UploadOutcome(BaseModel):
    copiedTo: list[str]
    failed: dict[str, str]


class RotationOutcome(BaseModel):
    deleted: list[str] = Field(description="backups rotation deleted, on any target")
    errors: list[str] = Field(description="what failed (nothing listed was lost)")


class CreatedBackupResponse(BaseModel):
    success: Literal[True] = True
    backup: BackupRecord
    locations: list[str]
    upload: UploadOutcome | None = None
    rotation: RotationOutcome | None = None
    problems: list[str] = Field(
        default_factory=list,
        description="what failed after the backup was made and verified (upload, rotation)",
    )


class RunAccepted(BaseModel):
    success: Literal[True] = True
    message: str
    run: RunHandle


class MessageResponse(BaseModel):
    success: Literal[True] = True
    message: str


# Far above any real target (a database name is at most 63 bytes, a libpq URL a few hundred):
# a bigger one is refused by validation before any code parses it. Ids and names need no such
# limit: naming.validate_id/validate_name refuse anything longer than their shape.
MAX_TARGET_CHARS = 4096


class RestoreRequest(StrictRequest):
    backupId: str = Field(
        description="backup id, or 'latest' for the newest verified backup",
        examples=["manual_backup_2025-10-02T10-00-00Z"],
    )
    target: str | None = Field(
        default=None,
        max_length=MAX_TARGET_CHARS,
        description=(
            "a database name on the DATABASE_URL server, or a postgresql:// URL; "
            "default: a new database <db>_restored_<time>"
        ),
    )
    confirm: Annotated[str, Field(max_length=MAX_TARGET_CHARS)] | bool | None = Field(
        default=None,
        description="the target database's name: required to replace a database that has data",
    )
    jobs: int | None = Field(
        default=None, ge=1, le=64,
        description="connections loading the restore (default BACKUP_RESTORE_JOBS)",
    )  # fmt: skip
    safetyBackup: bool = Field(
        default=True, description="back up a target with data before replacing it"
    )
    wait: bool = Field(
        default=True, description="false: start a Prefect flow run and answer 202 at once"
    )


class RestoreInfo(BaseModel):
    target: str = Field(description="the target database, without password")
    database: str
    durationSeconds: float
    safetyBackupId: str | None
    replaced: bool
    source: str = Field(description="the storage target the backup was read from")


class RestoreResponse(BaseModel):
    success: Literal[True] = True
    message: str
    backup: BackupRecord
    restore: RestoreInfo


class ImportResponse(BaseModel):
    success: Literal[True] = True
    message: str
    backup: BackupRecord


class RunResponse(BaseModel):
    success: Literal[True] = True
    run: RunState


class HealthResponse(BaseModel):
    success: Literal[True] = True
    status: Literal["ok"] = "ok"
    version: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: each status documented with the error body (400 and 421
    come from the guard on every route)."""
    return {status: {"model": ErrorResponse} for status in sorted({400, 421, *statuses})}


AUTH_ERRORS = (401, 403)
BODY_ERRORS = (413, 415)  # the guard's answers to a body of the wrong type or size


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


# --- handlers -------------------------------------------------------------------------------------


def health() -> HealthResponse:
    """Liveness: the process answers. Needs no token and reveals nothing else."""
    return HealthResponse(version=__version__)


def list_backups(ctx: Ctx) -> dict[str, Any]:
    """Every complete backup, newest first, with totals and whether the scheduler runs."""
    entries = catalog.list_all(ctx.storages())
    return {
        "success": True,
        "backups": [{**e.manifest.to_public(), "locations": e.locations} for e in entries],
        "total": len(entries),
        "totalSize": sum(e.manifest.size for e in entries),
        "scheduler": ctx.scheduler(),
    }


def metrics(ctx: Ctx) -> Response:
    """Prometheus metrics of every database and target (``pgkeeper.metrics``)."""
    from pgkeeper.metrics import CONTENT_TYPE, render

    return Response(render(ctx.storages(), ctx.secrets), media_type=CONTENT_TYPE)


def show_backup(ctx: Ctx, backup_id: str) -> dict[str, Any]:
    """One backup's record and every target holding it."""
    naming.validate_id(backup_id)
    storages = ctx.storages()
    manifest, _ = catalog.find(storages, backup_id)
    locations = [s.url for s in storages if catalog.read_manifest(s, backup_id) is not None]
    return {"success": True, "backup": {**manifest.to_public(), "locations": locations}}


def _compression(body: CreateBackupRequest, settings: Settings) -> str | None:
    """The compression the request asks for; None leaves BACKUP_COMPRESSION to decide."""
    if not body.compress:
        if body.compression not in (None, "none"):
            raise UsageError(
                f"compress is false but compression is {body.compression!r} (send one of them)"
            )
        return "none"
    if body.compression is not None:
        return body.compression
    # "compress": true (the seed's default) asks for compression even where the default is none.
    return "zstd" if settings.backup_compression == "none" else None


def _backup_options(body: CreateBackupRequest) -> dict[str, Any]:
    """What the request chose beyond name and compression, as BackupOptions fields."""
    if not body.includeData and not body.includeSchema:
        raise UsageError(
            "includeData and includeSchema are both false: that backup would hold nothing "
            "(leave one of them true)"
        )
    return {
        "schema_only": not body.includeData,
        "data_only": not body.includeSchema,
        "tables": list(body.tables),
        "exclude_tables": list(body.excludeTables),
    }


def create_backup(ctx: Ctx, body: CreateBackupRequest) -> Any:
    """Back up the database now (dump, verify, copy offsite, rotate), or start a Prefect run."""
    from pgkeeper.backup import BackupOptions
    from pgkeeper.procedure import take_backup

    settings = ctx.settings
    name = naming.validate_name(DEFAULT_BACKUP_NAME if body.name is None else body.name)
    compression = _compression(body, settings)
    chosen = _backup_options(body)
    if not body.wait:
        # Only what the request chose: the flow's own settings decide the rest.
        parameters: dict[str, Any] = {"name": name}
        if not body.rotate:
            parameters["rotate"] = False
        if compression is not None:
            parameters["compression"] = compression
        if body.format is not None:
            parameters["format"] = body.format
        parameters |= {key: value for key, value in chosen.items() if value}
        handle = ctx.prefect.start_run("backup", parameters)
        return _accepted(f"backup started as Prefect run {handle.name}", handle)
    options = BackupOptions(
        name=name, format=body.format, compression=compression, trigger="api", **chosen
    )
    run = take_backup(settings, options, storages=ctx.storages(), rotate_after=body.rotate)
    result: dict[str, Any] = {
        "success": True,
        "backup": run.manifest.to_public(),
        "locations": run.locations,
        "problems": [redact(text, ctx.secrets) for text in run.problems],
    }
    if run.upload is not None:
        result["upload"] = {
            "copiedTo": run.upload.copied_to,
            "failed": {url: redact(text, ctx.secrets) for url, text in run.upload.failed.items()},
        }
    if run.rotation is not None:
        result["rotation"] = {
            "deleted": run.rotation.deleted,
            "errors": [redact(e, ctx.secrets) for t in run.rotation.targets for e in t.errors],
        }
    return result


def _accepted(message: str, handle: RunHandle) -> JSONResponse:
    body = RunAccepted(message=message, run=handle).model_dump(mode="json")
    return JSONResponse(body, status_code=202, headers={"Location": f"/api/runs/{handle.id}"})


def delete_backup(ctx: Ctx, backup_id: BackupIdQuery) -> dict[str, Any]:
    """Delete a backup from every target that holds it (its manifest first)."""
    naming.validate_id(backup_id)
    storages = ctx.storages()
    holding = [s for s in storages if catalog.read_manifest(s, backup_id) is not None]
    if not holding:
        catalog.find(storages, backup_id)  # raises the not-found error
    for storage in holding:
        catalog.delete_backup(storage, backup_id)
    return {"success": True, "message": "Backup deleted successfully"}


_DB_NAME = re.compile(r"^[^\x00-\x1f/\\]{1,63}$")


def _restore_target(settings: Settings, target: str | None) -> str | None:
    """The target as a connection string: a URL as given, a bare name on DATABASE_URL's server."""
    if target is None:
        return None
    if "://" in target or "=" in target:
        ConnInfo.parse(target)  # a malformed URL fails here with a one-line ConfigError
        return target
    if not _DB_NAME.match(target) or len(target.encode()) > 63:
        raise UsageError(
            f"target {target[:80]!r} is not a database name (1-63 bytes) nor a postgresql:// URL"
        )
    server = ConnInfo.parse(settings.require_database_url())
    return server.with_dbname(target).conninfo()


def _target_has_password(target: str) -> bool:
    try:
        return bool(ConnInfo.parse(target).params.get("password"))
    except PgkeeperError:
        return False


def restore(ctx: Ctx, body: RestoreRequest) -> Any:
    """Restore a backup; an existing database with data is replaced only when confirm names it."""
    from pgkeeper.restore import restore_backup

    settings = ctx.settings
    storages = ctx.storages()
    if body.backupId == "latest":
        backup_id = catalog.latest_backup(settings, storages).id
    else:
        backup_id = naming.validate_id(body.backupId)
    confirm = body.confirm if isinstance(body.confirm, str) else None
    if body.target is not None and not body.target.strip():
        raise UsageError("target is empty (send a database name, a URL, or leave it out)")
    if not body.wait:
        if body.target is not None and _target_has_password(body.target):
            raise UsageError(
                "with \"wait\": false send the target as a database name or a URL without "
                "password: flow parameters are visible in the Prefect UI"
            )
        if body.jobs is not None:
            raise UsageError(
                "jobs applies only with \"wait\": true (the restore flow uses BACKUP_RESTORE_JOBS)"
            )
        catalog.find(storages, backup_id)  # a bad id fails now, not in the flow
        parameters: dict[str, Any] = {
            "backup_id": backup_id,
            "target": body.target,
            "confirm": confirm,
            "safety_backup": body.safetyBackup,
        }
        handle = ctx.prefect.start_run("restore", parameters)
        return _accepted(f"restore started as Prefect run {handle.name}", handle)
    target_url = _restore_target(settings, body.target)
    try:
        result = restore_backup(
            settings,
            backup_id,
            target_url,
            confirm=confirm,
            jobs=body.jobs,
            safety_backup=body.safetyBackup,
            storages=storages,
        )
    except ConfirmationRequiredError as exc:
        # The core's text names the CLI flag; say it in this front door's words.
        database = ConnInfo.parse(target_url).dbname if target_url else "the target"
        raise ConfirmationRequiredError(
            f"database {database!r} already has data; restoring replaces it (send "
            f"\"confirm\": \"{database}\" to proceed; a safety backup is taken first)"
        ) from exc
    manifest, _ = catalog.find(storages, backup_id)
    return {
        "success": True,
        "message": "Backup restored successfully",
        "backup": manifest.to_public(),
        "restore": {
            "target": result.target,
            "database": result.database,
            "durationSeconds": round(result.duration_seconds, 3),
            "safetyBackupId": result.safety_backup_id,
            "replaced": result.replaced,
            "source": result.source,
        },
    }


def read_run(ctx: Ctx, run_id: uuid.UUID) -> dict[str, Any]:
    """The state of a pgkeeper flow run (started with "wait": false, or by the scheduler)."""
    state = ctx.prefect.read_run(run_id)
    if state is None:
        raise GuardError(f"no pgkeeper flow run {run_id} on {ctx.prefect.shown}", 404)
    if state.flow == "backup" and state.finished:
        made = [e.manifest.id for e in catalog.list_all(ctx.storages())
                if e.manifest.flow_run_id == state.id]  # fmt: skip
        state.backupId = made[0] if made else None
    return {"success": True, "run": state}


# --- download: streamed, verified, with Range -----------------------------------------------------

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``(first, last)`` a Range header asks for, or None to send it all.

    Invalid or multi-range headers are ignored (RFC 9110 lets a server send the whole
    representation); a range starting past the end raises RangeNotSatisfiableError.
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    unsatisfiable = RangeNotSatisfiableError(
        f"range {header.strip()[:60]!r} is outside the file's {size} bytes", size
    )
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise unsatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


def _skip(src: BinaryIO, count: int) -> None:
    """Move a stored object's reader ``count`` bytes on: seek where possible, else read past."""
    try:
        if src.seekable():
            src.seek(count)
            return
    except (AttributeError, OSError):
        pass
    while count > 0:
        chunk = src.read(min(CHUNK, count))
        if not chunk:
            return
        count -= len(chunk)


def _send_object(
    storage: Storage, manifest: Manifest, obj: StoredObject, first: int, length: int, whole: bool
) -> Iterator[bytes]:
    """Yield ``length`` bytes of a stored object from ``first``, in CHUNK pieces.

    A whole object is hashed as it goes and its last chunk is held back until the sha256 equals
    the manifest's: a corrupt copy ends the response short of its Content-Length, so a client
    never receives it as a complete download.
    """
    digest = hashlib.sha256() if whole else None
    held = b""
    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        if first:
            _skip(src, first)
        remaining = length
        while remaining > 0:
            chunk = src.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            if digest is not None:
                digest.update(chunk)
            if held:
                yield held
            held = chunk
    if remaining > 0:
        raise VerificationError(f"{obj.name} is shorter than its manifest says", check="objects")
    if digest is not None and digest.hexdigest() != obj.sha256:
        raise VerificationError(
            f"{obj.name} does not match its manifest's sha256 (download aborted; "
            f"run 'pgkeeper verify {manifest.id}')",
            check="checksum",
        )
    if held:
        yield held


def _tar_layout(manifest: Manifest) -> tuple[list[tuple[bytes, StoredObject]], int]:
    """Headers and total size of the tar ``pgkeeper download`` writes for a directory backup.

    Same bytes as ``tarfile.open(mode="w|")`` (see ``download.write_backup``): a PAX header per
    member, data padded to 512-byte blocks, two zero blocks, padding to a 10240-byte record.
    Knowing the size up front is what lets the response carry a Content-Length.
    """
    members: list[tuple[bytes, StoredObject]] = []
    total = 0
    for obj in manifest.objects:
        info = tarfile.TarInfo(obj.name)
        info.size = obj.size
        info.mtime = int(manifest.finished_at.timestamp())
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        members.append((header, obj))
        total += len(header) + obj.size + (-obj.size % tarfile.BLOCKSIZE)
    total += 2 * tarfile.BLOCKSIZE
    total += -total % tarfile.RECORDSIZE
    return members, total


def _send_tar(storage: Storage, manifest: Manifest) -> Iterator[bytes]:
    """The directory backup as a tar stream; each member is verified as ``_send_object`` does."""
    members, total = _tar_layout(manifest)
    sent = 0
    for header, obj in members:
        yield header
        yield from _send_object(storage, manifest, obj, 0, obj.size, whole=True)
        padding = -obj.size % tarfile.BLOCKSIZE
        if padding:
            yield b"\0" * padding
        sent += len(header) + obj.size + padding
    yield b"\0" * (total - sent)  # end-of-archive blocks and record padding


def download(request: Request, ctx: Ctx, backup_id: BackupIdQuery) -> Response:
    """Stream a backup's stored file (directory backups as a tar), with Range support; HEAD
    answers the same headers without reading a byte of the backup."""
    from pgkeeper.cli import download_name
    from pgkeeper.download import check_present

    head = request.method == "HEAD"

    naming.validate_id(backup_id)
    manifest, storage = catalog.find(ctx.storages(), backup_id)
    check_present(storage, manifest)  # an error now, not a response cut short
    filename = download_name(manifest, decompress=False)
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Backup-Id": manifest.id,
        "X-Backup-Sha256": manifest.sha256,
    }
    media_type = "application/octet-stream"
    if manifest.format == "directory":
        _, total = _tar_layout(manifest)
        headers |= {"Content-Length": str(total), "Accept-Ranges": "none"}
        if head:
            return Response(headers=headers, media_type=media_type)
        body = _send_tar(storage, manifest)
        return StreamingResponse(body, headers=headers, media_type=media_type)
    obj = manifest.objects[0]
    etag = f'"{obj.sha256}"'
    headers |= {"Accept-Ranges": "bytes", "ETag": etag}
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:
        wanted = None  # the client's partial copy is of other bytes: send them all
    try:
        span = parse_range(wanted, obj.size)
    except RangeNotSatisfiableError as exc:
        return _error_response(ctx, exc, {"Content-Range": f"bytes */{exc.size}"})
    if span is None:
        headers["Content-Length"] = str(obj.size)
        if head:
            return Response(headers=headers, media_type=media_type)
        body = _send_object(storage, manifest, obj, 0, obj.size, whole=True)
        return StreamingResponse(body, headers=headers, media_type=media_type)
    first, last = span
    headers |= {
        "Content-Length": str(last - first + 1),
        "Content-Range": f"bytes {first}-{last}/{obj.size}",
    }
    if head:
        return Response(status_code=206, headers=headers, media_type=media_type)
    whole = first == 0 and last == obj.size - 1
    body = _send_object(storage, manifest, obj, first, last - first + 1, whole)
    return StreamingResponse(body, status_code=206, headers=headers, media_type=media_type)


# --- import: the request body streamed into storage -----------------------------------------------


class _BodyReader:
    """``read(n)`` over the request body for core code running in a worker thread.

    Each call pulls chunks from the event loop (``anyio.from_thread``) until it has ``n`` bytes,
    so at most about one CHUNK is held; more than ``limit`` bytes raise ImportTooLargeError.
    """

    def __init__(self, chunks: AsyncIterator[bytes], limit: int) -> None:
        self._chunks = chunks
        self._limit = limit
        self._buffer = bytearray()
        self._seen = 0
        self._done = False

    async def _next(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._buffer) < n):
            chunk = anyio.from_thread.run(self._next)
            if chunk is None:
                self._done = True
                break
            self._seen += len(chunk)
            if self._seen > self._limit:
                raise _too_large(self._limit)
            self._buffer += chunk
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        return data


def _too_large(limit: int) -> ImportTooLargeError:
    return ImportTooLargeError(
        f"the upload is larger than the import limit of {limit} bytes "
        "(raise BACKUP_API_MAX_IMPORT_BYTES or import with 'pgkeeper import FILE')"
    )


async def import_backup(
    request: Request,
    ctx: Ctx,
    name: Annotated[
        str, Query(description="backup name: the new id's prefix", examples=[DEFAULT_IMPORT_NAME])
    ] = DEFAULT_IMPORT_NAME,
) -> dict[str, Any]:
    """Import an external pg_dump output (custom, tar, directory tar or plain SQL; raw, gzip or
    zstd) sent as the request body; it is detected by content, stored and verified."""
    from pgkeeper.importing import import_stream

    naming.validate_name(name)
    # The guard has checked the token, the type and a declared length; the reader counts what
    # really arrives.
    limit = ctx.settings.backup_api_max_import_bytes
    primary = (await run_in_threadpool(ctx.storages))[0]
    reader = _BodyReader(request.stream(), limit)
    manifest = await run_in_threadpool(
        import_stream, ctx.settings, reader.read, name=name, storage=primary, max_bytes=limit
    )
    return {
        "success": True,
        "message": "Backup imported successfully",
        "backup": manifest.to_public(),
    }


# --- errors at the boundary -----------------------------------------------------------------------


def _error_response(
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


def _install_error_handlers(app: FastAPI) -> None:
    def context_of(request: Request) -> ApiContext | None:
        return getattr(request.app.state, "pgkeeper", None)

    async def pgkeeper_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PgkeeperError)  # noqa: S101 - registered for this type only
        if exc.http_status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        return _error_response(context_of(request), exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # noqa: S101 - registered for this type
        error = UsageError(_validation_message(exc))
        if any(e.get("type") == "extra_forbidden" for e in exc.errors()):
            error.http_status = 422  # understood, but asks for something this API does not do
        return _error_response(context_of(request), error)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101 - registered for this type
        text = {404: "no such endpoint (see /docs)", 405: "method not allowed (see /docs)"}
        error = GuardError(text.get(exc.status_code, str(exc.detail)), exc.status_code)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # The router names only the first route of the path; a path has one route per method.
            headers["Allow"] = ", ".join(_methods_of(request.app, request.scope))
        return _error_response(context_of(request), error, headers)

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
        secrets=_secrets_of(settings),
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
        render=lambda exc: _error_response(ctx, exc),
    )
    _install_error_handlers(app)
    _install_docs(app)
    for path in ("/docs", DOCS_ASSETS, "/openapi.json"):
        routes.table[(path, "*")] = routes.OPEN
    read, admin = Access("read"), Access("admin")
    limit = settings.backup_api_max_import_bytes
    dump = BodyRule(
        types=DUMP_TYPES, limit=limit, buffered=False,
        wanted="an import takes the dump as the raw body (send Content-Type: "
        "application/octet-stream, or application/gzip, application/zstd, application/sql)",
        too_large=_too_large(limit).message,
    )  # fmt: skip
    add = routes.add
    add("/api/health", health, "GET", routes.OPEN, tags=["health"],
        response_model=HealthResponse, responses=_errors())  # fmt: skip
    add(
        "/api/backups", list_backups, "GET", read, tags=["backups"],
        response_model=BackupList, responses=_errors(*AUTH_ERRORS), summary="List backups",
    )  # fmt: skip
    add(
        "/api/backups", create_backup, "POST", Access("admin", json_body("POST /api/backups")),
        tags=["backups"], response_model=CreatedBackupResponse,
        responses={202: {"model": RunAccepted},
                   **_errors(*AUTH_ERRORS, *BODY_ERRORS, 404, 409, 422, 503)},
        summary="Back up now",
    )  # fmt: skip
    add(
        "/api/backups", delete_backup, "DELETE", admin, tags=["backups"],
        response_model=MessageResponse, responses=_errors(*AUTH_ERRORS, 404),
        summary="Delete a backup",
    )  # fmt: skip
    add(
        "/api/backups/restore", restore, "POST",
        Access("admin", json_body("POST /api/backups/restore")), tags=["backups"],
        response_model=RestoreResponse,
        responses={202: {"model": RunAccepted},
                   **_errors(*AUTH_ERRORS, *BODY_ERRORS, 404, 409, 422, 503)},
        summary="Restore a backup",
    )  # fmt: skip
    add(
        "/api/backups/download", download, "GET", read, tags=["backups"],
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
        "/api/backups/download", download, "HEAD", read, include_in_schema=False,
    )  # fmt: skip
    add(
        "/api/backups/import", import_backup, "POST", Access("admin", dump), tags=["backups"],
        response_model=ImportResponse, responses=_errors(*AUTH_ERRORS, *BODY_ERRORS, 422),
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
        "/api/backups/{backup_id}", show_backup, "GET", read, tags=["backups"],
        response_model=BackupResponse, responses=_errors(*AUTH_ERRORS, 404),
        summary="Show one backup",
    )  # fmt: skip
    add(
        "/metrics", metrics, "GET", read, tags=["metrics"],
        response_class=Response, responses=_errors(*AUTH_ERRORS),
        summary="Prometheus metrics",
    )  # fmt: skip
    add(
        "/api/runs/{run_id}", read_run, "GET", read, tags=["runs"],
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
        # headers, and its handling of a refused body (see api_guard), are what was tested.
        http="h11",
        server_header=False,
        log_level="info",
        ssl_certfile=str(ssl_certfile) if tls else None,
        ssl_keyfile=str(ssl_keyfile) if tls else None,
    )


__all__ = [
    "check_bind", "check_tls", "create_app", "parse_range", "plaintext_warning", "redact",
    "serve_api",
]  # fmt: skip
