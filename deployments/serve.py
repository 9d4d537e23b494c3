"""One process serving every pgkeeper deployment (`pgkeeper serve`, `python -m deployments.serve`).

Deployments (see ``deployments.schedules`` for schedules and the missed-run policy):
``backup/backup-{hourly,daily,weekly,monthly,custom}``, ``verify/verify``, ``upload/upload``,
``rotate/rotate``, ``restore/restore``, ``restore-test/restore-test``, ``monitor/monitor``,
``base-backup/base-backup``, ``pitr-restore-test/pitr-restore-test``.
``prefect.yaml`` registers the same flows for workers under the names ``<name>-pool``, so the
two ways of running never overwrite each other's deployments.

Concurrency: every backup deployment (and restore-test, rotate, monitor) has a deployment
concurrency limit of 1 with CANCEL_NEW: a run that comes due while one runs is cancelled, not
queued behind it.
The engine's per-database advisory lock also stops two backups from different deployments.

Schedules: the environment's schedule of a deployment is applied at start only when it changed
since serve last applied it; otherwise the schedule on the server (edited in the UI, with
``pgkeeper schedule set`` or ``PUT /api/schedule``) is kept (``pgkeeper.schedule``).

Shutdown: on SIGTERM or Ctrl-C Prefect's runner cancels in-flight runs: their flow processes
get SIGTERM, which the backup engine turns into cleanup (pg_dump terminated and reaped, the
partial object and backup folder removed, the lock released), and the runs end Cancelled.
Then the deployments are paused, which also deletes their queued scheduled runs, so a later
restart does not replay what came due while it was down; ``serve`` unpauses them on start.
The stop is bounded (``deployments.serving``): with the Prefect server gone it takes at most
about 25 s and says in one line what it could not do.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deployments.schedules import plan
from pgkeeper.errors import PgkeeperError
from pgkeeper.settings import Settings, load_settings

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

    from pgkeeper.prefect_api import PrefectLink

TAGS = ["pgkeeper"]


def build_deployments(
    settings: Settings, kept: Mapping[str, list[Any]] | None = None
) -> list[RunnerDeployment]:
    """Every deployment as a RunnerDeployment; raises ConfigError for a malformed schedule.

    ``kept``: deployment name -> the schedules it keeps from the server instead of the
    environment's (``deployments.schedule_edits.at_start``)."""
    specs = plan(settings)  # validate before importing Prefect: bad config fails fast

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows.backup import backup
    from flows.backup_server import backup_server
    from flows.base_backup import base_backup
    from flows.monitor import monitor
    from flows.pitr_restore_test import pitr_restore_test_flow
    from flows.restore import restore
    from flows.restore_test import restore_test
    from flows.rotate import rotate
    from flows.upload import upload
    from flows.verify import verify

    flows = {
        "backup": backup,
        "verify": verify,
        "upload": upload,
        "rotate": rotate,
        "restore": restore,
        "restore-test": restore_test,
        "monitor": monitor,
        "backup-server": backup_server,
        "base-backup": base_backup,
        "pitr-restore-test": pitr_restore_test_flow,
    }
    one_at_a_time = ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
    )
    deployments = []
    for spec in specs:
        schedule = spec.schedule
        deployments.append(
            flows[spec.flow].to_deployment(
                name=spec.name,
                description=spec.description,
                tags=TAGS,
                schedules=kept[spec.name]
                if kept is not None and spec.name in kept
                else [
                    Cron(
                        schedule.cron,
                        timezone=schedule.timezone,
                        active=schedule.active,
                        parameters=schedule.parameters,
                    )
                ]
                if schedule
                else [],
                concurrency_limit=one_at_a_time if spec.cancel_new_when_busy else None,
            )
        )
    return deployments


def install_alerts(settings: Settings) -> None:
    """``pgkeeper alerts install`` on start (idempotent); a problem is a warning, not a stop:
    without the automations pgkeeper's processes deliver alerts themselves. Without
    BACKUP_NOTIFY_URLS it installs only the detection of unresponsive (crashed) runs."""
    from deployments.alerts import install

    try:
        report = install(settings)
    except PgkeeperError:
        raise  # a malformed BACKUP_NOTIFY_URLS: one line at start, like a bad schedule
    except Exception as exc:
        print(f"warning: alert automations not installed: {type(exc).__name__}", file=sys.stderr)
        return
    for line in report.lines:
        print(f"alerts: {line}", file=sys.stderr)
    if not report.ok and settings.backup_notify_urls is not None:
        print(f"warning: {report.problem}", file=sys.stderr)


def refresh_restore_form(settings: Settings, link: PrefectLink) -> None:
    """The restore form lists the newest verified backups (``pgkeeper.restore_form``); a
    storage target or server that fails only costs the list, with a warning."""
    from pgkeeper import catalog, restore_form
    from pgkeeper.storage import targets

    try:
        restore_form.refresh(link, catalog.list_all(targets(settings)))
    except PgkeeperError as exc:
        print(f"warning: the restore form's list of backups is not refreshed: {exc}",
              file=sys.stderr)  # fmt: skip


def serve_all(settings: Settings) -> None:
    """Register every deployment and run their scheduled and manual runs until stopped."""
    from deployments import schedule_edits, serving
    from pgkeeper.schedule import write_record

    link = serving.prefect_link()
    # The schedule rule (pgkeeper.schedule) needs a server that outlives this process: without
    # PREFECT_API_URL Prefect starts a temporary one, and the environment's schedules apply.
    start = schedule_edits.at_start(settings, link) if link.api_url else None
    deployments = build_deployments(settings, start.kept if start else None)
    install_alerts(settings)

    def registered() -> None:
        if start is not None:
            write_record(link, start.record)
            for line in start.lines:
                print(line, flush=True)
            refresh_restore_form(settings, link)

    serving.run(deployments, after_registration=registered)


def main() -> int:
    """Entry point: serve until SIGTERM/Ctrl-C; a bad setting is one line and exit code 2."""
    try:
        serve_all(load_settings())
    except PgkeeperError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
