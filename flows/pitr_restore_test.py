"""Flow ``pitr-restore-test``: prove the newest base backup plus all archived WAL restore, on a
scratch server, and record the recovery time (RTO)."""

from __future__ import annotations

from prefect import flow
from prefect.states import State
from pydantic import Field

from pgkeeper.manifest import RestoreTest
from tasks.inventory import publish_inventory
from tasks.pitr import (
    fail_on_pitr_failure,
    pitr_restore_test,
    publish_archive_status,
    report_pitr_restore_test,
)
from tasks.schedule import missed_run

TIMEOUT_SECONDS = 12 * 3600


@flow(name="pitr-restore-test", timeout_seconds=TIMEOUT_SECONDS)
def pitr_restore_test_flow(
    checks_dir: str | None = Field(
        default=None,
        description="Folder of .sql checks, each must return true (default: BACKUP_CHECKS_DIR).",
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> RestoreTest | State:
    """Restore the newest base backup + WAL on a scratch server, read it back, record the RTO."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    publish_archive_status()  # 1. what the archive holds (window, gaps, lag)
    base_id, result = pitr_restore_test(checks_dir)  # 2. restore, start, read back, stop, record
    report_pitr_restore_test(base_id, result)  # 3. report artifact
    publish_inventory()  # 4. inventory artifact (shows the new restore-test result)
    fail_on_pitr_failure(base_id, result)  # 5. fail the run when it failed
    return result
