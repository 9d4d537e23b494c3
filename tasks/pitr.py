"""Tasks of point-in-time recovery: a base backup (``pgkeeper.basebackup``), WAL copies to
the offsite targets, the archive's status as an artifact, and the PITR restore test."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pgkeeper import wal
from pgkeeper.basebackup import run_base_backup
from pgkeeper.errors import StorageError
from pgkeeper.manifest import Manifest, RestoreTest
from pgkeeper.pitr_status import archive_status
from pgkeeper.pitr_test import run_pitr_restore_test
from pgkeeper.restore_test import raise_for_failure
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from tasks.progress import ProgressArtifact
from tasks.restore_test import report_markdown
from tasks.retry import TRANSIENT_RETRIES


@task(name="base-backup", **TRANSIENT_RETRIES)
def take_base_backup(name: str | None, trigger: str) -> Manifest:
    """Stream pg_basebackup of the whole cluster to the primary target; check its manifest."""
    settings = load_settings()
    with ProgressArtifact("base-backup-progress", "streamed", None) as progress:
        manifest = run_base_backup(
            settings, name=name, trigger=trigger, flow_run_id=runtime.flow_run.id,
            progress=progress,
        )  # fmt: skip
    base = manifest.base
    assert base is not None  # noqa: S101 - run_base_backup records it
    get_run_logger().info(
        "base backup %s: %d bytes, timeline %d, WAL %s .. %s", manifest.id, manifest.size,
        base.timeline, base.start_lsn, base.stop_lsn,
    )  # fmt: skip
    return manifest


@task(name="upload-wal", **TRANSIENT_RETRIES)
def upload_wal() -> dict[str, int]:
    """Copy archived WAL the offsite targets lack (the pusher copies as it goes: catch-up)."""
    report = wal.upload_missing(targets(load_settings()))
    logger = get_run_logger()
    for url, count in report.copied.items():
        logger.info("copied %d WAL files to %s", count, url)
    if report.failed:
        raise StorageError(
            "WAL upload failed: " + "; ".join(f"{u}: {w}" for u, w in report.failed.items())
        )
    return report.copied


@task(name="archive-status", **TRANSIENT_RETRIES)
def publish_archive_status() -> bool:
    """Publish the recoverable window per timeline, gaps and archive lag as a table."""
    settings = load_settings()
    report = archive_status(settings, targets(settings))
    create_table_artifact(
        key="pitr-archive",
        table=report.as_table() or [{"system": "(no WAL archive yet)"}],
        description=("archive OK" if report.ok else "ARCHIVE PROBLEM: " + report.verdict())
        + ("; " + "; ".join(report.notes) if report.notes else ""),
    )
    for problem in report.problems:
        get_run_logger().error("%s", problem)
    return report.ok


@task(name="pitr-restore-test", **TRANSIENT_RETRIES)
def pitr_restore_test(checks_dir: str | None) -> tuple[str, RestoreTest]:
    """Restore the newest base backup and all WAL on a scratch server, read it back, record."""
    settings = load_settings()
    base, result = run_pitr_restore_test(
        settings, targets(settings), Path(checks_dir) if checks_dir else None
    )
    get_run_logger().info(
        "PITR restore test of %s %s: recovered in %.1fs (RTO), %d tables read",
        base.id, "passed" if result.ok else "FAILED", result.duration_seconds,
        result.tables_compared,
    )  # fmt: skip
    return base.id, result


@task(name="pitr-restore-test-report")
def report_pitr_restore_test(base_id: str, result: RestoreTest) -> None:
    """Publish the PITR restore test's report (RTO, tables read, checks) as markdown."""
    create_markdown_artifact(
        key="pitr-restore-test-report",
        markdown=report_markdown(base_id, result).replace("# Restore test", "# PITR restore test"),
        description=f"PITR restore test of {base_id}: {'passed' if result.ok else 'FAILED'}",
    )


@task(name="pitr-restore-test-verdict")
def fail_on_pitr_failure(base_id: str, result: RestoreTest) -> None:
    """Fail the run when the PITR restore test failed."""
    raise_for_failure(result, base_id)
