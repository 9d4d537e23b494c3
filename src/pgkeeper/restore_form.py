"""The restore form in the Prefect UI offers the recent backups: the ``backup_id`` field's
description lists the newest verified backups (id, database, age, size).

A description rather than an enum of ids: Prefect enforces a deployment's parameter schema on
every run it creates, so an enum would refuse any id outside the list (an older backup, one
made since the last refresh) from the UI, ``prefect deployment run`` and the HTTP API alike,
while the CLI restores it. The list is a hint that is at worst a little stale; the box still
takes any id, and left empty it means the newest verified backup.

Refreshed when ``serve`` starts and after every backup inventory (the backup, verify, upload,
rotate and restore-test runs publish one), by patching the description into the ``restore``
deployments' parameter schema over Prefect's REST API (``PrefectLink``: no Prefect import).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from pgkeeper.catalog import Entry
from pgkeeper.manifest import utcnow
from pgkeeper.prefect_api import PrefectLink

PARAMETER = "backup_id"
BASE = "The backup to restore (default: the newest verified one)."
SHOWN = 8  # enough to pick "yesterday's" or "before the migration" without scrolling


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def describe(entries: Iterable[Entry], now: datetime | None = None) -> str:
    """The ``backup_id`` description: the base sentence, then the newest verified backups of
    every database, newest first, one per line (ages as of ``now``, which is shown)."""
    now = now or utcnow()
    verified = [e.manifest for e in entries if e.manifest.verified]
    verified.sort(key=lambda m: m.started_at, reverse=True)
    if not verified:
        return f"{BASE} No verified backup yet (as of {now:%Y-%m-%d %H:%M} UTC)."
    lines = [f"{BASE} Newest verified backups (as of {now:%Y-%m-%d %H:%M} UTC):", ""]
    for m in verified[:SHOWN]:
        age = _age((now - m.finished_at).total_seconds())
        lines.append(f"- {m.id} ({m.database}, {age} old, {_size(m.size)})")
    if len(verified) > SHOWN:
        lines.append(f"- ... and {len(verified) - SHOWN} older ('pgkeeper list')")
    return "\n".join(lines)


def refresh(link: PrefectLink, entries: Iterable[Entry], now: datetime | None = None) -> int:
    """Put ``describe(entries)`` on every restore deployment of the server (serve's and
    prefect.yaml's); returns how many were updated. Raises PrefectUnavailableError."""
    text = describe(entries, now)
    updated = 0
    for deployment in link.deployments_of("restore"):
        schema: dict[str, Any] = deployment.get("parameter_openapi_schema") or {}
        field = (schema.get("properties") or {}).get(PARAMETER)
        if not isinstance(field, dict) or field.get("description") == text:
            continue
        field["description"] = text
        link.request("PATCH", f"/deployments/{deployment['id']}",
                     {"parameter_openapi_schema": schema})  # fmt: skip
        updated += 1
    return updated
