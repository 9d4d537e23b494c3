"""Monitor: is the backup system healthy right now? One report of named checks, each ok or not.

The checks, for the configured database (``database``/``server`` as manifests record them):

  freshness     the newest complete backup started no longer ago than the longest interval
                between two scheduled backups x 1.5, plus a grace period
  verified      the newest backup passed verification (or finished within the grace period,
                so verification may still be running)
  restore-test  the newest restore test of any backup passed and is younger than the limit
                (before the first one, the limit counts from the oldest backup)
  offsite       every offsite target holds the newest backup that is not known to be corrupt
                (or it finished within the grace period: the upload may still be running)
  size          the newest backup is not empty, nor smaller than BACKUP_SIZE_DROP_PERCENT below
                the median of the 7 verified backups before it (a truncated table shows here)
  usage         no target holds more than its warning threshold (BACKUP_USAGE_WARN_BYTES or
                a per-target override)
  quota         no target holds more than BACKUP_USAGE_WARN_PERCENT of BACKUP_STORAGE_QUOTA
  disk          every local target's filesystem has room for the next backup (the largest
                of the last 7)
  storage       every target could be listed
  scheduler     something (serve, a worker) polled the backup deployments recently; only
                with a Prefect server (the caller asks it: ``prefect_api.PrefectLink``)

``monitor`` checks one database; ``monitor_each`` checks every database the targets hold, one
report per database (freshness, verified, size, restore-test, offsite) plus one for what they
share (usage, quota, disk, storage, scheduler), so that 200 databases are 200 subjects of
per-database alerts, and one storage outage is one alert.

The checks themselves are pure functions of what the targets hold and the time (``check_*``
and ``evaluate``), so they are unit-tested without storage; ``monitor`` lists the targets and
runs them. The backup interval comes from the caller: schedules live with the deployments
(``deployments.schedules.backup_interval``), and this module knows nothing of Prefect.
A failed check does not raise: ``raise_for_failure`` turns a failing report into an error for
front doors that must fail (the Prefect flow, so an automation can notify someone).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pgkeeper import catalog
from pgkeeper.errors import PgkeeperError, StorageError
from pgkeeper.manifest import Manifest, RestoreTest, utcnow
from pgkeeper.retention import aware, format_size, parse_duration, parse_size, recorded_at
from pgkeeper.rotate import UsageReport, usage_report
from pgkeeper.settings import Settings
from pgkeeper.storage.base import Storage

__all__ = [
    "Check",
    "Expectations",
    "Holdings",
    "MonitorReport",
    "SystemFacts",
    "evaluate",
    "holdings",
    "measure_usage",
    "monitor",
    "monitor_each",
    "raise_for_failure",
    "subject_of",
]

log = logging.getLogger(__name__)

Status = Literal["ok", "failed", "skipped"]

DEFAULT_GRACE = timedelta(minutes=30)
DEFAULT_FACTOR = 1.5
DEFAULT_RESTORE_TEST_MAX_AGE = timedelta(days=14)


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``ok``, ``failed`` or ``skipped`` (nothing to check), and why."""

    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != "failed"


@dataclass(frozen=True)
class Expectations:
    """What a healthy system looks like.

    ``backup_interval`` is the longest time between two scheduled backups (None: no backup
    schedule is active, so freshness is not checked). ``grace`` covers a backup's own duration
    and the verification and upload that follow it. ``restore_test_max_age`` None turns the
    restore-test check off; ``verification`` False means BACKUP_VERIFY=off.
    """

    backup_interval: timedelta | None
    grace: timedelta = DEFAULT_GRACE
    factor: float = DEFAULT_FACTOR
    restore_test_max_age: timedelta | None = DEFAULT_RESTORE_TEST_MAX_AGE
    verification: bool = True
    max_age: timedelta | None = None  # BACKUP_MAX_AGE, or interval + 1 h: wins when set
    size_drop_percent: int = 0  # 0: the size check only looks for empty backups
    quota_bytes: int | None = None
    usage_warn_percent: int = 80

    @property
    def max_backup_age(self) -> timedelta | None:
        """The age past which the newest backup is stale."""
        if self.max_age is not None:
            return self.max_age
        if self.backup_interval is None:
            return None
        return self.backup_interval * self.factor + self.grace


