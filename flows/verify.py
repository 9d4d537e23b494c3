"""Flow ``verify``: verify one backup by id, or every backup not verified within a window."""

from __future__ import annotations

from typing import Literal

from prefect import flow, unmapped
from prefect.futures import PrefectFutureList
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from tasks.alerts import outcome_hooks
from tasks.inventory import publish_inventory
from tasks.schedule import missed_run
from tasks.verify import backups_to_verify, verify_backup

TIMEOUT_SECONDS = 6 * 3600


@flow(
    **outcome_hooks("verify"),
    name="verify",
    timeout_seconds=TIMEOUT_SECONDS,
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # reading storage: two at a time
)
def verify(
    backup_id: str | None = Field(
        default=None, description="The backup to verify (default: every backup that is due)."
    ),
    older_than_hours: int = Field(
        default=168, description="Without an id: verify backups not verified for this long."
    ),
    level: Literal["full", "quick"] = Field(
        default="full", description="full: decode everything; quick: checksum and structure."
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> list[str] | State | PrefectFutureList:
    """Verify stored backups: objects, checksums, compression and dump structure."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    ids = backups_to_verify(backup_id, older_than_hours)  # 1. which backups
    results = verify_backup.map(ids, level=unmapped(level))  # 2. verify each
    results.wait()
    publish_inventory()  # 3. inventory artifact
    return results  # the run fails if any verification failed
