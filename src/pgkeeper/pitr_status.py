"""The WAL archive's state for ``pitr status`` and the monitor: per database system and
timeline the recoverable window (oldest base backup's end .. newest archived WAL), gaps in the
segment sequence, conflicting copies, and what the server says (``pg_stat_archiver``, the WAL
it is writing: the archive lag).

The monitor's checks (``archive_checks``):
  archive          no gap after the oldest base backup's start, no conflict, and a base backup
                   to restore from
  archive-command  ``pg_stat_archiver``: no failure since the last success
  archive-lag      no finished segment waits longer than ``BACKUP_ARCHIVE_MAX_LAG`` (measured
                   from the last successful archiving, so a quiet server is never "behind")
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from pgkeeper import postgres, wal
from pgkeeper.errors import DatabaseError, PgkeeperError
from pgkeeper.manifest import utcnow
from pgkeeper.pitr import base_backups, base_end, base_info, fmt_time
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage


@dataclass
class TimelineStatus:
    """One timeline of one system: its segments, gaps and recoverable window."""

    system_id: int
    timeline: int
    segments: int
    first: str | None
    newest: str | None
    newest_at: datetime | None
    gaps: list[tuple[str, str]]
    base_backups: int
    recoverable_from: datetime | None  # the oldest base backup's end on this timeline

    def row(self, now: datetime) -> dict[str, Any]:
        gaps = ", ".join(a if a == b else f"{a}..{b}" for a, b in self.gaps) or "none"
        return {
            "system": self.system_id,
            "timeline": self.timeline,
            "recoverable from": fmt_time(self.recoverable_from) if self.recoverable_from else "-",
            "newest WAL": self.newest or "-",
            "archived": _ago(now - self.newest_at) if self.newest_at else "-",
            "segments": self.segments,
            "gaps": gaps,
            "base backups": self.base_backups,
        }


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit} ago"
    return f"{seconds}s ago"


@dataclass
class ServerArchiving:
    """What the configured server says of its archiving (pg_stat_archiver and friends)."""

    server: str
    system_id: int
    archive_mode: str
    archive_command: str
    current_wal: str
    last_archived_wal: str | None
    last_archived_at: datetime | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_at: datetime | None
    ready: int | None = None  # WAL files waiting for archive_command (None: not visible)

    @property
    def failing(self) -> bool:
        return self.last_failed_at is not None and (
            self.last_archived_at is None or self.last_failed_at > self.last_archived_at
        )


@dataclass
class StatusReport:
    """``pitr status``: per system and timeline, plus the server's archiver and the lag."""

    now: datetime
    targets: list[str]
    timelines: list[TimelineStatus] = field(default_factory=list)
    server: ServerArchiving | None = None
    conflicts: list[str] = field(default_factory=list)
    lag_segments: int | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        return "; ".join(self.problems)

    def as_table(self) -> list[dict[str, Any]]:
        return [t.row(self.now) for t in self.timelines]

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "ok": self.ok,
            "targets": self.targets,
            "timelines": [
                {**t.__dict__, "newest_at": t.newest_at.isoformat() if t.newest_at else None,
                 "recoverable_from": t.recoverable_from.isoformat() if t.recoverable_from
                 else None}
                for t in self.timelines
            ],
            "server": (
                {k: (v.isoformat() if isinstance(v, datetime) else v)
                 for k, v in self.server.__dict__.items()} if self.server else None
            ),
            "lag_segments": self.lag_segments,
            "conflicts": self.conflicts,
            "problems": self.problems,
            "notes": self.notes,
        }  # fmt: skip


def _archiver_row(connection: Any) -> Any:
    row = connection.execute(
        "SELECT (SELECT system_identifier FROM pg_control_system()),"
        " current_setting('archive_mode'), current_setting('archive_command'),"
        " CASE WHEN pg_is_in_recovery() THEN NULL"
        "      ELSE pg_walfile_name(pg_current_wal_lsn()) END,"
        " last_archived_wal, last_archived_time, failed_count, last_failed_wal,"
        " last_failed_time FROM pg_stat_archiver"
    ).fetchone()
    assert row is not None  # noqa: S101 - pg_stat_archiver has one row
    return row


