"""Task: copy a backup to every offsite target (``pgkeeper.upload``)."""

from __future__ import annotations

from prefect import get_run_logger, task

from pgkeeper.errors import StorageError
from pgkeeper.settings import load_settings
from pgkeeper.upload import upload_backup as copy_offsite
from tasks.retry import TRANSIENT_RETRIES


@task(name="upload", **TRANSIENT_RETRIES)
def upload_backup(backup_id: str) -> list[str]:
    """Copy the backup to every offsite target that lacks it, proven by checksum."""
    report = copy_offsite(load_settings(), backup_id)
    logger = get_run_logger()
    for url in report.copied_to:
        logger.info("uploaded %s to %s", backup_id, url)
    if report.failed:
        # The core reports per-target failures as text, so their kind is lost here: they fail
        # the run without retries (the next backup's upload resumes what is missing).
        failures = "; ".join(f"{url}: {why}" for url, why in report.failed.items())
        raise StorageError(f"upload of {backup_id} failed for {failures}")
    return report.copied_to + report.already_there
