"""Flow ``upload``: copy backups to the offsite targets, prove every copy, say what went where."""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from pgkeeper.upload import UploadReport
from tasks.alerts import outcome_hooks
from tasks.inventory import publish_inventory
from tasks.pitr import upload_wal
from tasks.upload import (
    clean_offsite_uploads,
    fail_on_upload_errors,
    report_uploads,
    upload_backups,
)

TIMEOUT_SECONDS = 6 * 3600


@flow(name="upload", **outcome_hooks("upload"), timeout_seconds=TIMEOUT_SECONDS)
def upload(
    backup_id: str | None = Field(
        default=None,
        description="The backup to copy (default: every backup some offsite target is missing).",
    ),
) -> list[UploadReport]:
    """Copy backups (and archived WAL) to every offsite target, proven by checksum."""
    clean_offsite_uploads()  # 1. abort multipart uploads orphaned by killed uploaders
    reports = upload_backups(backup_id)  # 2. copy and prove (retried while failures are transient)
    report_uploads(reports)  # 3. artifact: what went where
    publish_inventory()  # 4. inventory artifact (where each backup is stored)
    if backup_id is None:
        upload_wal()  # 5. archived WAL the offsite targets lack (PITR; none: a no-op)
    fail_on_upload_errors(reports)  # 6. fail the run when any copy failed
    return reports
