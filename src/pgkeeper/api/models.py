"""The HTTP API's request and response models (module level: FastAPI resolves these
annotations), and the errors only this front door raises.

Request bodies are ``StrictRequest``s: a field the API does not know is refused (422, naming
it), never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pgkeeper.errors import UsageError
from pgkeeper.prefect_api import RunHandle, RunState

DEFAULT_BACKUP_NAME = "manual_backup"  # the seed's name for backups made over the API
DEFAULT_IMPORT_NAME = "imported"

# --- errors of this front door ------------------------------------------------------------------


class ImportTooLargeError(UsageError):
    """The uploaded dump is larger than BACKUP_API_MAX_IMPORT_BYTES."""

    http_status = 413


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
    database: str | None = Field(
        default=None, max_length=200,
        description="a database of the inventory (name or name@host:port); default: "
        "DATABASE_URL's",
    )  # fmt: skip
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
    noOwner: bool = Field(
        default=False,
        description="leave the backup's owners out (pg_restore --no-owner): objects and the "
        "database are owned by the restoring user; for a server without the roles",
    )
    noPrivileges: bool = Field(
        default=False,
        description="leave the backup's grants out (pg_restore --no-privileges), the "
        "database's access privileges too",
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


class SkippedStatement(BaseModel):
    line: int = Field(description="the statement's first line in the globals file")
    statement: str = Field(description="its first words; strings shown as '…'")
    reason: str
    failed: bool = Field(description="the server refused it (otherwise a rule skipped it)")


class GlobalsReport(BaseModel):
    """What restoring a server's globals did (``server_globals.GlobalsRestore``)."""

    ok: bool = Field(description="false when the server refused a statement meant to apply")
    rolePasswords: bool = Field(description="the backup holds role passwords")
    createdRoles: list[str]
    keptRoles: list[str] = Field(description="roles that existed: left as they are")
    memberships: list[str] = Field(description="'role to member' applied")
    settings: list[str] = Field(description="'role: setting' applied")
    createdTablespaces: list[str]
    keptTablespaces: list[str]
    applied: list[str] = Field(description="comments and tablespace/parameter grants applied")
    skipped: list[SkippedStatement]


class RestoreResponse(BaseModel):
    success: Literal[True] = True
    message: str
    backup: BackupRecord
    restore: RestoreInfo
    globals: GlobalsReport | None = Field(
        default=None, description="for a globals backup: what was created, kept and skipped"
    )


class ImportResponse(BaseModel):
    success: Literal[True] = True
    message: str
    backup: BackupRecord


class RunResponse(BaseModel):
    success: Literal[True] = True
    run: RunState


class ScheduleRequest(StrictRequest):
    schedule: str = Field(
        min_length=1, max_length=200, examples=["daily"],
        description="like BACKUP_SCHEDULE: hourly, daily, weekly, monthly, a comma list of "
        "them, a 5-field cron, or off; with deployment: a cron, off or on",
    )  # fmt: skip
    deployment: str | None = Field(
        default=None, max_length=200, examples=["verify"],
        description="one deployment (verify, rotate, backup-daily, ...); default: the backups",
    )  # fmt: skip
    timezone: str | None = Field(
        default=None, max_length=64, examples=["Europe/Berlin"],
        description="IANA timezone; default: the schedule's current one",
    )  # fmt: skip


class ScheduleResponse(BaseModel):
    success: Literal[True] = True
    rule: str = Field(description="when serve applies the environment's schedule again")
    deployments: list[dict[str, Any]] = Field(
        description="each pgkeeper deployment: schedules on the server, the environment's, "
        "edited, source"
    )
    changed: list[str] = Field(description="deployments whose schedule this request changed")


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

