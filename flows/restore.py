"""Flow ``restore``: restore a backup; the form's defaults are the safe choice."""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from pgkeeper import restore_form
from pgkeeper.restore import RestoreResult
from tasks.restore import report_restore, restore_database

TIMEOUT_SECONDS = 12 * 3600


@flow(name="restore", timeout_seconds=TIMEOUT_SECONDS)
def restore(
    backup_id: str | None = Field(  # serve lists the newest backups here (restore_form)
        default=None, description=restore_form.BASE
    ),
    target: str | None = Field(
        default=None,
        description=(
            "Database name on the source server to restore into (default: a NEW database "
            "<db>_restored_<time>). A URL is allowed without password."
        ),
    ),
    confirm: str | None = Field(
        default=None,
        description="Only to replace a database that has data: type its name here.",
    ),
    safety_backup: bool = Field(default=True, description="Back up the data being replaced first."),
    no_owner: bool = Field(
        default=False,
        description="Leave the backup's owners out (pg_restore --no-owner): for a server "
        "without its roles.",
    ),
    no_privileges: bool = Field(
        default=False,
        description="Leave the backup's grants out (pg_restore --no-privileges).",
    ),
) -> RestoreResult:
    """Restore a backup into a new database, or over one you name and confirm."""
    result = restore_database(  # 1. restore, swap
        backup_id, target, confirm, safety_backup, no_owner, no_privileges
    )
    report_restore(result)  # 2. report artifact
    return result