@dataclass
class Holdings:
    """What the targets hold of the monitored database, as the checks see it.

    ``backups`` newest first, each with the record of the first target holding it (the
    primary's when it has one); ``locations`` backup id -> target URLs; ``offsite`` the URLs
    of every target but the first; ``errors`` URL -> why it could not be listed.
    """

    backups: list[Manifest] = field(default_factory=list)
    locations: dict[str, list[str]] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def offsite(self) -> list[str]:
        return self.targets[1:]


@dataclass
class MonitorReport:
    """Every check's outcome; the system is healthy when none failed."""

    now: datetime
    subject: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        """One line: every failed check and why, or that all passed."""
        if self.ok:
            return f"{self.subject}: all {len(self.checks)} checks passed"
        failed = "; ".join(f"{c.name}: {c.detail}" for c in self.failed)
        return f"{self.subject}: {len(self.failed)} of {len(self.checks)} checks failed: {failed}"

    def as_table(self) -> list[dict[str, str]]:
        """One row per check (check, status, detail), for an artifact or a CLI table."""
        return [{"check": c.name, "status": c.status, "detail": c.detail} for c in self.checks]

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "subject": self.subject,
            "ok": self.ok,
            "checks": self.as_table(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


MAX_AGE_SLACK = timedelta(hours=1)  # default BACKUP_MAX_AGE: the schedule's longest gap + 1 h


def expectations(
    settings: Settings,
    backup_interval: timedelta | None,
    grace: timedelta = DEFAULT_GRACE,
    restore_test_max_age: timedelta | Literal["settings"] | None = "settings",
) -> Expectations:
    """Expectations from the settings: BACKUP_MAX_AGE (default: ``backup_interval`` + 1 h,
    25 h for daily), BACKUP_SIZE_DROP_PERCENT, BACKUP_STORAGE_QUOTA and
    BACKUP_USAGE_WARN_PERCENT, BACKUP_RESTORE_TEST_MAX_AGE (``off``: None), BACKUP_VERIFY.

    Raises ConfigError for a malformed duration or size.
    """
    if settings.backup_max_age:
        max_age: timedelta | None = parse_duration(settings.backup_max_age, "BACKUP_MAX_AGE")
    else:
        max_age = backup_interval + MAX_AGE_SLACK if backup_interval is not None else None
    if restore_test_max_age == "settings":
        text = (settings.backup_restore_test_max_age or "off").strip().lower()
        off = text in ("off", "0", "")
        restore_test_max_age = (
            None if off else parse_duration(text, "BACKUP_RESTORE_TEST_MAX_AGE")
        )
    quota = settings.backup_storage_quota
    return Expectations(
        backup_interval=backup_interval,
        grace=grace,
        restore_test_max_age=restore_test_max_age,
        verification=settings.backup_verify != "off",
        max_age=max_age,
        size_drop_percent=settings.backup_size_drop_percent,
        quota_bytes=parse_size(quota, "BACKUP_STORAGE_QUOTA") if quota else None,
        usage_warn_percent=settings.backup_usage_warn_percent,
    )


# -- the checks (pure) --------------------------------------------------------------------------


def _ago(delta: timedelta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            whole, rest = divmod(seconds, size)
            if unit != "m" and rest * 10 >= size and whole < 10:  # 1.5d, not 1d, for short spans
                return f"{seconds / size:.1f}{unit}"
            return f"{whole}{unit}"
    return f"{seconds}s"


def _stamp(when: datetime) -> str:
    return aware(when).isoformat(timespec="minutes")


def _counts_as_fresh(backup: Manifest, expect: Expectations, now: datetime) -> bool:
    """Verified, or (verification on) still within the grace to be verified, or (off) any
    backup not known to be corrupt."""
    if backup.verified:
        return True
    if backup.verification_failed:
        return False
    return not expect.verification or aware(now) - aware(backup.finished_at) <= expect.grace


def check_freshness(backups: Sequence[Manifest], expect: Expectations, now: datetime) -> Check:
    """The newest backup is younger than the schedule's interval x factor + grace."""
    limit = expect.max_backup_age
    if limit is None:
        return Check(
            "freshness",
            "skipped",
            "no backup schedule is active (BACKUP_ENABLED=false?): freshness is not checked",
        )
    if not backups:
        return Check("freshness", "failed", "no complete backup found (run 'pgkeeper backup')")
    good = [b for b in backups if _counts_as_fresh(b, expect, now)]
    if not good:
        return Check(
            "freshness",
            "failed",
            f"no verified backup among the {len(backups)} complete ones: check the backup "
            "runs and verification",
        )
    newest = good[0]
    age = aware(now) - recorded_at(newest)
    if age > limit:
        return Check(
            "freshness",
            "failed",
            f"the newest backup {newest.id} started {_ago(age)} ago, more than "
            f"{_ago(limit)} (backups are due every {_ago(expect.backup_interval or limit)}): "
            "check the backup runs and the scheduler",
        )
    return Check(
        "freshness",
        "ok",
        f"newest backup {newest.id} started {_ago(age)} ago (limit {_ago(limit)})",
    )


def _failed_checks(manifest: Manifest) -> str:
    verification = manifest.verification
    if verification is None:
        return ""
    failed = [c for c in verification.checks if not c.ok]
    return "; ".join(f"{c.name}: {c.detail}" if c.detail else c.name for c in failed)


def _restore_problems(test: RestoreTest) -> str:
    """What a failed restore test found, shortened for one line: mismatches, failed checks."""
    problems = [*test.mismatches, *(c.name for c in test.checks if not c.ok)]
    return "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")


def check_verified(backups: Sequence[Manifest], expect: Expectations, now: datetime) -> Check:
    """The newest backup passed verification (a young one may still be being verified)."""
    if not backups:
        return Check("verified", "skipped", "no backup to check")
    newest = backups[0]
    if newest.restore_failed and newest.last_restore_test is not None:
        why = _restore_problems(newest.last_restore_test)
        return Check(
            "verified",
            "failed",
            f"the newest backup {newest.id} failed its restore test"
            + (f" ({why})" if why else "")
            + ": do not rely on it; look at the restore-test report, then back up again",
        )
    if newest.verification_failed:
        why = _failed_checks(newest)
        return Check(
            "verified",
            "failed",
            f"the newest backup {newest.id} failed verification"
            + (f" ({why})" if why else "")
            + ": do not rely on it; check the database and the storage, then back up again",
        )
    verification = newest.verification
    if verification is not None and verification.ok:
        return Check(
            "verified",
            "ok",
            f"newest backup {newest.id} passed {verification.level} verification "
            f"{_ago(aware(now) - aware(verification.at))} ago",
        )
    if not expect.verification:
        return Check("verified", "skipped", "verification is off (BACKUP_VERIFY=off)")
    since = aware(now) - aware(newest.finished_at)
    if since <= expect.grace:
        return Check(
            "verified",
            "ok",
            f"newest backup {newest.id} finished {_ago(since)} ago; its verification is pending",
        )
    return Check(
        "verified",
        "failed",
        f"the newest backup {newest.id} is not verified {_ago(since)} after it finished "
        f"(run 'pgkeeper verify {newest.id}')",
    )


def _newest_restore_test(backups: Sequence[Manifest]) -> tuple[Manifest, RestoreTest] | None:
    tests = [(m, t) for m in backups for t in m.restore_tests]
    if not tests:
        return None
    return max(tests, key=lambda pair: aware(pair[1].at))


def check_restore_test(backups: Sequence[Manifest], expect: Expectations, now: datetime) -> Check:
    """The newest restore test passed and is younger than the limit."""
    limit = expect.restore_test_max_age
    if limit is None:
        return Check("restore-test", "skipped", "the restore-test check is off")
    if not backups:
        return Check("restore-test", "skipped", "no backup to check")
    if all(m.kind == "globals" for m in backups):
        return Check(
            "restore-test", "skipped", "a server's globals are not restore-tested (roles are "
            "server-wide): the whole-server procedure of docs/disaster-recovery.md proves them"
        )  # fmt: skip
    found = _newest_restore_test(backups)
    if found is None:
        oldest = min(recorded_at(m) for m in backups)
        due = oldest + limit
        if aware(now) <= due:
            return Check(
                "restore-test",
                "ok",
                f"no restore test yet; the first is due by {_stamp(due)} "
                f"({_ago(limit)} after the oldest backup)",
            )
        return Check(
            "restore-test",
            "failed",
            f"no backup has passed a restore test in {_ago(limit)} (none is recorded): "
            "run the restore-test flow",
        )
    manifest, test = found
    age = aware(now) - aware(test.at)
    if not test.ok:
        shown = _restore_problems(test)
        return Check(
            "restore-test",
            "failed",
            f"the newest restore test ({manifest.id}, {_ago(age)} ago) FAILED"
            + (f": {shown}" if shown else "")
            + " (see its restore-test report)",
        )
    if age > limit:
        return Check(
            "restore-test",
            "failed",
            f"the newest restore test ({manifest.id}) passed {_ago(age)} ago, more than "
            f"{_ago(limit)}: run the restore-test flow (is its schedule active?)",
        )
    return Check(
        "restore-test",
        "ok",
        f"{manifest.id} passed a restore test {_ago(age)} ago "
        f"(restore took {test.duration_seconds:.0f}s)"
        + (f"; {test.untested_note}" if test.untested_note else ""),  # staging's gap: no alert
    )


def check_offsite(held: Holdings, expect: Expectations, now: datetime) -> Check:
    """Every offsite target holds the newest backup not known to be corrupt."""
    if not held.offsite:
        return Check("offsite", "skipped", "no offsite target is configured")
    usable = [m for m in held.backups if not m.verification_failed]
    if not usable:
        return Check("offsite", "skipped", "no backup to check")
    newest = usable[0]
    where = held.locations.get(newest.id, [])
    missing = [url for url in held.offsite if url not in where]
    if not missing:
        return Check("offsite", "ok", f"newest backup {newest.id} is on {', '.join(held.offsite)}")
    since = aware(now) - aware(newest.finished_at)
    unlisted = [url for url in missing if url in held.errors]
    if since <= expect.grace and not unlisted:
        return Check(
            "offsite",
            "ok",
            f"newest backup {newest.id} finished {_ago(since)} ago; its upload to "
            f"{', '.join(missing)} is pending",
        )
    parts = [f"{url} could not be listed" for url in unlisted]
    lacking = [url for url in missing if url not in unlisted]
    if lacking:
        parts.append(f"{', '.join(lacking)} lacks the newest backup {newest.id}")
    return Check(
        "offsite",
        "failed",
        "; ".join(parts) + f" (run 'pgkeeper upload {newest.id}' or the upload flow)",
    )


SIZE_HISTORY = 7  # the median of this many verified backups before the newest is "usual"


def _size(backup: Manifest) -> int:
    return backup.raw_size if backup.raw_size is not None else backup.size


def check_size(backups: Sequence[Manifest], expect: Expectations) -> Check:
    """The newest backup is not empty, nor much smaller than the usual size."""
    usable = [m for m in backups if not m.verification_failed]
    if not usable:
        return Check("size", "skipped", "no backup to check")
    newest = usable[0]
    if newest.size == 0 or newest.raw_size == 0:
        return Check(
            "size",
            "failed",
            f"the newest backup {newest.id} is empty (0 bytes): check the database and the "
            "backup's table filters, then back up again",
        )
    history = [_size(m) for m in usable[1:] if m.verified][:SIZE_HISTORY]
    if expect.size_drop_percent <= 0 or not history:
        return Check("size", "ok", f"newest backup {newest.id} is {format_size(newest.size)}")
    ordered = sorted(history)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    floor = median * (100 - expect.size_drop_percent) / 100
    if _size(newest) < floor:
        return Check(
            "size",
            "failed",
            f"the newest backup {newest.id} is {format_size(_size(newest))}, more than "
            f"{expect.size_drop_percent}% below the usual {format_size(int(median))} (median of "
            f"the last {len(history)}): was data lost or a table left out? check the database, "
            "then back up again",
        )
    return Check(
        "size",
        "ok",
        f"newest backup {newest.id} is {format_size(_size(newest))} "
        f"(usual {format_size(int(median))})",
    )


def check_quota(usage: UsageReport, expect: Expectations) -> Check:
    """No target holds more than the warning percentage of its quota."""
    if expect.quota_bytes is None:
        return Check("quota", "skipped", "no storage quota is set (BACKUP_STORAGE_QUOTA)")
    limit = expect.quota_bytes * expect.usage_warn_percent / 100
    over = [t for t in usage.targets if t.bytes > limit]
    if over:
        text = "; ".join(
            f"{t.url} holds {format_size(t.bytes)}, {t.bytes * 100 / expect.quota_bytes:.0f}% of "
            f"its {format_size(expect.quota_bytes)} quota" for t in over
        )
        return Check(
            "quota",
            "failed",
            f"{text} (over {expect.usage_warn_percent}%: tighten retention or raise the quota)",
        )
    return Check(
        "quota",
        "ok",
        f"every target below {expect.usage_warn_percent}% of {format_size(expect.quota_bytes)}",
    )


def check_disk(free: Mapping[str, int], held: Holdings) -> Check:
    """Every local target's filesystem (``free``: URL -> free bytes) has room for the next
    backup: the largest of the last 7."""
    if not free:
        return Check("disk", "skipped", "no local target")
    need = max((m.size for m in held.backups[:SIZE_HISTORY]), default=0)
    short = [(url, room) for url, room in free.items() if room < need]
    if short:
        text = "; ".join(
            f"{url} has {format_size(room)} free, the next backup needs about {format_size(need)}"
            for url, room in short
        )
        return Check("disk", "failed", f"{text} (free space, or tighten retention)")
    return Check(
        "disk",
        "ok",
        ", ".join(f"{url} {format_size(room)} free" for url, room in free.items()),
    )


def check_scheduler(status: tuple[bool, str] | None) -> Check:
    """Something polled the backup deployments recently (None: no Prefect server to ask)."""
    if status is None:
        return Check("scheduler", "skipped", "no Prefect server is configured (PREFECT_API_URL)")
    running, detail = status
    return Check("scheduler", "ok" if running else "failed", detail)


def check_usage(usage: UsageReport) -> Check:
    """No target is over its warning threshold, and every target could be measured."""
    problems = [*usage.warnings, *(f"cannot measure {u}: {e}" for u, e in usage.errors.items())]
    if problems:
        return Check("usage", "failed", "; ".join(problems))
    per = ", ".join(f"{t.url} {format_size(t.bytes)}" for t in usage.targets)
    return Check("usage", "ok", f"{format_size(usage.total)} in total ({per})")


def check_storage(held: Holdings) -> Check:
    """Every target answered a listing."""
    if held.errors:
        text = "; ".join(f"cannot list {url}: {why}" for url, why in held.errors.items())
        return Check("storage", "failed", text + " (check the target's credentials and network)")
    return Check("storage", "ok", f"{len(held.targets)} target(s) listed")


def database_checks(held: Holdings, expect: Expectations, now: datetime) -> list[Check]:
    """The checks of one database's backups; pure."""
    return [
        check_freshness(held.backups, expect, now),
        check_verified(held.backups, expect, now),
        check_size(held.backups, expect),
        check_restore_test(held.backups, expect, now),
        check_offsite(held, expect, now),
    ]


@dataclass(frozen=True)
class SystemFacts:
    """What the shared checks need beyond the listings: local free space, the scheduler."""

    free: Mapping[str, int] = field(default_factory=dict)
    scheduler: tuple[bool, str] | None = None


def system_checks(
    held: Holdings, usage: UsageReport, expect: Expectations, facts: SystemFacts
) -> list[Check]:
    """The checks of what every database shares (targets, scheduler); pure."""
    return [
        check_usage(usage),
        check_quota(usage, expect),
        check_disk(facts.free, held),
        check_storage(held),
        check_scheduler(facts.scheduler),
    ]


def evaluate(
    held: Holdings,
    usage: UsageReport,
    expect: Expectations,
    now: datetime,
    subject: str = "",
    facts: SystemFacts | None = None,
) -> MonitorReport:
    """Run every check on what the targets hold; pure (no I/O)."""
    return MonitorReport(
        now=now,
        subject=subject or "pgkeeper",
        checks=[
            *database_checks(held, expect, now),
            *system_checks(held, usage, expect, facts or SystemFacts()),
        ],
    )


# -- gathering (I/O) ----------------------------------------------------------------------------


def holdings(
    storages: Sequence[Storage], database: str | None = None, server: str | None = None
) -> Holdings:
    """List every target (as ``catalog.list_all`` does, but one unreachable target is an error
    in the result, not an exception) and keep the backups of ``database`` on ``server``
    (None: every database / server)."""
    held = Holdings(targets=[s.url for s in storages])
    records: dict[str, Manifest] = {}
    for storage in storages:
        try:
            manifests = catalog.list_backups(storage)
        except StorageError as exc:
            held.errors[storage.url] = exc.message
            continue
        for manifest in manifests:
            if manifest.kind == "base":  # the archive checks cover base backups
                continue
            if database is not None and manifest.database != database:
                continue
            if server is not None and manifest.server != server:
                continue
            records.setdefault(manifest.id, manifest)
            held.locations.setdefault(manifest.id, []).append(storage.url)
    held.backups = sorted(records.values(), key=recorded_at, reverse=True)
    return held


def measure_usage(
    storages: Sequence[Storage], warn_bytes: Mapping[str, int | None] | None = None
) -> UsageReport:
    """``rotate.usage_report`` with each target's own warning threshold (by URL)."""
    merged = UsageReport()
    for storage in storages:
        one = usage_report([storage], (warn_bytes or {}).get(storage.url))
        merged.targets += one.targets
        merged.errors.update(one.errors)
        merged.warnings += one.warnings
    return merged


def monitor(
    storages: Sequence[Storage],
    expect: Expectations,
    *,
    database: str | None = None,
    server: str | None = None,
    usage_warn_bytes: Mapping[str, int | None] | None = None,
    now: datetime | None = None,
) -> MonitorReport:
    """List the targets and run every check; see the module docstring.

    Raises nothing for storage failures (they are failed checks); a failing system is a report
    whose ``ok`` is False (``raise_for_failure`` raises for it).
    """
    now = aware(now or utcnow())
    held = holdings(storages, database, server)
    usage = measure_usage(storages, usage_warn_bytes)
    subject = f"{database} on {server}" if database and server else (database or "every database")
    report = evaluate(held, usage, expect, now, subject)
    for check in report.failed:
        log.warning("monitor: %s failed: %s", check.name, check.detail)
    return report


SYSTEM_SUBJECT = "storage and scheduler"


def free_space(storages: Sequence[Storage]) -> dict[str, int]:
    """Free bytes of each local target's filesystem (URL -> bytes); cloud targets have none."""
    free: dict[str, int] = {}
    for storage in storages:
        path = storage.local_path("")
        if path is None:
            continue
        probe = path
        while not probe.exists() and probe != probe.parent:  # a folder not made yet
            probe = probe.parent
        try:
            free[storage.url] = shutil.disk_usage(probe).free
        except OSError:
            continue
    return free


def _split(held: Holdings) -> dict[tuple[str, str], Holdings]:
    """One Holdings per database@server, in a stable order."""
    groups: dict[tuple[str, str], Holdings] = {}
    for manifest in held.backups:
        key = (manifest.database, manifest.server)
        group = groups.setdefault(key, Holdings(targets=held.targets, errors=held.errors))
        group.backups.append(manifest)
        group.locations[manifest.id] = held.locations.get(manifest.id, [])
    return dict(sorted(groups.items()))


def subject_of(database: str, server: str) -> str:
    """How alerts, reports and events name a database: ``shop on db.internal:5432``."""
    return f"{database} on {server}"


def monitor_each(
    storages: Sequence[Storage],
    expect: Expectations,
    *,
    database: str | None = None,
    server: str | None = None,
    usage_warn_bytes: Mapping[str, int | None] | None = None,
    scheduler: tuple[bool, str] | None = None,
    now: datetime | None = None,
    fleet: Mapping[tuple[str, str], Expectations] | None = None,
    unreachable: Mapping[str, str] | None = None,
) -> list[MonitorReport]:
    """One report per database the targets hold (only ``database`` on ``server`` when given;
    it gets a report even when it has no backup at all), then one for what they share.

    ``fleet``: the inventory's databases (``(database, server)``) with each one's own
    expectations (its schedule, its max age): each gets a report, backed up or not, and
    databases outside it are not checked; ``unreachable``: '*' servers that could not be asked
    for their databases, each a failed ``inventory`` check. Raises nothing for storage failures
    (they are failed checks).
    """
    now = aware(now or utcnow())
    held = holdings(storages, database, server)
    groups = _split(held)
    if database is not None and server is not None and not groups:
        groups[(database, server)] = Holdings(targets=held.targets, errors=held.errors)
    own = {key: expect for key in groups} if fleet is None else dict(fleet)
    reports = [
        MonitorReport(now, subject_of(db, srv), database_checks(
            groups.get((db, srv)) or Holdings(targets=held.targets, errors=held.errors),
            own[(db, srv)], now,
        ))
        for (db, srv) in sorted(own)
    ]  # fmt: skip
    for srv, why in sorted((unreachable or {}).items()):
        check = Check("inventory", "failed", f"cannot list the databases of {srv}: {why}")
        reports.append(MonitorReport(now, f"databases on {srv}", [check]))
    usage = measure_usage(storages, usage_warn_bytes)
    facts = SystemFacts(free=free_space(storages), scheduler=scheduler)
    reports.append(MonitorReport(now, SYSTEM_SUBJECT, system_checks(held, usage, expect, facts)))
    for report in reports:
        for check in report.failed:
            log.warning("monitor: %s: %s failed: %s", report.subject, check.name, check.detail)
    return reports


def fleet_scope(
    settings: Settings, expect_of: Callable[[Settings], Expectations]
) -> tuple[dict[tuple[str, str], Expectations] | None, dict[str, str] | None]:
    """For ``monitor_each``: each enabled database of the inventory with its own expectations
    (``expect_of`` its settings; '*' servers are asked, so a new database is checked too) and
    the servers that could not be asked; (None, None) for a fleet of one (DATABASE_URL, or
    nothing configured: every database the targets hold, as before)."""
    from pgkeeper.inventory import configured, load_inventory

    known = configured(settings)
    if known is None or known.source == "DATABASE_URL":
        return None, None
    inventory = load_inventory(settings)
    found = {(d.name, d.server): expect_of(d.settings) for d in inventory.enabled}
    return found, inventory.errors


def raise_for_failure(report: MonitorReport) -> None:
    """Raise PgkeeperError (one line naming every failed check) when a check failed."""
    if not report.ok:
        raise PgkeeperError(report.summary())
