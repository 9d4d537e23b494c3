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
  usage         no target holds more than its warning threshold (BACKUP_USAGE_WARN_BYTES or
                a per-target override)
  storage       every target could be listed

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pgkeeper import catalog
from pgkeeper.errors import PgkeeperError, StorageError
from pgkeeper.manifest import Manifest, RestoreTest, utcnow
from pgkeeper.retention import aware, format_size, recorded_at
from pgkeeper.rotate import UsageReport, usage_report
from pgkeeper.storage.base import Storage

__all__ = [
    "Check",
    "Expectations",
    "Holdings",
    "MonitorReport",
    "evaluate",
    "holdings",
    "measure_usage",
    "monitor",
    "raise_for_failure",
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

    @property
    def max_backup_age(self) -> timedelta | None:
        """The age past which the newest backup is stale."""
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
    newest = backups[0]
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
        f"(restore took {test.duration_seconds:.0f}s)",
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


def evaluate(
    held: Holdings, usage: UsageReport, expect: Expectations, now: datetime, subject: str = ""
) -> MonitorReport:
    """Run every check on what the targets hold; pure (no I/O)."""
    return MonitorReport(
        now=now,
        subject=subject or "pgkeeper",
        checks=[
            check_freshness(held.backups, expect, now),
            check_verified(held.backups, expect, now),
            check_restore_test(held.backups, expect, now),
            check_offsite(held, expect, now),
            check_usage(usage),
            check_storage(held),
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


def raise_for_failure(report: MonitorReport) -> None:
    """Raise PgkeeperError (one line naming every failed check) when a check failed."""
    if not report.ok:
        raise PgkeeperError(report.summary())
