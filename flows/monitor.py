"""Flow ``monitor``: check that backups are fresh, verified, restore-tested and offsite, that
storage and the scheduler are fine; tell new and resolved problems once (``pgkeeper.alerts``),
then fail the run while a problem lasts, so the UI shows it."""

from __future__ import annotations

from prefect import flow
from prefect.states import State
from pydantic import Field

from pgkeeper.monitor import MonitorReport
from tasks.monitor import backup_interval, check_health, fail_on_alarm, report_health, tell_health
from tasks.schedule import missed_run

TIMEOUT_SECONDS = 20 * 60


@flow(name="monitor", timeout_seconds=TIMEOUT_SECONDS)
def monitor(
    grace_minutes: int = Field(
        default=30,
        ge=0,
        description=(
            "Slack after a backup is due, and time a new backup may stay unverified or not "
            "yet offsite (cover your backup + verify + upload duration)."
        ),
    ),
    restore_test_max_age_days: int = Field(
        default=14, ge=0, description="Fail when no restore test passed this recently (0: off)."
    ),
    max_lateness_minutes: int | None = Field(
        default=None,
        description="Skip the run if it starts this late (set by schedules to one period).",
    ),
) -> list[MonitorReport] | State:
    """Check backup freshness, verification, restore tests, offsite copies and storage usage."""
    if skipped := missed_run(max_lateness_minutes):  # 0. a run missed during downtime: skip
        return skipped
    interval = backup_interval()  # 1. how often backups are due (BACKUP_SCHEDULE)
    reports = check_health(interval, grace_minutes, restore_test_max_age_days)  # 2. every check
    tell_health(reports)  # 3. alerts: new problems and resolved ones, once each
    report_health(reports)  # 4. status artifact
    fail_on_alarm(reports)  # 5. fail the run while any check fails
    return reports
