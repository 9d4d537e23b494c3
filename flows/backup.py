"""Flow ``backup``: the steps of ``pgkeeper.procedure`` as retryable tasks: dump, verify,
copy offsite, rotate, publish the inventory.

Rotation always has a policy (``BACKUP_MAX_BACKUPS`` defaults to 30), so it runs after every
backup unless the run's ``rotate`` parameter is off. An upload or rotation that failed fails
the run only at the end, after the inventory is published and that step's alert is told: the
backup itself is complete and counts as a success (as with the CLI and the API).
"""

from __future__ import annotations

from typing import Literal

from prefect import allow_failure, flow
from prefect.states import State
from pydantic import Field

from tasks.alerts import outcome_hooks
from tasks.backup import backup_database, finish_backup
from tasks.fleet import fan_out, plan_run
from tasks.inventory import publish_inventory
from tasks.rotate import rotate_backups
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
    schema_only: bool = Field(default=False, description="Only the schema (no rows)."),
    data_only: bool = Field(default=False, description="Only the data (no schema)."),
    tables: list[str] | None = Field(
        default=None,
        description="Only tables matching these patterns (pg_dump -t: 'public.orders', 'shop.*').",
    ),
    exclude_tables: list[str] | None = Field(
        default=None, description="Leave out tables matching these patterns (-T)."
    ),
    rotate: bool = Field(
        default=True, description="Apply the retention policy after the backup (rotate)."
    ),
    database: str | None = Field(
        default=None,
        description="One database of the inventory (name or name@host:port); default: all "
        "of them whose schedule this run is (a fleet run), or DATABASE_URL's.",
    ),
    schedule: str | None = Field(
        default=None, description="The schedule this run is (set by schedules: daily, a cron)."
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> str | int | State:
    """Back up the database (or the fleet: a run per server, a task run per database), verify,
    copy offsite, rotate, publish the inventory."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    covered = plan_run(database, schedule)  # 1. one database, or the fleet's
    if covered.fleet:  # 2. the fleet: each server's share on whatever worker takes it
        return fan_out(covered, run_trigger(), verify, rotate)
    db = covered.database
    manifest = backup_database(  # 2. dump
        name, format, compression, run_trigger(), schema_only, data_only, tables,
        exclude_tables, db,
    )  # fmt: skip
    verify_backup(manifest.id, default_verify_level(verify, db), db)  # 3. verify the copy
    uploaded = upload_backup(manifest.id, db, return_state=True)  # 4. offsite (failure: 7)
    group = f"{manifest.database}@{manifest.server}"  # 5. this database's retention
    rotation = rotate_backups(only=group, database=db, return_state=True) if rotate else None
    publish_inventory()  # 6. inventory artifact
    return finish_backup(  # 7. tell the outcomes of 4 and 5; fail the run if either failed
        manifest.id, allow_failure(uploaded), allow_failure(rotation) if rotation else None, db
    )
