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
) -> RestoreResult:
    """Restore a backup into a new database, or over one you name and confirm."""
    result = restore_database(backup_id, target, confirm, safety_backup)  # 1. restore, swap
    report_restore(result)  # 2. report artifact
    return result
