"""Flow ``restore-test``: prove the newest backup restores and holds the data it should."""

from __future__ import annotations

from prefect import flow
from prefect.states import State
from pydantic import Field

from pgkeeper.manifest import RestoreTest
from tasks.alerts import outcome_hooks
from tasks.inventory import publish_inventory
from tasks.restore_test import (
    choose_backup,
    fail_on_mismatch,
    report_restore_test,
    restore_test_backup,
)
from tasks.schedule import missed_run

TIMEOUT_SECONDS = 12 * 3600


@flow(name="restore-test", **outcome_hooks("restore-test"), timeout_seconds=TIMEOUT_SECONDS)
def restore_test(
    backup_id: str | None = Field(
        default=None, description="The backup to test (default: the newest)."
    ),
    checks_dir: str | None = Field(
        default=None,
        description="Folder of .sql checks, each must return true (default: BACKUP_CHECKS_DIR).",
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> RestoreTest | State:
    """Restore a backup on staging, compare row counts with its snapshot, run the SQL checks."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    chosen = choose_backup(backup_id)  # 1. which backup
    result = restore_test_backup(chosen, checks_dir)  # 2. restore, compare, check, drop, record
    report_restore_test(chosen, result)  # 3. report artifact
    publish_inventory()  # 4. inventory artifact (shows the new restore-test result)
    fail_on_mismatch(chosen, result)  # 5. fail the run on any mismatch
    return result
