"""Tasks: copy backups to every offsite target (``pgkeeper.upload``) and report what went where.

A copy that failed only for transient reasons (5xx, throttling, a reset) raises
``TransientStorageError``, so the shared retry policy runs the upload again: it resumes, since
objects already proven on a target are not sent twice. Any permanent failure (403, a missing
bucket, a corrupt source) is a plain ``StorageError``: retrying cannot fix it.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from pgkeeper import catalog
from pgkeeper.errors import ConfigError, StorageError, TransientStorageError
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from pgkeeper.upload import UploadReport, clean_offsite, upload_missing
from pgkeeper.upload import upload_backup as copy_offsite
from tasks.inventory import settings_for
from tasks.progress import ProgressArtifact
from tasks.retry import TRANSIENT_RETRIES


def upload_error(reports: list[UploadReport]) -> StorageError | None:
    """The error for the failed copies in ``reports`` (None: none failed); transient only when
    every failure was."""
    failures = [(r, url, why) for r in reports for url, why in r.failed.items()]
    if not failures:
        return None
    text = "; ".join(f"{r.backup_id} -> {url}: {why}" for r, url, why in failures)
    every_transient = all(url in r.transient for r, url, _ in failures)
    kind = TransientStorageError if every_transient else StorageError
    return kind(f"upload failed: {text}")


def _log(reports: list[UploadReport]) -> None:
    logger = get_run_logger()
    for report in reports:
        for url in report.copied_to:
            logger.info("uploaded %s to %s", report.backup_id, url)
        for url, why in report.failed.items():
            logger.warning("upload of %s to %s failed: %s", report.backup_id, url, why)


@task(name="upload", **TRANSIENT_RETRIES)
def upload_backup(backup_id: str, database: str | None = None) -> list[str]:
    """Copy the backup to every offsite target that lacks it, proven by checksum; progress
    (bytes sent to all targets) shows as the ``upload-progress`` artifact."""
    settings = settings_for(database)
    storages = targets(settings)
    offsite = len(storages) - 1
    if offsite < 1:  # nothing to copy to: no progress bar either
        report = copy_offsite(settings, backup_id, storages=storages)
    else:
        manifest, _ = catalog.find(storages, backup_id)
        with ProgressArtifact("upload-progress", "uploaded", manifest.size * offsite) as progress:
            report = copy_offsite(settings, backup_id, storages=storages, progress=progress)
    _log([report])
    if error := upload_error([report]):
        raise error
    return report.copied_to + report.already_there


@task(name="clean-offsite", **TRANSIENT_RETRIES)
def clean_offsite_uploads() -> list[str]:
    """Abort multipart uploads left on the offsite targets by killed uploaders."""
    aborted = clean_offsite(load_settings())
    if aborted:
        get_run_logger().info("aborted %d orphan multipart uploads", len(aborted))
    return aborted


@task(name="upload-backups", **TRANSIENT_RETRIES)
def upload_backups(backup_id: str | None) -> list[UploadReport]:
    """Copy one backup, or every backup some offsite target is missing, proven by checksum.

    Retried (and resumed) while every failure is transient; other failures are returned in
    the reports so they are published before the run fails on them.
    """
    settings = load_settings()
    storages = targets(settings)
    if len(storages) < 2:
        raise ConfigError(
            "no offsite target is configured (set AWS_S3_BUCKET, GCS_BUCKET or BACKUP_TARGETS)"
        )
    reports = (
        [copy_offsite(settings, backup_id, storages=storages)]
        if backup_id
        else upload_missing(settings, storages=storages)
    )
    _log(reports)
    error = upload_error(reports)
    if isinstance(error, TransientStorageError):
        raise error
    return reports


def upload_rows(reports: list[UploadReport]) -> list[dict[str, str]]:
    """One row per backup and offsite target: copied, already there or failed (and why)."""
    rows = []
    for r in reports:
        outcomes = [(url, "copied", "") for url in r.copied_to]
        outcomes += [(url, "already there", "") for url in r.already_there]
        outcomes += [(url, "FAILED", why) for url, why in r.failed.items()]
        for url, result, why in outcomes:
            rows.append(
                {"backup": r.backup_id, "from": r.source, "to": url, "result": result, "why": why}
            )
    return rows


@task(name="upload-report")
def report_uploads(reports: list[UploadReport]) -> None:
    """Publish what was copied where (and what failed) as a table artifact."""
    rows = upload_rows(reports)
    copied = sum(1 for row in rows if row["result"] == "copied")
    failed = sum(1 for row in rows if row["result"] == "FAILED")
    create_table_artifact(
        key="upload-report",
        table=rows or [{"backup": "(every backup is already on every offsite target)"}],
        description=f"{copied} copies made, {failed} failed, {len(reports)} backups considered",
    )


@task(name="upload-verdict")
def fail_on_upload_errors(reports: list[UploadReport]) -> None:
    """Fail the run when any copy failed (the report lists which and why)."""
    if error := upload_error(reports):
        raise error
