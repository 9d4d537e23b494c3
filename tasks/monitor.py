"""Tasks: check the health of the backups (``pgkeeper.monitor``), publish it, fail on a problem.

The backup interval comes from the deployments' own schedule plan (``BACKUP_SCHEDULE``), so the
monitor expects backups exactly as often as they are scheduled.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from deployments import schedules
from pgkeeper import alerts, monitor
from pgkeeper.monitor import MonitorReport
from pgkeeper.pitr_status import archive_report
from pgkeeper.postgres import ConnInfo
from pgkeeper.retention import parse_duration
from pgkeeper.rotate import policies_from_settings
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import targets
from tasks.alerts import prefect_link
from tasks.retry import TRANSIENT_RETRIES


@task(name="backup-interval")
def backup_interval() -> timedelta | None:
    """The longest time the active backup schedules (BACKUP_SCHEDULE) leave between backups."""
    interval = schedules.backup_interval(load_settings())
    get_run_logger().info("backups are due at least every %s", interval or "(never: none active)")
    return interval


@task(name="monitor", **TRANSIENT_RETRIES)
def check_health(
    interval: timedelta | None, grace_minutes: int, restore_test_max_age_days: int
) -> list[MonitorReport]:
    """Check freshness, verification, size, restore tests, offsite copies, usage, quota, disk,
    listing and the scheduler: one report per database, one for the targets and scheduler."""
    settings = load_settings()
    storages = targets(settings)
    database = server = None
    if settings.database_url is not None and settings.database_url.get_secret_value():
        source = ConnInfo.parse(settings.require_database_url())
        database, server = source.dbname, source.server
    policies = policies_from_settings(settings, storages)  # per-target usage thresholds
    expect = monitor.expectations(
        settings,
        interval,
        grace=timedelta(minutes=grace_minutes),
        restore_test_max_age=(
            timedelta(days=restore_test_max_age_days) if restore_test_max_age_days > 0 else None
        ),
    )
    link = prefect_link()
    silence = parse_duration(settings.backup_scheduler_max_silence, "BACKUP_SCHEDULER_MAX_SILENCE")
    scheduler = (
        link.scheduler_check(silence.total_seconds()) if settings.backup_enabled else None
    )
    def expect_of(own: Settings) -> monitor.Expectations:  # a fleet database's own schedule
        own_interval = None if own.backup_max_age else schedules.backup_interval(own)
        return replace(
            monitor.expectations(own, own_interval),
            grace=expect.grace, restore_test_max_age=expect.restore_test_max_age,
        )  # fmt: skip

    fleet, unreachable = monitor.fleet_scope(settings, expect_of)
    reports = monitor.monitor_each(
        storages,
        expect,
        database=database,
        server=server,
        usage_warn_bytes={url: p.usage_warn_bytes for url, p in policies.items()},
        scheduler=scheduler,
        fleet=fleet,
        unreachable=unreachable,
    )
    archive = archive_report(settings, storages)  # point-in-time recovery, when archiving
    if archive is not None:
        reports.append(archive)
    logger = get_run_logger()
    for report in reports:
        for check in report.checks:
            log = logger.info if check.ok else logger.error
            log("%s: %s: %s: %s", report.subject, check.name, check.status, check.detail)
    return reports


@task(name="alerts")
def tell_health(reports: list[MonitorReport]) -> None:
    """Tell new problems and resolved ones, once each (pgkeeper.alerts.report_health)."""
    settings = load_settings()
    link = prefect_link()
    alerts.report_health(
        settings,
        targets(settings)[0],
        reports,
        link=link.run_url(str(runtime.flow_run.id)),
        route=alerts.Route.of(settings, link),
    )


def report_markdown(reports: list[MonitorReport]) -> str:
    """The status page: a verdict line, then every check of every subject with its detail."""
    failed = sum(len(r.failed) for r in reports)
    checks = sum(len(r.checks) for r in reports)
    verdict = "OK" if not failed else f"FAILING ({failed} of {checks})"
    now = reports[0].now.isoformat(timespec="seconds") if reports else ""
    lines = [
        f"# Backup health: {verdict}",
        "",
        f"checked at {now}",
        "",
        "| subject | check | status | detail |",
        "|---|---|---|---|",
    ]
    for report in reports:
        for check in report.checks:
            status = check.status if check.ok else "**FAILED**"
            detail = check.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {report.subject} | {check.name} | {status} | {detail} |")
    return "\n".join(lines)


@task(name="monitor-report")
def report_health(reports: list[MonitorReport]) -> None:
    """Publish the health of the backups, check by check, as a markdown artifact."""
    failed = [r.summary() for r in reports if not r.ok]
    create_markdown_artifact(
        key="monitor-report",
        markdown=report_markdown(reports),
        description="; ".join(failed) or "all checks passed",
    )


@task(name="monitor-verdict")
def fail_on_alarm(reports: list[MonitorReport]) -> None:
    """Fail the run when any check failed, so the UI shows it (alerts were told already)."""
    for report in reports:
        monitor.raise_for_failure(report)
