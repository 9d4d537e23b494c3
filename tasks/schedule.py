"""What a flow run knows about its schedule: whether it was missed, and what triggered it.

Prefect queues every scheduled run that came due while nothing was picking runs up (a stopped
``serve`` or worker) and, once back, starts them all, oldest first (Prefect has no "skip late
runs" option: PrefectHQ/prefect#15886). Schedules therefore pass ``max_lateness_minutes`` (one
period, see ``deployments.schedules``) and a run that starts later than that is skipped here,
with a log line, before it does any work.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import get_run_logger, runtime
from prefect.client.orchestration import get_client
from prefect.states import Completed, State

from deployments.schedules import is_missed


def missed_run(max_lateness_minutes: int | None) -> State | None:
    """A Completed "Skipped" state when this run is a missed one, else None (run it)."""
    if max_lateness_minutes is None:
        return None
    scheduled = runtime.flow_run.scheduled_start_time
    now = datetime.now(UTC)
    if not is_missed(scheduled, now, timedelta(minutes=max_lateness_minutes)):
        return None
    late = now - scheduled
    message = (
        f"skipped: scheduled for {scheduled.isoformat(timespec='seconds')}, started "
        f"{int(late.total_seconds() // 60)} minutes late (more than one period, "
        f"{max_lateness_minutes} minutes): a newer run of this schedule does the work"
    )
    get_run_logger().warning(message)
    return Completed(name="Skipped", message=message)


def run_trigger() -> str:
    """What started this run, for the manifest: ``schedule:<deployment>`` for scheduled runs,
    ``prefect:<deployment>`` for runs started by hand from a deployment, else ``prefect``."""
    deployment = runtime.deployment.name
    if not deployment:
        return "prefect"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(runtime.flow_run.id)
    return f"{'schedule' if flow_run.auto_scheduled else 'prefect'}:{deployment}"
