"""Rotation: apply the retention plan to every storage target; pin, unpin and usage reports.

Per target, in order (each target on its own: one failing target never stops the others):

  1. measure usage (every object under the target's prefix)
  2. list complete backups and plan them (``retention.plan``; backups of the primary not yet
     uploaded to an offsite target are held, see ``_upload_holds``)
  3. delete what the plan deletes, oldest first, each with ``catalog.delete_backup`` (manifest
     first, then data): right before it, the manifest is read again and the delete is skipped
     if it changed since the listing (pinned, re-verified meanwhile)
  4. remove incomplete backups (no manifest) older than the grace period: an interrupted
     rotation or backup leaves exactly these, so the next run finishes its work
  5. measure usage again and warn above ``usage_warn_bytes``

Dry run: every target is wrapped in ``ReadOnlyStorage`` and the same steps run; the one place
that would change something (``_delete`` and ``_remove_incomplete``) records "would delete"
instead, and the read-only view guarantees nothing changes even if that branch had a bug.

Object Lock: S3's ``ObjectLockedError`` (detected by name, so this module needs no boto3) makes
a delete "kept-by-lock", not a failure. If the lock stops a delete after the manifest went (only
data locked), the manifest is written back when every data object is still there, so the
backup stays listed; otherwise the folder is incomplete and step 4 finishes it after the lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

from pgkeeper import catalog, naming
from pgkeeper.errors import BackupNotFoundError, ConfigError, StorageError
from pgkeeper.manifest import Manifest, utcnow
from pgkeeper.retention import (
    Decision,
    Policy,
    aware,
    format_size,
    group_of,
    overrides_from_settings,
    plan,
    policy_for_target,
    recorded_at,
)
from pgkeeper.storage.base import ReadOnlyStorage, Storage

if TYPE_CHECKING:
    from pgkeeper.settings import Settings

__all__ = [
    "RotationReport",
    "TargetReport",
    "TargetUsage",
    "UsageReport",
    "pin",
    "policies_from_settings",
    "rotate",
    "unpin",
    "usage_report",
]

log = logging.getLogger(__name__)

# Incomplete folders younger than this are never removed, whatever BACKUP_FAILED_GRACE says: a
# backup or an upload may still be writing them, and rotation holds no lock that proves otherwise.
MIN_INCOMPLETE_AGE = timedelta(hours=6)


# -- usage --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetUsage:
    """What one target holds: bytes of every object, complete backups, incomplete folders."""

    url: str
    kind: str
    bytes: int
    backups: int
    incomplete: int


def measure(storage: Storage) -> TargetUsage:
    """Usage of one target from one listing. Raises StorageError when it cannot be listed."""
    total = 0
    ids: set[str] = set()
    committed: set[str] = set()
    for info in storage.list():
        total += info.size
        backup_id = naming.id_from_key(info.key)
        if backup_id is not None:
            ids.add(backup_id)
            if info.key == naming.manifest_key(backup_id):
                committed.add(backup_id)
    return TargetUsage(storage.url, storage.kind, total, len(committed), len(ids - committed))


@dataclass
class UsageReport:
    """Usage per target and in total, with a warning per target over the threshold."""

    targets: list[TargetUsage] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.targets)

    def as_table(self) -> list[dict[str, Any]]:
        """One row per target plus a total row: for a Prefect table artifact or a CLI table."""
        rows: list[dict[str, Any]] = [
            {
                "target": t.url,
                "size": format_size(t.bytes),
                "bytes": t.bytes,
                "backups": t.backups,
                "incomplete": t.incomplete,
            }
            for t in self.targets
        ]
        rows += [
            {"target": url, "size": "error", "bytes": 0, "backups": 0, "incomplete": 0}
            for url in self.errors
        ]
        rows.append(
            {
                "target": "total",
                "size": format_size(self.total),
                "bytes": self.total,
                "backups": sum(t.backups for t in self.targets),
                "incomplete": sum(t.incomplete for t in self.targets),
            }
        )
        return rows

    def to_json(self) -> str:
        return json.dumps(
            {
                "total": self.total,
                "targets": [asdict(t) for t in self.targets],
                "errors": self.errors,
                "warnings": self.warnings,
            },
            indent=2,
        )


def _usage_warning(usage: TargetUsage, limit: int | None) -> str | None:
    if limit is None or usage.bytes <= limit:
        return None
    return (
        f"{usage.url} holds {format_size(usage.bytes)}, over the warning threshold of "
        f"{format_size(limit)} (BACKUP_USAGE_WARN_BYTES): tighten retention or add space"
    )


def usage_report(storages: Sequence[Storage], warn_bytes: int | None = None) -> UsageReport:
    """Measure every target. A target that cannot be listed is reported in ``errors``.

    Raises nothing for storage failures (they are per target in the report).
    """
    report = UsageReport()
    for storage in storages:
        try:
            usage = measure(storage)
        except StorageError as exc:
            report.errors[storage.url] = exc.message
            continue
        report.targets.append(usage)
        warning = _usage_warning(usage, warn_bytes)
        if warning:
            report.warnings.append(warning)
    return report


# -- the rotation report ------------------------------------------------------------------------


@dataclass
class TargetReport:
    """What rotation did (or, in a dry run, would do) on one target."""

    url: str
    kind: str
    policy: str
    decisions: list[Decision] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_by_lock: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    incomplete_removed: list[str] = field(default_factory=list)
    incomplete_kept: list[str] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # id -> what happened, when not plain
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    usage_before: TargetUsage | None = None
    usage_after: TargetUsage | None = None
    wal_removed: list[str] = field(default_factory=list)  # WAL files no kept base backup needs

    def action(self, decision: Decision, dry_run: bool) -> str:
        backup_id = decision.backup_id
        if decision.keep:
            return "keep"
        if backup_id in self.kept_by_lock:
            return "kept-by-lock"
        if backup_id in self.skipped:
            return "skipped"
        if backup_id in self.deleted:
            return "would delete" if dry_run else "deleted"
        return "error"


@dataclass
class RotationReport:
    """The outcome of one rotation over every target; ``as_table`` / ``to_json`` show it."""

    now: datetime
    dry_run: bool
    targets: list[TargetReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when anything failed (a locked backup is not a failure)."""
        return not any(t.errors for t in self.targets)

    @property
    def deleted(self) -> list[str]:
        return [i for t in self.targets for i in t.deleted]

    @property
    def warnings(self) -> list[str]:
        return [w for t in self.targets for w in t.warnings]

    def as_table(self) -> list[dict[str, Any]]:
        """One row per backup per target, newest first, then incomplete folders.

        Every row has the same keys (target, backup, recorded, state, size, action, reasons),
        all strings, for a Prefect table artifact or a CLI table.
        """
        rows: list[dict[str, Any]] = []
        for target in self.targets:
            for d in target.decisions:
                why = "; ".join(d.reasons)
                if d.backup_id in target.notes:
                    why += f"; {target.notes[d.backup_id]}"
                rows.append(
                    {
                        "target": target.url,
                        "backup": d.backup_id,
                        "recorded": d.recorded_at.isoformat() if d.recorded_at else "",
                        "state": d.state + (", pinned" if d.pinned else ""),
                        "size": format_size(d.size),
                        "action": target.action(d, self.dry_run),
                        "reasons": why,
                    }
                )
            for backup_id in target.incomplete_removed + target.incomplete_kept:
                removed = backup_id in target.incomplete_removed
                action = "kept-by-lock"
                if removed:
                    action = "would delete" if self.dry_run else "deleted"
                rows.append(
                    {
                        "target": target.url,
                        "backup": backup_id,
                        "recorded": "",
                        "state": "incomplete",
                        "size": "",
                        "action": action,
                        "reasons": target.notes.get(backup_id, "incomplete past grace"),
                    }
                )
        return rows

    def summary(self) -> str:
        """One line per target: what was deleted, kept by lock, failed, and usage."""
        verb = "would delete" if self.dry_run else "deleted"
        lines = []
        for t in self.targets:
            kept = sum(1 for d in t.decisions if d.keep)
            parts = [f"{t.url}: kept {kept}", f"{verb} {len(t.deleted)}"]
            if t.incomplete_removed:
                parts.append(f"{verb} {len(t.incomplete_removed)} incomplete")
            if t.wal_removed:
                parts.append(f"{verb} {len(t.wal_removed)} WAL files")
            if t.kept_by_lock or t.incomplete_kept:
                parts.append(f"kept-by-lock {len(t.kept_by_lock) + len(t.incomplete_kept)}")
            if t.skipped:
                parts.append(f"skipped {len(t.skipped)}")
            if t.errors:
                parts.append(f"{len(t.errors)} errors")
            if t.usage_after is not None:
                parts.append(f"uses {format_size(t.usage_after.bytes)}")
            lines.append(", ".join(parts))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "dry_run": self.dry_run,
            "ok": self.ok,
            "targets": [
                {
                    "url": t.url,
                    "kind": t.kind,
                    "policy": t.policy,
                    "usage_before": asdict(t.usage_before) if t.usage_before else None,
                    "usage_after": asdict(t.usage_after) if t.usage_after else None,
                    "deleted": t.deleted,
                    "kept_by_lock": t.kept_by_lock,
                    "skipped": t.skipped,
                    "incomplete_removed": t.incomplete_removed,
                    "incomplete_kept": t.incomplete_kept,
                    "wal_removed": t.wal_removed,
                    "notes": t.notes,
                    "errors": t.errors,
                    "warnings": t.warnings,
                    "decisions": [
                        {
                            "id": d.backup_id,
                            "keep": d.keep,
                            "action": t.action(d, self.dry_run),
                            "reasons": d.reasons,
                            "recorded_at": d.recorded_at.isoformat() if d.recorded_at else None,
                            "size": d.size,
                            "state": d.state,
                            "pinned": d.pinned,
                            "group": d.group,
                        }
                        for d in t.decisions
                    ],
                }
                for t in self.targets
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# -- rotation -----------------------------------------------------------------------------------


def _is_locked(exc: BaseException) -> bool:
    # By name: pgkeeper.storage.s3 imports boto3 lazily and rotation must not need it; any
    # backend may define an ObjectLockedError(StorageError) with the same meaning.
    return any(cls.__name__ == "ObjectLockedError" for cls in type(exc).__mro__)


def policies_from_settings(settings: Settings, storages: Sequence[Storage]) -> dict[str, Policy]:
    """The policy of each target (by URL): the BACKUP_* knobs, then per-target overrides.

    Raises ConfigError when a knob or an override is malformed.
    """
    base = Policy.from_settings(settings)
    overrides = overrides_from_settings(settings)
    return {s.url: policy_for_target(base, overrides, s.url, s.kind) for s in storages}


def _policy_of(policy: Policy | Mapping[str, Policy], storage: Storage) -> Policy:
    if isinstance(policy, Policy):
        return policy
    if storage.url in policy:
        return policy[storage.url]
    raise ConfigError(
        f"no retention policy for target {storage.url} (pass one per target URL, "
        "e.g. from policies_from_settings)"
    )


def _upload_holds(
    primary: Sequence[Manifest], offsite: Sequence[Storage], report: TargetReport
) -> dict[str, str]:
    """Good backups of the primary that some offsite target is still to receive.

    "Still to receive": missing there and newer than that target's newest backup of the same
    database (older missing ones were rotated out there by its own policy, or never will be
    copied). A target that cannot be listed is assumed to have received nothing.
    """
    holds: dict[str, str] = {}
    for target in offsite:
        try:
            there = catalog.list_backups(target)
        except StorageError as exc:
            report.warnings.append(
                f"cannot list {target.url} to see what is uploaded ({exc.message}): every "
                "backup not known to be there is held"
            )
            there = []
        ids = {m.id for m in there}
        newest: dict[tuple[str, str], datetime] = {}
        for m in there:
            key = (m.database, m.server)
            newest[key] = max(newest.get(key, recorded_at(m)), recorded_at(m))
        for m in primary:
            if m.id in ids or m.verification_failed:
                continue
            last = newest.get((m.database, m.server))
            if last is None or recorded_at(m) > last:
                holds.setdefault(m.id, f"not yet uploaded to {target.url}")
    return holds


def _delete(storage: Storage, manifest: Manifest, dry_run: bool, report: TargetReport) -> None:
    backup_id = manifest.id
    try:
        current = catalog.read_manifest(storage, backup_id)
    except (StorageError, ValueError) as exc:
        report.errors.append(f"cannot re-read {backup_id} before deleting it: {exc}")
        report.notes[backup_id] = "not deleted: could not re-read its manifest"
        return
    if current is None or current != manifest:
        report.skipped.append(backup_id)
        report.notes[backup_id] = (
            "already gone" if current is None else "changed since listed; next run decides"
        )
        return
    if dry_run:
        report.deleted.append(backup_id)
        return
    try:
        catalog.delete_backup(storage, backup_id)
    except StorageError as exc:
        if not _is_locked(exc):
            report.errors.append(f"deleting {backup_id} from {storage.url} failed: {exc.message}")
            report.notes[backup_id] = "delete failed; the next run finishes it"
            return
        report.kept_by_lock.append(backup_id)
        report.notes[backup_id] = _after_lock(storage, manifest, exc)
        return
    report.deleted.append(backup_id)
    log.info("rotation deleted %s from %s", backup_id, storage.url)


def _after_lock(storage: Storage, manifest: Manifest, exc: StorageError) -> str:
    """Leave a backup whose delete a lock refused listed if it is whole; say what happened."""
    try:
        if storage.stat(naming.manifest_key(manifest.id)) is not None:
            return f"kept by Object Lock: {exc.message}"
        keys = [naming.object_key(manifest.id, o.name) for o in manifest.objects]
        if all(storage.stat(key) is not None for key in keys):
            # Only the data was locked and nothing of it went: commit the backup again.
            catalog.write_manifest(storage, manifest)
            return f"kept by Object Lock (manifest written back): {exc.message}"
    except StorageError as again:
        return f"kept by Object Lock, then {again.message}; its folder is incomplete"
    return (
        f"partly deleted, the rest kept by Object Lock ({exc.message}); "
        "a later rotation removes it once the lock expires"
    )


def _remove_incomplete(
    storage: Storage, grace: timedelta, now: datetime, dry_run: bool, report: TargetReport
) -> None:
    # Not catalog.clean_incomplete: it stops at the first error, and one folder under Object
    # Lock (a killed backup on a locked bucket) would then block every other cleanup for days;
    # the deletion itself (order included) is catalog's.
    for item in catalog.list_incomplete(storage):
        if item.since is None or now - aware(item.since) <= grace:
            continue
        if dry_run:
            report.incomplete_removed.append(item.backup_id)
            continue
        try:
            catalog.remove_incomplete(storage, item)
        except StorageError as exc:
            if _is_locked(exc):
                report.incomplete_kept.append(item.backup_id)
                report.notes[item.backup_id] = f"incomplete, kept by Object Lock: {exc.message}"
            else:
                report.errors.append(
                    f"removing incomplete {item.backup_id} from {storage.url} failed: {exc.message}"
                )
            continue
        report.incomplete_removed.append(item.backup_id)
        log.info("rotation removed incomplete backup %s from %s", item.backup_id, storage.url)


def rotate(
    storages: Sequence[Storage],
    policy: Policy | Mapping[str, Policy],
    now: datetime | None = None,
    dry_run: bool = False,
    *,
    group_policy: Callable[[str, str], Policy | None] | None = None,
    only: str | None = None,
) -> RotationReport:
    """Apply retention to every target (the first is the primary); see the module docstring.

    ``policy`` is one policy for all targets or one per target URL; ``group_policy(url,
    group)`` gives a fleet database (``database@server``) its own rules on a target (None:
    the target's).
    ``only`` (a ``database@server`` group) plans and deletes that database's backups alone
    (the size limit then counts only them). With ``dry_run`` nothing is changed (every target
    is viewed read-only) and the report says what would be deleted. Raises ConfigError when a
    target has no policy; storage failures never raise: they are in each target's ``errors``
    (``report.ok`` is False), and the other targets still rotate.
    """
    now = aware(now or utcnow())
    report = RotationReport(now=now, dry_run=dry_run)
    policies = [_policy_of(policy, s) for s in storages]  # all resolved before any change
    views: list[Storage] = [ReadOnlyStorage(s) for s in storages] if dry_run else list(storages)
    for position, (storage, target_policy) in enumerate(zip(views, policies, strict=True)):
        target = TargetReport(storage.url, storage.kind, target_policy.describe())
        report.targets.append(target)
        try:
            target.usage_before = measure(storage)
            backups = catalog.list_backups(storage)
        except StorageError as exc:
            target.errors.append(f"cannot list {storage.url}: {exc.message}")
            continue
        if only is not None:
            backups = [m for m in backups if group_of(m) == only]
        holds = _upload_holds(backups, views[1:], target) if position == 0 else {}
        own = partial(group_policy, storage.url) if group_policy is not None else None
        result = plan(backups, target_policy, now, hold=holds, group_policy=own)
        target.decisions = result.decisions
        target.warnings.extend(result.warnings)

        by_id = {m.id: m for m in backups}
        # Oldest first: a rotation cut short leaves the newer backups, the more valuable ones.
        for decision in reversed(result.decisions):
            if not decision.keep:
                _delete(storage, by_id[decision.backup_id], dry_run, target)
        kept = [by_id[d.backup_id] for d in result.decisions if d.backup_id not in target.deleted]
        try:
            # After the base backups: WAL goes only once no kept base backup needs it.
            _prune_wal(storage, kept, dry_run, target)
        except StorageError as exc:
            target.errors.append(f"removing old WAL from {storage.url} failed: {exc.message}")
        try:
            grace = max(target_policy.failed_grace, MIN_INCOMPLETE_AGE)
            if only is None:  # an incomplete folder's database is not always known
                _remove_incomplete(storage, grace, now, dry_run, target)
            target.usage_after = _usage_after(storage, target, dry_run)
        except StorageError as exc:
            target.errors.append(f"cleaning up {storage.url} failed: {exc.message}")
            continue
        warning = _usage_warning(target.usage_after, target_policy.usage_warn_bytes)
        if warning:
            target.warnings.append(warning)
    for target in report.targets:
        for warning in target.warnings:
            log.warning("%s", warning)
        for error in target.errors:
            log.error("%s", error)
    return report


def _prune_wal(
    storage: Storage, kept: Sequence[Manifest], dry_run: bool, report: TargetReport
) -> None:
    """WAL retention on one target: per database system, remove the archived WAL that lies
    wholly before the oldest base backup this rotation keeps there (``wal.prune_plan``)."""
    from pgkeeper import wal  # the WAL archive only matters to deployments that archive

    starts: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}
    for manifest in kept:
        if manifest.kind == "base" and manifest.base is not None:
            info = manifest.base
            starts.setdefault(info.system_identifier, []).append(wal.parse_lsn(info.start_lsn))
            sizes[info.system_identifier] = info.wal_segment_size
    for system_id in wal.list_systems(storage):
        archive = wal.list_archive(storage, system_id)
        doomed = wal.prune_plan(
            archive, starts.get(system_id, []), sizes.get(system_id, wal.DEFAULT_SEGMENT_SIZE)
        )
        if not dry_run:
            wal.remove(storage, doomed)
        report.wal_removed.extend(f.name for f in doomed)
        if doomed:
            log.info("rotation removed %d WAL files of system %s from %s", len(doomed),
                     system_id, storage.url)  # fmt: skip


