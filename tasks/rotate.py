"""Tasks: apply the retention policy on every target (``pgkeeper.rotate``), publish its plan and
the storage usage, and fail the run when rotation failed somewhere."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from pgkeeper.errors import StorageError
from pgkeeper.fleet import group_policy
from pgkeeper.inventory import configured
from pgkeeper.retention import format_size
from pgkeeper.rotate import RotationReport, policies_from_settings, rotate, usage_report
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from tasks.inventory import settings_for
from tasks.retry import TRANSIENT_RETRIES


@task(name="rotate", **TRANSIENT_RETRIES)
def rotate_backups(
    dry_run: bool = False, only: str | None = None, database: str | None = None
) -> RotationReport:
    """Apply retention on every target (dry run: only plan) and publish the plan as a table;
    ``only`` (database@server): that database alone, as after its backup."""
    settings = settings_for(database)
    storages = targets(settings)
    inventory = configured(settings) if only is None else None
    report = rotate(
        storages, policies_from_settings(settings, storages), dry_run=dry_run, only=only,
        group_policy=group_policy(inventory, storages) if inventory is not None else None,
    )  # fmt: skip
    logger = get_run_logger()
    for line in report.summary().splitlines():
        logger.info("rotation%s: %s", " (dry run)" if dry_run else "", line)
    for warning in report.warnings:
        logger.warning("%s", warning)
    verb = "would delete" if dry_run else "deleted"
    create_table_artifact(
        key="rotation-plan",
        table=report.as_table() or [{"backup": "(no backups yet)"}],
        description=f"{'dry run: ' if dry_run else ''}{verb} {len(report.deleted)} backups; "
        + "; ".join(report.summary().splitlines()),
    )
    return report


@task(name="usage", **TRANSIENT_RETRIES)
def publish_usage() -> int:
    """Publish the storage used per target and in total as a table; return the total bytes."""
    report = usage_report(targets(load_settings()))
    create_table_artifact(
        key="storage-usage",
        table=report.as_table(),
        description=f"{format_size(report.total)} on {len(report.targets)} targets",
    )
    return report.total


@task(name="rotation-verdict")
def fail_on_rotation_errors(report: RotationReport) -> None:
    """Fail the run when rotation failed on any target (what is listed was not lost)."""
    if not report.ok:
        errors = "; ".join(e for t in report.targets for e in t.errors)
        raise StorageError(f"rotation failed: {errors} (the next rotation finishes the work)")
