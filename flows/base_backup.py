"""Flow ``base-backup``: a base backup of the whole cluster for point-in-time recovery,
verified, copied offsite with the WAL, rotated (old base backups and the WAL only they need),
and the archive's recoverable window published."""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.states import State
from pydantic import Field

from tasks.inventory import publish_inventory
from tasks.pitr import publish_archive_status, take_base_backup, upload_wal
from tasks.rotate import fail_on_rotation_errors, rotate_backups
from tasks.schedule import missed_run, run_trigger
from tasks.upload import upload_backup
from tasks.verify import default_verify_level, verify_backup

TIMEOUT_SECONDS = 12 * 3600


@flow(name="base-backup", timeout_seconds=TIMEOUT_SECONDS)
def base_backup(
    name: str | None = Field(
        default=None, description="Base backup name, the start of its id (BACKUP_BASE_NAME)."
    ),
    verify: Literal["full", "quick", "off"] | None = Field(
        default=None, description="Verification after the backup (default: BACKUP_VERIFY)."
    ),
    rotate: bool = Field(
        default=True, description="Apply retention after the backup (base backups and WAL)."
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> str | State:
    """Base backup of the cluster, verify, copy it and the WAL offsite, rotate, publish."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    manifest = take_base_backup(name, run_trigger())  # 1. pg_basebackup, checked, WAL archived
    verify_backup(manifest.id, default_verify_level(verify))  # 2. verify the stored copy
    upload_backup(manifest.id)  # 3. copy it to the offsite targets
    upload_wal()  # 4. and the WAL they lack
    rotation = rotate_backups() if rotate else None  # 5. retention: base backups, then WAL
    publish_archive_status()  # 6. recoverable window, gaps, lag
    publish_inventory()  # 7. inventory artifact
    if rotation is not None:
        fail_on_rotation_errors(rotation)  # 8. fail the run when rotation failed on a target
    return manifest.id
