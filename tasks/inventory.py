"""Task: publish the backup inventory as a table artifact (``pgkeeper.catalog``)."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from pgkeeper import catalog
from pgkeeper.catalog import Entry
from pgkeeper.inventory import load_inventory
from pgkeeper.manifest import utcnow
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import targets
from tasks.progress import human_size
from tasks.retry import TRANSIENT_RETRIES


def _age(when: datetime, now: datetime) -> str:
    seconds = max(0, int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def inventory_rows(entries: list[Entry], now: datetime) -> list[dict[str, str]]:
    """One row per backup, newest first: what an operator scans for."""
    rows = []
    for entry in entries:
        m = entry.manifest
        verified = {"verified": "yes", "unverified": "no", "corrupt": "FAILED",
                    "restore-failed": "FAILED (restore test)"}[m.state]  # fmt: skip
        test = m.last_restore_test
        tested = "never"
        if test is not None:
            outcome = "passed" if test.ok else "FAILED"
            tested = f"{outcome} {_age(test.at, now)} (restore {test.duration_seconds:.0f}s)"
        rows.append(
            {
                "id": m.id,
                "database": m.database,
                "size": human_size(m.size),
                "age": _age(m.finished_at, now),
                "verified": verified,
                "restore-tested": tested,
                "stored in": ", ".join(entry.locations),
            }
        )
    return rows


def settings_for(database: str | None) -> Settings:
    """The settings a task works with: the process's, or a fleet database's own (its URL and
    overrides from the inventory) when the run names one (``database``: name[@host:port])."""
    settings = load_settings()
    if database is None:
        return settings
    return load_inventory(settings, expand=False).lookup(database).settings


@task(name="inventory", **TRANSIENT_RETRIES)
def publish_inventory() -> int:
    """Publish every stored backup (size, age, verified, restore-tested, where) as a table."""
    entries = catalog.list_all(targets(load_settings()))
    rows = inventory_rows(entries, utcnow())
    total = human_size(sum(e.manifest.size for e in entries))
    create_table_artifact(
        table=rows or [{"id": "(no backups yet)"}],
        key="backup-inventory",
        description=f"{len(rows)} backups, {total} per copy",
    )
    refresh_restore_form(entries)
    return len(rows)


def refresh_restore_form(entries: list[Entry]) -> None:
    """The restore form lists what the inventory lists (``pgkeeper.restore_form``); a failure
    costs only the list, never the run."""
    from pgkeeper import restore_form
    from tasks.alerts import prefect_link

    try:
        restore_form.refresh(prefect_link(), entries)
    except Exception as exc:
        get_run_logger().warning("restore form not refreshed: %s: %s", type(exc).__name__, exc)
