"""Task: restore a backup into a database (``pgkeeper.restore``), and its report artifact."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pgkeeper.errors import ConfigError
from pgkeeper.postgres import ConnInfo
from pgkeeper.restore import LeaveOut, RestoreResult, restore_backup
from pgkeeper.settings import Settings, load_settings
from tasks.retry import TRANSIENT_RETRIES


def target_url(settings: Settings, target: str | None) -> str | None:
    """The target as a connection string: a database name is taken on the source server.

    A URL is accepted only without a password: flow parameters are stored by Prefect and shown
    in the UI, so credentials come from DATABASE_URL, PGPASSFILE or the worker's environment.
    """
    if not target:
        return None
    if "://" not in target and "=" not in target:
        source = ConnInfo.parse(settings.require_database_url())
        return source.with_dbname(target).conninfo()
    if "password" in ConnInfo.parse(target).params:
        raise ConfigError(
            "the restore target must not contain a password (flow parameters are stored and "
            "shown): give a database name, or a URL without password and use PGPASSFILE"
        )
    return target


@task(name="restore", **TRANSIENT_RETRIES)
def restore_database(
    backup_id: str | None,
    target: str | None,
    confirm: str | None,
    safety_backup: bool,
    no_owner: bool = False,
    no_privileges: bool = False,
) -> RestoreResult:
    """Restore a backup into a scratch database, then swap it in; the target is safe on error."""
    settings = load_settings()
    result = restore_backup(
        settings,
        backup_id,
        target_url(settings, target),
        confirm=confirm or None,
        safety_backup=safety_backup,
        leave_out=LeaveOut(owner=no_owner, privileges=no_privileges),
    )
    get_run_logger().info(
        "restored %s into %s in %.1fs", result.backup_id, result.target, result.duration_seconds
    )
    return result


@task(name="restore-report")
def report_restore(result: RestoreResult) -> None:
    """Publish what was restored where, and the safety backup taken, as a markdown artifact."""
    safety = result.safety_backup_id or "none (the target had no data)"
    create_markdown_artifact(
        key="restore-report",
        description=f"restore of {result.backup_id}",
        markdown="\n".join(
            [
                f"# Restored `{result.backup_id}`",
                "",
                "| | |",
                "|---|---|",
                f"| into | `{result.target}` |",
                f"| replaced an existing database | {'yes' if result.replaced else 'no'} |",
                f"| safety backup of the old data | `{safety}` |",
                f"| read from | `{result.source}` |",
                f"| duration | {result.duration_seconds:.1f} s |",
            ]
        ),
    )