def _usage_after(storage: Storage, target: TargetReport, dry_run: bool) -> TargetUsage:
    if not dry_run:
        return measure(storage)
    # What the run would leave: today's objects minus those of every folder it would remove.
    gone = {*target.deleted, *target.incomplete_removed}
    total = 0
    ids: set[str] = set()
    committed: set[str] = set()
    for info in storage.list():
        backup_id = naming.id_from_key(info.key)
        if backup_id in gone:
            continue
        total += info.size
        if backup_id is not None:
            ids.add(backup_id)
            if info.key == naming.manifest_key(backup_id):
                committed.add(backup_id)
    return TargetUsage(storage.url, storage.kind, total, len(committed), len(ids - committed))


# -- pinning ------------------------------------------------------------------------------------


def _set_pinned(storages: Sequence[Storage], backup_id: str, pinned: bool) -> list[str]:
    naming.validate_id(backup_id)
    holders: list[str] = []
    failures: list[str] = []
    for storage in storages:
        try:
            manifest = catalog.read_manifest(storage, backup_id)
            if manifest is None:
                continue
            if manifest.pinned != pinned:
                catalog.write_manifest(storage, manifest.model_copy(update={"pinned": pinned}))
            holders.append(storage.url)
        except StorageError as exc:
            failures.append(f"{storage.url}: {exc.message}")
    verb = "pin" if pinned else "unpin"
    if failures:
        done = f"{verb}ned on {', '.join(holders)}; " if holders else ""
        raise StorageError(
            f"could not {verb} {backup_id!r}: {done}failed on {'; '.join(failures)} "
            f"(fix the target and run 'pgkeeper {verb} {backup_id}' again)"
        )
    if not holders:
        where = ", ".join(s.url for s in storages) or "no storage target"
        raise BackupNotFoundError(
            f"backup {backup_id!r} not found in {where} (run 'pgkeeper list')"
        )
    return holders


def pin(storages: Sequence[Storage], backup_id: str) -> list[str]:
    """Pin a backup on every target that holds it, so rotation never deletes it there.

    Each manifest is rewritten atomically with ``pinned: true``; returns the target URLs.
    Idempotent. Raises InvalidBackupIdError for a malformed id, BackupNotFoundError when no
    target holds it, StorageError when some target could not be updated (the message says
    which; run it again).
    """
    return _set_pinned(storages, backup_id, True)


def unpin(storages: Sequence[Storage], backup_id: str) -> list[str]:
    """Unpin a backup on every target that holds it; the same contract as ``pin``."""
    return _set_pinned(storages, backup_id, False)
