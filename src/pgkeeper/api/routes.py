"""The API's handlers: each parses its input, calls one core procedure and renders the result
(the seed's JSON shapes). Blocking work runs in the threadpool, never on the event loop."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio.from_thread
from fastapi import Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from pgkeeper import __version__, catalog, naming
from pgkeeper.api.context import BackupIdQuery, Ctx
from pgkeeper.api.errors import error_response
from pgkeeper.api.guard import GuardError
from pgkeeper.api.models import (
    DEFAULT_BACKUP_NAME,
    DEFAULT_IMPORT_NAME,
    CreateBackupRequest,
    HealthResponse,
    ImportTooLargeError,
    RestoreRequest,
    RunAccepted,
    ScheduleRequest,
)
from pgkeeper.download import RangeNotSatisfiableError
from pgkeeper.download import serve as serve_download
from pgkeeper.errors import ConfirmationRequiredError, PgkeeperError, UsageError
from pgkeeper.postgres import ConnInfo
from pgkeeper.prefect_api import RunHandle
from pgkeeper.redaction import redact
from pgkeeper.settings import Settings
from pgkeeper.storage import targets

# --- handlers -------------------------------------------------------------------------------------


def health() -> HealthResponse:
    """Liveness: the process answers. Needs no token and reveals nothing else."""
    return HealthResponse(version=__version__)


DatabaseQuery = Annotated[
    str | None,
    Query(
        max_length=200,
        description="only this database's backups (name, or name@host:port)",
        examples=["shop"],
    ),
]


def list_backups(ctx: Ctx, database: DatabaseQuery = None) -> dict[str, Any]:
    """Every complete backup (of one database with ``database``), newest first, with totals
    and whether the scheduler runs."""
    entries = catalog.list_all(ctx.storages())
    if database is not None:
        name, _, server = database.rpartition("@") if "@" in database else (database, "", "")
        entries = [e for e in entries if e.manifest.database == name
                   and server in ("", e.manifest.server)]  # fmt: skip
    return {
        "success": True,
        "backups": [{**e.manifest.to_public(), "locations": e.locations} for e in entries],
        "total": len(entries),
        "totalSize": sum(e.manifest.size for e in entries),
        "scheduler": ctx.scheduler(),
    }


def list_databases(ctx: Ctx) -> dict[str, Any]:
    """Every database of the inventory: schedule, newest verified backup, its age and size,
    newest restore test, and whether it is within its RPO (its max age)."""
    from pgkeeper.fleet import status
    from pgkeeper.inventory import load_inventory
    from pgkeeper.manifest import utcnow
    from pgkeeper.monitor import expectations

    inventory = load_inventory(ctx.settings)  # '*' servers are asked for their databases

    def max_age(own: Settings) -> Any:
        interval = None
        if not own.backup_max_age and own.backup_enabled:
            from deployments.schedules import backup_interval  # the schedules' arithmetic

            interval = backup_interval(own)
        return expectations(own, interval).max_age

    manifests = [e.manifest for e in catalog.list_all(ctx.storages())]
    now = utcnow()
    rows = [row.to_public(now) for row in status(inventory, manifests, max_age)]
    return {
        "success": True,
        "source": inventory.source,
        "databases": rows,
        "total": len(rows),
        "outsideRpo": sum(1 for r in rows if r["withinRpo"] is False),
        "unreachable": {
            server: redact(why, ctx.secrets) for server, why in inventory.errors.items()
        },
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
    if body.database is not None:  # a database of the inventory: its URL and its overrides
        settings = ctx.inventory().lookup(body.database).settings
    name = naming.validate_name(DEFAULT_BACKUP_NAME if body.name is None else body.name)
    compression = _compression(body, settings)
    chosen = _backup_options(body)
    if not body.wait:
        # Only what the request chose: the flow's own settings decide the rest.
        parameters: dict[str, Any] = {"name": name}
        if body.database is not None:
            parameters["database"] = body.database
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
    storages = ctx.storages() if body.database is None else targets(settings)
    run = take_backup(settings, options, storages=storages, rotate_after=body.rotate)
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
    from pgkeeper.restore import LeaveOut, MissingRoleError, restore_backup
    from pgkeeper.server_globals import GlobalsRestore

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
        # Only when asked for: a deployment registered before these parameters still runs.
        if body.noOwner:
            parameters["no_owner"] = True
        if body.noPrivileges:
            parameters["no_privileges"] = True
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
            leave_out=LeaveOut(owner=body.noOwner, privileges=body.noPrivileges),
        )
    except MissingRoleError as exc:  # the core names the CLI's options: say it in ours
        raise exc.with_options(exc.options and '"noOwner": true, "noPrivileges": true') from exc
    except ConfirmationRequiredError as exc:
        # The core's text names the CLI flag; say it in this front door's words.
        database = ConnInfo.parse(target_url).dbname if target_url else "the target"
        raise ConfirmationRequiredError(
            f"database {database!r} already has data; restoring replaces it (send "
            f"\"confirm\": \"{database}\" to proceed; a safety backup is taken first)"
        ) from exc
    manifest, _ = catalog.find(storages, backup_id)
    answer: dict[str, Any] = {
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
    if isinstance(result, GlobalsRestore):  # a server's globals: what was created, kept, skipped
        answer["globals"] = {
            "ok": result.ok,
            "rolePasswords": result.role_passwords,
            "createdRoles": result.created_roles,
            "keptRoles": result.kept_roles,
            "memberships": result.memberships,
            "settings": result.settings,
            "createdTablespaces": result.created_tablespaces,
            "keptTablespaces": result.kept_tablespaces,
            "applied": result.applied,
            "skipped": [s.__dict__ for s in result.skipped],
        }
        if not result.ok:
            answer["message"] = (
                f"Globals restored; {len(result.failed)} statement(s) were refused by the server"
            )
    return answer


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


def show_schedule(ctx: Ctx) -> dict[str, Any]:
    """Every pgkeeper deployment's schedule on the Prefect server, beside the environment's."""
    from pgkeeper.schedule import show

    return {"success": True, **show(ctx.prefect).to_dict()}


def set_schedule(ctx: Ctx, body: ScheduleRequest) -> dict[str, Any]:
    """Change schedules on the Prefect server now; serve keeps them until the environment's
    value changes (``pgkeeper.schedule``)."""
    # The one route that imports Prefect: its cron arithmetic (what the scheduler fires by)
    # validates the value and sets each schedule's max lateness; ~1.5 s once per process.
    from deployments.schedule_edits import requested
    from pgkeeper.schedule import set_schedules

    wanted = requested(ctx.settings, ctx.prefect, body.schedule, body.deployment, body.timezone)
    return {"success": True, **set_schedules(ctx.prefect, wanted).to_dict()}


def download(request: Request, ctx: Ctx, backup_id: BackupIdQuery) -> Response:
    """Stream a backup's stored file (directory backups as a tar), with Range support; HEAD
    answers the same headers without reading a byte of the backup."""
    naming.validate_id(backup_id)
    manifest, storage = catalog.find(ctx.storages(), backup_id)
    try:
        served = serve_download(
            storage, manifest, request.headers.get("range"), request.headers.get("if-range")
        )
    except RangeNotSatisfiableError as exc:
        return error_response(ctx, exc, {"Content-Range": f"bytes */{exc.size}"})
    media_type = "application/octet-stream"
    if request.method == "HEAD":
        return Response(status_code=served.status, headers=served.headers, media_type=media_type)
    return StreamingResponse(
        served.body(), status_code=served.status, headers=served.headers, media_type=media_type
    )


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
                raise too_large(self._limit)
            self._buffer += chunk
        if n < 0 or n >= len(self._buffer):
            data = bytes(self._buffer)
            self._buffer.clear()
        else:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
        return data


def too_large(limit: int) -> ImportTooLargeError:
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