def server_archiving(settings: Settings) -> ServerArchiving | None:
    """pg_stat_archiver and the archiving settings of DATABASE_URL's server; None when no
    DATABASE_URL is set. Raises the connection errors of ``postgres.connect``."""
    if settings.database_url is None or not settings.database_url.get_secret_value():
        return None
    conn = postgres.ConnInfo.parse(settings.require_database_url())
    with postgres.connect(conn) as connection:
        try:
            row = _archiver_row(connection)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseError(
                f"{conn.server}: cannot read the archiver's state ({first}; grant the "
                "pg_monitor role to DATABASE_URL's user)"
            ) from None
        ready: int | None = None
        try:  # the exact count of waiting files: superusers and pg_monitor members only
            with connection.transaction():
                found = connection.execute(
                    "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
                ).fetchone()
            ready = int(found[0]) if found else None
        except psycopg.Error:
            ready = None
    return ServerArchiving(
        conn.server, int(row[0]), str(row[1]), str(row[2]), str(row[3] or ""),
        row[4], row[5], int(row[6] or 0), row[7], row[8], ready,
    )  # fmt: skip


def archive_status(
    settings: Settings, storages: Sequence[Storage], now: datetime | None = None
) -> StatusReport:
    """The archive on the primary target, per system and timeline; see ``StatusReport``."""
    now = now or utcnow()
    report = StatusReport(now=now, targets=[s.url for s in storages])
    if not storages:
        return report
    primary = storages[0]
    bases = base_backups(storages)
    try:
        report.server = server_archiving(settings)
    except PgkeeperError as exc:
        report.notes.append(f"server not checked: {exc.message}")
    systems = set(wal.list_systems(primary)) | {base_info(m).system_identifier for m in bases}
    if report.server is not None:
        systems.add(report.server.system_id)
    for system_id in sorted(systems):
        archive = wal.list_archive(primary, system_id)
        report.conflicts += [f"{system_id}/{n}" for n in archive.conflicts()]
        mine = [m for m in bases if base_info(m).system_identifier == system_id]
        size = base_info(mine[0]).wal_segment_size if mine else wal.DEFAULT_SEGMENT_SIZE
        oldest_start = min((wal.parse_lsn(base_info(m).start_lsn) for m in mine), default=None)
        for timeline in archive.timelines() or ([base_info(mine[0]).timeline] if mine else []):
            names = archive.segments(timeline)
            newest = archive.newest(timeline)
            on_timeline = [m for m in mine if base_info(m).timeline == timeline]
            floor = wal.segment_of(oldest_start, size) if oldest_start is not None else -1
            relevant = [n for n in names if wal.segment_number(n, size) >= floor]
            holes = wal.gaps(relevant, size)
            report.timelines.append(TimelineStatus(
                system_id=system_id, timeline=timeline, segments=len(names),
                first=names[0] if names else None, newest=newest.name if newest else None,
                newest_at=newest.modified if newest else None, gaps=holes,
                base_backups=len(on_timeline),
                recoverable_from=min((base_end(m) for m in on_timeline), default=None),
            ))  # fmt: skip
            for first, last in holes:
                report.problems.append(
                    f"system {system_id} timeline {timeline}: WAL {first}"
                    + (f" .. {last}" if last != first else "")
                    + " missing (a restore cannot pass it; take a new base backup)"
                )
        if not mine and archive.files:
            report.problems.append(
                f"system {system_id}: WAL is archived but there is no usable base backup to "
                "restore from (run 'pgkeeper base-backup')"
            )
    for name in report.conflicts:
        report.problems.append(f"{name} is archived twice with different contents")
    server = report.server
    if server is not None:
        if server.archive_mode == "off":
            report.problems.append(f"{server.server} does not archive WAL (archive_mode=off)")
        if server.failing:
            report.problems.append(
                f"archive_command fails on {server.server}: {server.failed_count} failures, "
                f"the last for {server.last_failed_wal} at {fmt_time(server.last_failed_at)} "
                "(see the server log)"
            )
        archived = wal.list_archive(primary, server.system_id)
        if server.ready is not None:
            report.lag_segments = server.ready
        elif server.current_wal:  # estimated: finished segments newer than the newest archived
            timeline = wal.timeline_of(server.current_wal)
            latest = archived.newest(timeline)
            current = wal.segment_number(server.current_wal)
            done = wal.segment_number(latest.name) if latest else current - 1
            report.lag_segments = max(0, current - 1 - done)
        if server.current_wal:
            report.notes.append(
                f"{server.server}: writing {server.current_wal}; "
                f"{report.lag_segments} finished segment(s) not archived yet"
            )
    return report


