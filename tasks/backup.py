"""Task: make one backup of the database onto the primary target (``pgkeeper.backup``)."""

from __future__ import annotations

from prefect import get_run_logger, runtime, task

from pgkeeper import procedure
from pgkeeper.backup import BackupOptions
from pgkeeper.manifest import Manifest
from pgkeeper.postgres import ConnInfo
from pgkeeper.procedure import AfterBackupError
from pgkeeper.rotate import RotationReport
from pgkeeper.storage import targets
from tasks.inventory import settings_for
from tasks.progress import ProgressArtifact, expected_dump_size, human_size
from tasks.retry import TRANSIENT_RETRIES


@task(name="backup", **TRANSIENT_RETRIES)
def backup_database(
    name: str | None,
    format: str | None,
    compression: str | None,
    trigger: str,
    schema_only: bool = False,
    data_only: bool = False,
    tables: list[str] | None = None,
    exclude_tables: list[str] | None = None,
    database: str | None = None,
) -> Manifest:
    """Dump the database to the primary target, streamed and under the backup lock."""
    settings = settings_for(database)
    storages = targets(settings)
    total = expected_dump_size(storages, settings.require_database_url())
    options = BackupOptions(
        name=name, format=format, compression=compression, trigger=trigger,
        schema_only=schema_only, data_only=data_only, tables=tables or (),
        exclude_tables=exclude_tables or (), flow_run_id=runtime.flow_run.id,
    )  # fmt: skip
    with ProgressArtifact("backup-progress", "dumped", total) as progress:
        manifest = procedure.dump(settings, options, storages[0], progress)
        raw = f"{human_size(manifest.raw_size)} dumped, " if manifest.raw_size else ""
        progress.finish(f"{manifest.id}: {raw}{human_size(manifest.size)} stored, done")
    get_run_logger().info(
        "backup %s of %s: %d bytes in %s", manifest.id, manifest.database, manifest.size,
        storages[0].url,
    )  # fmt: skip
    return manifest


def _failure(result: object) -> str | None:
    """The one-line reason a step's task failed (its exception), or None when it did not."""
    if not isinstance(result, BaseException):
        return None
    text = str(result).strip() or type(result).__name__
    return text.splitlines()[0]


@task(name="backup-verdict")
def finish_backup(
    backup_id: str, uploaded: object, rotation: object, database: str | None = None
) -> str:
    """Tell how the upload and the rotation went (each its own alert for the database) and
    fail the run, with AfterBackupError, when either failed: the backup itself is done.

    ``uploaded``/``rotation``: what those tasks returned, their exception when they failed
    (passed with ``allow_failure``), or None when the step did not run."""
    settings = settings_for(database)
    storages = targets(settings)
    source = ConnInfo.parse(settings.require_database_url())
    problems = []
    if uploaded is not None and len(storages) > 1:
        upload = _failure(uploaded)
        if upload is not None:
            upload = f"the upload failed ({upload}); retry with 'pgkeeper upload {backup_id}'"
            problems.append(upload)
        procedure.tell_step(settings, storages[0], source.dbname, source.server, "upload", upload)
    if rotation is not None:
        rotate = _failure(rotation)
        if rotate is None and isinstance(rotation, RotationReport):
            rotate = procedure.rotation_problem(rotation)
        if rotate is not None:
            problems.append(rotate)
        procedure.tell_step(settings, storages[0], source.dbname, source.server, "rotate", rotate)
    if problems:
        raise AfterBackupError(backup_id, problems)
    return backup_id
