"""Tasks: verify stored backups (``pgkeeper.verify``) and pick the ones due for it."""

from __future__ import annotations

from datetime import timedelta

from prefect import get_run_logger, task

from pgkeeper import catalog
from pgkeeper.manifest import Manifest, utcnow
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from pgkeeper.verify import verify_backup as verify_stored
from tasks.inventory import settings_for
from tasks.retry import TRANSIENT_RETRIES


@task(name="verify", **TRANSIENT_RETRIES)
def verify_backup(
    backup_id: str, level: str = "full", database: str | None = None
) -> Manifest | None:
    """Check a stored backup's objects, checksum, compression and dump structure."""
    if level == "off":
        get_run_logger().info("verification of %s is off (BACKUP_VERIFY=off)", backup_id)
        return None
    manifest = verify_stored(settings_for(database), backup_id, level=level)
    get_run_logger().info("backup %s passed %s verification", backup_id, level)
    return manifest


@task(name="backups-to-verify", **TRANSIENT_RETRIES)
def backups_to_verify(backup_id: str | None, older_than_hours: int) -> list[str]:
    """The backup asked for, else every one never verified or not within the window."""
    if backup_id:
        return [backup_id]
    cutoff = utcnow() - timedelta(hours=older_than_hours)
    entries = catalog.list_all(targets(load_settings()))
    due = [
        e.id
        for e in entries
        if e.manifest.verification is None or e.manifest.verification.at < cutoff
    ]
    get_run_logger().info(
        "%d of %d backups not verified in the last %d hours", len(due), len(entries),
        older_than_hours,
    )  # fmt: skip
    return due


@task(name="verify-level")
def default_verify_level(level: str | None, database: str | None = None) -> str:
    """The verification level to use: the one asked for, else BACKUP_VERIFY."""
    return level or settings_for(database).backup_verify