def archive_checks(
    settings: Settings, storages: Sequence[Storage], now: datetime | None = None
) -> list[Any]:
    """The monitor's archive checks (``archive``, ``archive-lag``, ``archive-command``) when
    this deployment archives WAL; an empty list when it does not."""
    from pgkeeper.monitor import Check
    from pgkeeper.retention import parse_duration

    now = now or utcnow()
    report = archive_status(settings, storages, now)
    server = report.server
    # Checked when there is an archive of ours, or the server archives WAL (by any command:
    # a failing archive_command is worth an alert whoever wrote it).
    archiving = bool(report.timelines) or (server is not None and server.archive_mode != "off")
    if not archiving:
        return []
    checks = []
    archive_problems = [p for p in report.problems if "archive_command fails" not in p
                        and "does not archive" not in p]  # fmt: skip
    if archive_problems:
        checks.append(Check("archive", "failed", "; ".join(archive_problems)))
    else:
        windows = [
            f"timeline {t.timeline} from {fmt_time(t.recoverable_from)} to {t.newest}"
            for t in report.timelines if t.recoverable_from
        ]  # fmt: skip
        checks.append(Check("archive", "ok", "; ".join(windows) or "no gaps"))
    max_lag = parse_duration(settings.backup_archive_max_lag, "BACKUP_ARCHIVE_MAX_LAG")
    if server is None:
        checks.append(Check("archive-lag", "skipped", "no DATABASE_URL: the server is not checked"))
        return checks
    if server.failing:
        checks.append(Check(
            "archive-command", "failed",
            f"archive_command fails on {server.server}: {server.failed_count} failures, the last "
            f"for {server.last_failed_wal} at {fmt_time(server.last_failed_at)} (see the "
            "server log)",
        ))  # fmt: skip
    else:
        detail = f"{server.failed_count} failures, none since the last success"
        checks.append(Check("archive-command", "ok", detail))
    waiting = report.lag_segments or 0
    since = now - server.last_archived_at if server.last_archived_at else None
    if server.archive_mode == "off":
        checks.append(Check("archive-lag", "failed", f"{server.server} has archive_mode=off"))
    elif waiting > 0 and (since is None or since > max_lag):
        checks.append(Check(
            "archive-lag", "failed",
            f"{waiting} finished WAL segment(s) not archived; the last archived "
            f"{_ago(since) if since else 'never'} (limit {settings.backup_archive_max_lag})",
        ))  # fmt: skip
    else:
        checks.append(Check("archive-lag", "ok", f"{waiting} finished segment(s) waiting"))
    return checks


def archive_report(settings: Settings, storages: Sequence[Storage]) -> Any:
    """The archive's checks as one monitor report (subject ``the WAL archive (PITR)``), or
    None when this deployment does not archive WAL: what the monitor flow and CLI add to
    their per-database reports. Raises nothing (a failure to check is a failed check)."""
    from pgkeeper.monitor import Check, MonitorReport

    try:
        checks = list(archive_checks(settings, storages))
    except PgkeeperError as exc:
        checks = [Check("archive", "failed", f"cannot check the WAL archive: {exc.message}")]
    if not checks:
        return None
    return MonitorReport(now=utcnow(), subject="the WAL archive (PITR)", checks=checks)
