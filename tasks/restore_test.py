"""Tasks: restore-test a backup on staging (``pgkeeper.restore_test``) and report the result."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pgkeeper import restore_test
from pgkeeper.manifest import RestoreTest
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from tasks.retry import TRANSIENT_RETRIES


@task(name="choose-backup", **TRANSIENT_RETRIES)
def choose_backup(backup_id: str | None) -> str:
    """The backup to test: the one asked for, else the database's newest not known to be bad."""
    settings = load_settings()
    manifest, storage = restore_test.choose_backup(settings, targets(settings), backup_id)
    get_run_logger().info("restore-testing %s from %s", manifest.id, storage.url)
    return manifest.id


@task(name="restore-test", **TRANSIENT_RETRIES)
def restore_test_backup(backup_id: str, checks_dir: str | None) -> RestoreTest:
    """Restore into a scratch database, compare row counts, run the checks, drop, record."""
    result = restore_test.run_restore_test(
        load_settings(), backup_id, checks_dir=Path(checks_dir) if checks_dir else None
    )
    logger = get_run_logger()
    logger.info(
        "restore-test of %s %s: restore took %.1fs, %d tables compared, %d mismatches",
        backup_id, "passed" if result.ok else "FAILED", result.duration_seconds,
        result.tables_compared, len(result.mismatches),
    )  # fmt: skip
    if result.untested_note:
        logger.warning("%s (%s)", result.untested_note, restore_test.GLOBALS_ADVICE)
    return result


def report_markdown(backup_id: str, result: RestoreTest) -> str:
    """The restore-test report: verdict, RTO, tables compared, mismatches, checks."""
    lines = [
        f"# Restore test of `{backup_id}`: {'PASSED' if result.ok else 'FAILED'}",
        "",
        f"- restore duration (RTO): **{result.duration_seconds:.1f} s** on `{result.server}`",
        f"- tables compared: **{result.tables_compared}**",
        f"- mismatches: **{len(result.mismatches)}**",
        f"- tested at: {result.at.isoformat(timespec='seconds')}",
    ]
    if result.untested_note:
        lines.append(f"- **{result.untested_note}** ({restore_test.GLOBALS_ADVICE})")
    if result.mismatches:
        lines += ["", "## Mismatches", ""] + [f"- {m}" for m in result.mismatches]
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for check in result.checks:
        detail = check.detail.replace("|", "\\|").replace("\n", " ")
        verdict = "not tested" if check.skipped else "ok" if check.ok else "**FAILED**"
        lines.append(f"| {check.name} | {verdict} | {detail} |")
    return "\n".join(lines)


@task(name="restore-test-report")
def report_restore_test(backup_id: str, result: RestoreTest) -> None:
    """Publish the restore-test report (tables compared, mismatches, duration) as markdown."""
    create_markdown_artifact(
        key="restore-test-report",
        markdown=report_markdown(backup_id, result),
        description=f"restore test of {backup_id}: {'passed' if result.ok else 'FAILED'}",
    )


@task(name="restore-test-verdict")
def fail_on_mismatch(backup_id: str, result: RestoreTest) -> None:
    """Fail the run when the restore test found any mismatch or failed check."""
    restore_test.raise_for_failure(result, backup_id)
