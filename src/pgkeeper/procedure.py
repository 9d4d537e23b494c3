"""The backup procedure every front door runs: dump, verify, upload, rotate, tell the outcome.

    take_backup ─ 1. dump      backup.run_backup            the primary target, under the lock
                  2. verify    verify.verify_copy           BACKUP_VERIFY (or the door's level)
                  3. upload    upload.upload_backup         every offsite target, proven
                  4. rotate    rotate.rotate                this database's retention, everywhere
                  5. tell      alerts.report_outcome        once per operation that ran

The CLI (``pgkeeper backup``) and the API (``POST /api/backups``) call ``take_backup``; the
Prefect flow runs the same steps as retryable tasks (each task calls the step function here),
so every door gets the same behaviour and the same fixes. The rules, the same everywhere:
  - a failed dump or verification is the backup's failure: raised, nothing uploaded;
  - a failed upload or rotation does not undo a verified backup: the backup is kept and
    returned, and the run reports the failure (``BackupRun.problems``; the CLI then exits 1,
    the flow run fails, the API says so in its answer) with the command that retries;
  - each failing step is told as its own alert (``backup-failed``, ``upload-failed``,
    ``rotate-failed``) for the database, and a success resolves the ones that ran.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

from pgkeeper import alerts
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.errors import PgkeeperError
from pgkeeper.manifest import Manifest
from pgkeeper.pipeline import Progress
from pgkeeper.postgres import ConnInfo
from pgkeeper.rotate import RotationReport, policies_from_settings, rotate
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.upload import UploadReport, upload_backup
from pgkeeper.verify import verify_copy

log = logging.getLogger(__name__)

# A door's progress display: ``progress_for(step, total_bytes)`` gives a callback (or None).
ProgressFor = Callable[[str, int | None], AbstractContextManager[Progress | None]]


@contextmanager
def no_progress(step: str, total: int | None) -> Iterator[Progress | None]:
    yield None


@dataclass
class BackupRun:
    """What ``take_backup`` did: the backup, where it is, and how upload and rotation went."""

    manifest: Manifest
    locations: list[str]
    upload: UploadReport | None = None
    rotation: RotationReport | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise AfterBackupError naming what failed after the backup was made."""
        if self.problems:
            raise AfterBackupError(self.manifest.id, self.problems)


class AfterBackupError(PgkeeperError):
    """The backup was made and verified, but a later step (upload, rotation) failed: the run
    fails (exit 1, a failed flow run) while the backup itself counts as a success."""

    def __init__(self, backup_id: str, problems: list[str]) -> None:
        super().__init__(f"backup {backup_id} made, but " + "; ".join(problems))
        self.backup_id = backup_id
        self.problems = problems


def source_of(settings: Settings, options: BackupOptions) -> ConnInfo:
    """The database a backup with ``options`` dumps (raises ConfigError when none is set)."""
    return ConnInfo.parse(options.database_url or settings.require_database_url())


# --- the steps (the flow's tasks call these one by one) ----------------------------------------


def dump(
    settings: Settings, options: BackupOptions, primary: Storage, progress: Progress | None = None
) -> Manifest:
    """Step 1: the dump onto the primary target (see ``backup.run_backup``)."""
    return run_backup(settings, options, storage=primary, progress=progress)


def verify(
    settings: Settings,
    manifest: Manifest,
    primary: Storage,
    level: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Step 2: verify the stored copy (``level``: full, quick or off; default BACKUP_VERIFY).
    Raises VerificationError naming the failed check (recorded in the manifest first)."""
    level = level or settings.backup_verify
    if level == "off":
        return manifest
    return verify_copy(settings, primary, manifest, level=level, progress=progress)


def upload(
    settings: Settings,
    manifest: Manifest,
    storages: list[Storage],
    progress: Progress | None = None,
) -> UploadReport | None:
    """Step 3: copy to every offsite target (None when there is none)."""
    if len(storages) < 2:
        return None
    return upload_backup(settings, manifest.id, storages=storages, progress=progress)


def upload_problem(report: UploadReport | None) -> str | None:
    if report is None or report.ok:
        return None
    where = ", ".join(f"{url}: {why}" for url, why in report.failed.items())
    return f"the upload failed ({where}); retry with 'pgkeeper upload {report.backup_id}'"


def rotate_database(
    settings: Settings, storages: list[Storage], manifest: Manifest
) -> RotationReport:
    """Step 4: retention for the database just backed up, on every target, by its policy
    (``settings``: its own in a fleet); other databases are left to their own backups and
    to the scheduled ``rotate``, which plans every database."""
    group = f"{manifest.database}@{manifest.server}"
    return rotate(storages, policies_from_settings(settings, storages), only=group)


def rotation_problem(report: RotationReport | None) -> str | None:
    if report is None or report.ok:
        return None
    errors = "; ".join(e for t in report.targets for e in t.errors)
    return f"rotation failed ({errors}); nothing listed was lost, run 'pgkeeper rotate' again"


# --- the whole procedure -----------------------------------------------------------------------


def take_backup(
    settings: Settings,
    options: BackupOptions,
    *,
    storages: list[Storage] | None = None,
    verify_level: str | None = None,
    upload_offsite: bool = True,
    rotate_after: bool = True,
    progress_for: ProgressFor = no_progress,
) -> BackupRun:
    """Back up one database: dump, verify, upload, rotate (see the module docstring).

    Raises what the dump and verification raise (the backup failed); upload and rotation
    failures are in ``BackupRun.problems``. Every outcome is told (alerts, heartbeat, Sentry).
    """
    storages = storages if storages is not None else targets(settings)
    primary = storages[0]
    source = source_of(settings, options)
    with alerts.watch(settings, primary, "backup", source.dbname, source.server) as outcome:
        with progress_for("backup", None) as progress:
            manifest = dump(settings, options, primary, progress)
        with progress_for("verify", manifest.size) as progress:
            manifest = verify(settings, manifest, primary, verify_level, progress)
        outcome.manifest = manifest
    run = BackupRun(manifest=manifest, locations=[primary.url])
    if upload_offsite and len(storages) > 1:
        with progress_for("upload", manifest.size) as progress:
            run.upload = upload(settings, manifest, storages, progress)
        assert run.upload is not None  # noqa: S101 - there is an offsite target
        run.locations += run.upload.copied_to + run.upload.already_there
        _tell(settings, primary, source, "upload", upload_problem(run.upload), run)
    if rotate_after:
        run.rotation = rotate_database(settings, storages, manifest)
        _tell(settings, primary, source, "rotate", rotation_problem(run.rotation), run)
    return run


def _tell(
    settings: Settings,
    primary: Storage,
    source: ConnInfo,
    operation: str,
    problem: str | None,
    run: BackupRun,
) -> None:
    """Record a step's problem on the run and tell its outcome (opens or resolves its alert)."""
    if problem is not None:
        run.problems.append(problem)
        log.warning("backup %s: %s", run.manifest.id, problem)
    tell_step(settings, primary, source.dbname, source.server, operation, problem)


def tell_step(
    settings: Settings,
    primary: Storage,
    database: str,
    server: str,
    operation: str,
    problem: str | None,
) -> None:
    """Tell how an after-backup step (upload, rotate) went for the database: a problem opens
    its alert, success resolves it. Never raises."""
    alerts.report_outcome(
        settings, primary, operation, database=database, server=server, error=problem
    )
