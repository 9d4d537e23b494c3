"""Flow ``rotate``: apply the retention policy on every target and show the plan it followed."""

from __future__ import annotations

from prefect import flow
from prefect.states import State
from pydantic import Field

from pgkeeper.rotate import RotationReport
from tasks.alerts import outcome_hooks
from tasks.inventory import publish_inventory
from tasks.rotate import fail_on_rotation_errors, publish_usage, rotate_backups
from tasks.schedule import missed_run

TIMEOUT_SECONDS = 2 * 3600


@flow(name="rotate", **outcome_hooks("rotate"), timeout_seconds=TIMEOUT_SECONDS)
def rotate(
    dry_run: bool = Field(
        default=False, description="Only plan: publish what would be deleted, change nothing."
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> RotationReport | State:
    """Delete the backups the retention policy no longer keeps, on every target."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    report = rotate_backups(dry_run)  # 1. plan and apply per target, plan artifact
    publish_usage()  # 2. storage usage artifact
    publish_inventory()  # 3. inventory artifact (what is left)
    fail_on_rotation_errors(report)  # 4. fail the run when rotation failed on a target
    return report
