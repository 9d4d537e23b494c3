"""Tasks: check the health of the backups (``pgkeeper.monitor``), publish it, fail on a problem.

The backup interval comes from the deployments' own schedule plan (``BACKUP_SCHEDULE``), so the
monitor expects backups exactly as often as they are scheduled.
"""

from __future__ import annotations

from datetime import timedelta

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from deployments import schedules
from pgkeeper import monitor
from pgkeeper.errors import PgkeeperError
from pgkeeper.monitor import Check, Expectations, MonitorReport
from pgkeeper.postgres import ConnInfo
from pgkeeper.rotate import policies_from_settings
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import Storage, targets
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
) -> MonitorReport:
    """Check freshness, verification, restore tests, offsite copies, usage and listing."""
    settings = load_settings()
    storages = targets(settings)
    database = server = None
    if settings.database_url is not None and settings.database_url.get_secret_value():
        source = ConnInfo.parse(settings.require_database_url())
        database, server = source.dbname, source.server
    policies = policies_from_settings(settings, storages)  # per-target usage thresholds
    expect = Expectations(
        backup_interval=interval,
        grace=timedelta(minutes=grace_minutes),
        restore_test_max_age=(
            timedelta(days=restore_test_max_age_days) if restore_test_max_age_days > 0 else None
        ),
        verification=settings.backup_verify != "off",
    )
    report = monitor.monitor(
        storages,
        expect,
        database=database,
        server=server,
        usage_warn_bytes={url: p.usage_warn_bytes for url, p in policies.items()},
    )
    report.checks.extend(_archive_checks(settings, storages))  # point-in-time recovery
    logger = get_run_logger()
    for check in report.checks:
        log = logger.info if check.ok else logger.error
        log("%s: %s: %s", check.name, check.status, check.detail)
    return report


def _archive_checks(settings: Settings, storages: list[Storage]) -> list[Check]:
    """The WAL archive's checks when this deployment archives WAL (none otherwise)."""
    from pgkeeper.pitr_status import archive_checks

    try:
        return list(archive_checks(settings, storages))
    except PgkeeperError as exc:
        return [Check("archive", "failed", f"cannot check the WAL archive: {exc.message}")]


def report_markdown(report: MonitorReport) -> str:
    """The status page: a verdict line, then every check with its detail."""
    verdict = "OK" if report.ok else f"FAILING ({len(report.failed)} of {len(report.checks)})"
    lines = [
        f"# Backup health: {verdict}",
        "",
        f"{report.subject}, checked at {report.now.isoformat(timespec='seconds')}",
        "",
        "| check | status | detail |",
        "|---|---|---|",
    ]
    for check in report.checks:
        status = check.status if check.ok else "**FAILED**"
        detail = check.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {check.name} | {status} | {detail} |")
    return "\n".join(lines)


@task(name="monitor-report")
def report_health(report: MonitorReport) -> None:
    """Publish the health of the backups, check by check, as a markdown artifact."""
    create_markdown_artifact(
        key="monitor-report",
        markdown=report_markdown(report),
        description=report.summary(),
    )


@task(name="monitor-verdict")
def fail_on_alarm(report: MonitorReport) -> None:
    """Fail the run when any check failed, so a Prefect automation can notify someone."""
    monitor.raise_for_failure(report)
