"""Flow ``upload``: copy backups to the offsite targets, prove every copy, say what went where."""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from pgkeeper.upload import UploadReport
from tasks.alerts import outcome_hooks
from tasks.inventory import publish_inventory
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
    """Copy backups to every offsite target (S3, GCS, folders), proven by checksum."""
    clean_offsite_uploads()  # 1. abort multipart uploads orphaned by killed uploaders
    reports = upload_backups(backup_id)  # 2. copy and prove (retried while failures are transient)
    report_uploads(reports)  # 3. artifact: what went where
    publish_inventory()  # 4. inventory artifact (where each backup is stored)
    fail_on_upload_errors(reports)  # 5. fail the run when any copy failed
    return reports
