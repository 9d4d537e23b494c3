"""Flow ``backup``: dump the database, verify the copy, copy it offsite, rotate, publish the
inventory.

Rotation always has a policy (``BACKUP_MAX_BACKUPS`` defaults to 30), so it runs after every
backup unless the run's ``rotate`` parameter is off. A rotation that failed on some target
fails the run only after the inventory is published: the backup itself is complete.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.states import State
from pydantic import Field

from tasks.alerts import outcome_hooks
from tasks.backup import backup_database
from tasks.inventory import publish_inventory
from tasks.rotate import fail_on_rotation_errors, rotate_backups
from tasks.schedule import missed_run, run_trigger
from tasks.upload import upload_backup
from tasks.verify import default_verify_level, verify_backup

TIMEOUT_SECONDS = 6 * 3600


@flow(name="backup", **outcome_hooks("backup"), timeout_seconds=TIMEOUT_SECONDS)
def backup(
    name: str | None = Field(
        default=None, description="Backup name, the start of its id (default: BACKUP_NAME)."
    ),
    format: Literal["custom", "plain", "directory"] | None = Field(
        default=None, description="Dump format (default: BACKUP_FORMAT, custom)."
    ),
    compression: Literal["zstd", "gzip", "none"] | None = Field(
        default=None, description="Compression (default: BACKUP_COMPRESSION, zstd)."
    ),
    verify: Literal["full", "quick", "off"] | None = Field(
        default=None, description="Verification after the dump (default: BACKUP_VERIFY, full)."
    ),
    rotate: bool = Field(
        default=True, description="Apply the retention policy after the backup (rotate)."
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> str | State:
    """Back up the database, verify it, copy it offsite, rotate, publish the backup inventory."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    manifest = backup_database(name, format, compression, run_trigger())  # 1. dump
    verify_backup(manifest.id, default_verify_level(verify))  # 2. verify the stored copy
    upload_backup(manifest.id)  # 3. copy to the offsite targets (none configured: no-op)
    rotation = rotate_backups() if rotate else None  # 4. retention, plan artifact
    publish_inventory()  # 5. inventory artifact
    if rotation is not None:
        fail_on_rotation_errors(rotation)  # 6. fail the run when rotation failed on a target
    return manifest.id
