"""Rotation end to end on real storage: a local folder and S3 (moto), Object Lock included.

Backups here are real manifests written with ``catalog.write_manifest`` over small fake data
objects; what is under test is which objects rotation removes, in what order, and what it
leaves when it is stopped, dry-run or refused by a lock.

moto and Object Lock: moto stores retention and legal holds, returns them on HEAD, and refuses
a versioned DeleteObject of a locked version (AccessDenied), as S3 does; a plain DeleteObject
only adds a delete marker, which is why ``S3Storage.delete`` checks the lock first. moto ignores
lock headers on multipart uploads, so these backups stay small (single PutObject).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pgkeeper import catalog, naming
from pgkeeper import rotate as rotation
from pgkeeper.errors import BackupNotFoundError, ConfigError, InvalidBackupIdError, StorageError
from pgkeeper.manifest import Manifest, StoredObject, Verification, utcnow
from pgkeeper.retention import Policy
from pgkeeper.rotate import pin, policies_from_settings, rotate, unpin, usage_report
from pgkeeper.settings import Settings
from pgkeeper.storage.base import ObjectInfo, ReadOnlyStorage, Storage, put_bytes
from pgkeeper.storage.local import LocalStorage
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.integration

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)


def make_backup(
    storage: Storage,
    when: datetime,
    state: str = "verified",
    *,
    pinned: bool = False,
    size: int = 64,
    database: str = "app",
) -> Manifest:
    """Write one complete backup: a data object, then its manifest (the commit marker)."""
    backup_id = naming.make_id("auto_backup", when)
    name = naming.data_name(backup_id, "custom", "zstd")
    data = hashlib.sha256(backup_id.encode()).digest() * (size // 32 + 1)
    data = data[:size]
    put_bytes(storage, naming.object_key(backup_id, name), data)
    finished = when + timedelta(minutes=5)
    manifest = Manifest(
        id=backup_id,
        name="auto_backup",
        database=database,
        server="db:5432",
        format="custom",
        compression="zstd",
        objects=[StoredObject(name=name, size=size, sha256=hashlib.sha256(data).hexdigest())],
        size=size,
        started_at=when,
        finished_at=finished,
        verification=None
        if state == "unverified"
        else Verification(ok=state == "verified", at=finished),
        pinned=pinned,
    )
    catalog.write_manifest(storage, manifest)
    _age_local_files(storage, backup_id, finished)
    return manifest


def _age_local_files(storage: Storage, backup_id: str, when: datetime) -> None:
    # Give local files the times a real backup made then would have (incomplete-folder cleanup
    # reads them); S3 keeps its own upload dates, so S3 tests move ``now`` instead.
    for info in storage.list(naming.backup_prefix(backup_id)):
        path = storage.local_path(info.key)
        if path is not None:
            os.utime(path, (when.timestamp(), when.timestamp()))


def listed(storage: Storage) -> list[str]:
    return [m.id for m in catalog.list_backups(storage)]


def folders(storage: Storage) -> set[str]:
    return {k for k in (naming.id_from_key(i.key) for i in storage.list()) if k is not None}


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``root`` with its size, mtime and sha256: equal snapshots, same tree."""
    tree = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            tree[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, digest)
    return tree


class Recording:
    """A storage that passes everything to ``inner`` and records each delete, in order."""

    def __init__(self, inner: Storage, fail_after_manifest: bool = False) -> None:
        self.inner = inner
        self.url = inner.url
        self.kind = inner.kind
        self.deleted: list[str] = []
        self.fail_after_manifest = fail_after_manifest

    def open_write(self, key: str, size_hint: int | None = None, metadata: Any = None) -> Any:
        return self.inner.open_write(key, size_hint, metadata)

    def open_read(self, key: str) -> Any:
        return self.inner.open_read(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def stat(self, key: str) -> ObjectInfo | None:
        return self.inner.stat(key)

    def delete(self, key: str) -> None:
        if self.fail_after_manifest and self.deleted and self.deleted[-1].endswith("manifest.json"):
            raise StorageError(f"simulated crash before deleting {key!r}")
        self.inner.delete(key)
        self.deleted.append(key)

    def local_path(self, key: str) -> Path | None:
        return self.inner.local_path(key)


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "primary")


def history(storage: Storage, now: datetime = NOW) -> dict[str, Manifest]:
    """Six daily verified backups, a failed and an unverified one past grace, a fresh one."""
    made = {f"day{d}": make_backup(storage, now - timedelta(days=d, hours=1)) for d in range(6)}
    made["failed"] = make_backup(storage, now - timedelta(days=2, hours=5), "failed")
    made["stale"] = make_backup(storage, now - timedelta(days=3, hours=5), "unverified")
    made["fresh"] = make_backup(storage, now - timedelta(minutes=30), "unverified")
    return made


POLICY = Policy(keep_last=3, min_backups=1)
KEPT = ["fresh", "day0", "day1", "day2"]
GONE = ["failed", "stale", "day3", "day4", "day5"]


# -- local storage ------------------------------------------------------------------------------


def test_rotation_deletes_what_the_plan_says_manifest_first(local: LocalStorage) -> None:
    """Rotation removes exactly the planned backups, whole, each manifest before its data."""
    made = history(local)
    spy = Recording(local)
    report = rotate([spy], POLICY, now=NOW)

    assert report.ok and not report.dry_run
    assert sorted(report.deleted) == sorted(made[k].id for k in GONE)
    assert set(listed(local)) == {made[k].id for k in KEPT}
    assert folders(local) == {made[k].id for k in KEPT}  # nothing of the deleted ones is left
    for key in GONE:
        keys = [k for k in spy.deleted if k.startswith(made[key].id + "/")]
        assert keys[0] == naming.manifest_key(made[key].id) and len(keys) == 2
    # Oldest first, so a rotation cut short leaves the newer backups.
    order = [naming.id_from_key(k) for k in spy.deleted if k.endswith("manifest.json")]
    assert order == sorted(
        order, key=lambda i: next(m.started_at for m in made.values() if m.id == i)
    )


def test_rotation_report_table_and_json_show_every_decision(local: LocalStorage) -> None:
    """as_table has one uniform row per backup with action and reasons; to_json round-trips."""
    made = history(local)
    report = rotate([local], POLICY, now=NOW)
    rows = {r["backup"]: r for r in report.as_table()}
    assert all(set(r) == set(rows[made["day0"].id]) for r in rows.values())
    assert rows[made["day0"].id]["action"] == "keep"
    assert rows[made["day0"].id]["reasons"] == "newest verified; minimum count 1/1; last 1/3"
    assert rows[made["fresh"].id]["reasons"] == "unverified, in grace"
    assert rows[made["failed"].id]["action"] == "deleted"
    assert rows[made["failed"].id]["reasons"] == "failed verification"
    assert rows[made["day5"].id]["reasons"] == "no rule keeps it"
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["targets"][0]["deleted"] == report.deleted
    assert "deleted 5" in report.summary()


def test_dry_run_changes_nothing_and_reports_the_same_plan(local: LocalStorage) -> None:
    """A dry run leaves every file byte for byte, mtime included, and says what it would delete."""
    made = history(local)
    put_bytes(local, "auto_backup_2025-01-01T00-00-00Z/x.dump.zst", b"left by a killed run")
    _age_local_files(local, "auto_backup_2025-01-01T00-00-00Z", NOW - timedelta(days=5))
    before = snapshot(local.root)

    report = rotate([local], POLICY, now=NOW, dry_run=True)

    assert snapshot(local.root) == before
    assert report.ok and report.dry_run
    assert sorted(report.deleted) == sorted(made[k].id for k in GONE)
    assert report.targets[0].incomplete_removed == ["auto_backup_2025-01-01T00-00-00Z"]
    actions = {r["backup"]: r["action"] for r in report.as_table()}
    assert actions[made["day5"].id] == "would delete"
    after = report.targets[0].usage_after
    assert after is not None and after.backups == len(KEPT) and after.incomplete == 0
    # The real run then does exactly what the dry run announced.
    real = rotate([local], POLICY, now=NOW)
    assert real.deleted == report.deleted
    assert real.targets[0].incomplete_removed == report.targets[0].incomplete_removed


def test_dry_run_is_enforced_by_a_read_only_view(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if the delete step ignored dry_run, the read-only view refuses and nothing changes."""
    history(local)
    before = snapshot(local.root)
    views: list[Storage] = []

    class CountingView(ReadOnlyStorage):
        def __init__(self, inner: Storage) -> None:
            super().__init__(inner)
            views.append(self)

    real_delete = rotation._delete

    def buggy_delete(storage: Storage, manifest: Manifest, dry_run: bool, report: Any) -> None:
        real_delete(storage, manifest, False, report)  # a bug: forgets the dry run

    monkeypatch.setattr(rotation, "ReadOnlyStorage", CountingView)
    monkeypatch.setattr(rotation, "_delete", buggy_delete)
    report = rotate([local], POLICY, now=NOW, dry_run=True)

    assert len(views) == 1 and views[0].url == local.url
    assert snapshot(local.root) == before
    assert not report.ok and all("dry run: refused" in e for e in report.targets[0].errors)


def test_an_interrupted_rotation_is_finished_by_the_next_run(local: LocalStorage) -> None:
    """Stopped after a manifest was deleted: that backup is no longer listed (never half
    listed), its data stays, and the next rotation removes the rest."""
    made = history(local)
    crashing = Recording(local, fail_after_manifest=True)
    first = rotate([crashing], POLICY, now=NOW)

    victim = made["day5"].id  # oldest goes first
    assert not first.ok and "simulated crash" in first.targets[0].errors[0]
    assert victim not in listed(local)
    assert victim in folders(local)  # data left behind, no manifest: an incomplete backup
    assert [i.backup_id for i in catalog.list_incomplete(local)] == [victim]

    second = rotate([local], POLICY, now=NOW)
    assert second.ok and victim in second.targets[0].incomplete_removed
    assert folders(local) == {made[k].id for k in KEPT}


def test_a_backup_pinned_while_rotation_runs_is_not_deleted(local: LocalStorage) -> None:
    """The manifest is read again right before a delete: pinned meanwhile means skipped."""
    made = history(local)
    victim = made["day5"]

    class PinsDuringRotation(Recording):
        def stat(self, key: str) -> ObjectInfo | None:
            if key == naming.manifest_key(victim.id):  # first touched by the pre-delete re-read
                catalog.write_manifest(self.inner, victim.model_copy(update={"pinned": True}))
            return self.inner.stat(key)

    report = rotate([PinsDuringRotation(local)], POLICY, now=NOW)

    assert report.ok and report.targets[0].skipped == [victim.id]
    assert victim.id in listed(local) and victim.id not in report.deleted
    rows = {r["backup"]: r for r in report.as_table()}
    assert rows[victim.id]["action"] == "skipped"
    assert "changed since listed" in rows[victim.id]["reasons"]


def test_a_rotation_killed_between_manifest_and_data_is_finished(local: LocalStorage) -> None:
    """The state a SIGKILL leaves (manifest gone, data there) is cleaned by the next rotation."""
    made = history(local)
    victim = made["day4"].id
    local.delete(naming.manifest_key(victim))
    report = rotate([local], POLICY, now=NOW)
    assert victim in report.targets[0].incomplete_removed
    assert victim not in folders(local)


def test_incomplete_backups_are_removed_only_after_the_grace_period(local: LocalStorage) -> None:
    """Folders without a manifest: removed once older than the grace; a running one stays."""
    old_id, young_id = "auto_backup_2025-06-13T00-00-00Z", "auto_backup_2025-06-15T11-00-00Z"
    for backup_id, since in (
        (old_id, NOW - timedelta(days=2)),
        (young_id, NOW - timedelta(hours=1)),
    ):
        pending = {
            "id": backup_id,
            "database": "app",
            "server": "db:5432",
            "since": since.isoformat(),
        }
        put_bytes(local, naming.pending_key(backup_id), json.dumps(pending).encode())
        put_bytes(local, naming.object_key(backup_id, "part.dump.zst"), b"half a dump")
    make_backup(local, NOW - timedelta(days=1))

    report = rotate([local], POLICY, now=NOW)

    assert report.targets[0].incomplete_removed == [old_id]
    assert young_id in folders(local) and old_id not in folders(local)
    rows = {r["backup"]: r for r in report.as_table()}
    assert rows[old_id]["state"] == "incomplete" and rows[old_id]["action"] == "deleted"


def test_a_short_grace_never_removes_a_folder_a_backup_may_be_writing(local: LocalStorage) -> None:
    """BACKUP_FAILED_GRACE=0 still leaves incomplete folders younger than six hours alone."""
    backup_id = "auto_backup_2025-06-15T10-00-00Z"
    pending = {
        "id": backup_id,
        "database": "app",
        "server": "db:5432",
        "since": (NOW - timedelta(hours=2)).isoformat(),
    }
    put_bytes(local, naming.pending_key(backup_id), json.dumps(pending).encode())
    report = rotate([local], Policy(failed_grace=timedelta(0)), now=NOW)
    assert report.targets[0].incomplete_removed == [] and backup_id in folders(local)


def test_pinned_backups_survive_rotation_until_unpinned(tmp_path: Path) -> None:
    """pin rewrites the manifest on every target holding the backup; rotation keeps it; unpin
    lets the next rotation delete it."""
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    old = make_backup(primary, NOW - timedelta(days=40))
    make_backup(offsite, NOW - timedelta(days=40))  # the same id: an uploaded copy
    for storage in (primary, offsite):
        make_backup(storage, NOW - timedelta(days=1))

    assert pin([primary, offsite], old.id) == [primary.url, offsite.url]
    for storage in (primary, offsite):
        manifest = catalog.read_manifest(storage, old.id)
        assert manifest is not None and manifest.pinned
    report = rotate([primary, offsite], Policy(keep_last=1), now=NOW)
    assert old.id in listed(primary) and old.id in listed(offsite)
    assert {r["reasons"] for r in report.as_table() if r["backup"] == old.id} == {"pinned"}

    assert unpin([primary, offsite], old.id) == [primary.url, offsite.url]
    rotate([primary, offsite], Policy(keep_last=1), now=NOW)
    assert old.id not in listed(primary) and old.id not in listed(offsite)


def test_pin_refuses_unknown_and_path_like_ids(local: LocalStorage) -> None:
    """pin: an id nobody holds is BackupNotFoundError; a path is InvalidBackupIdError."""
    with pytest.raises(BackupNotFoundError, match="pgkeeper list"):
        pin([local], "auto_backup_2025-01-01T00-00-00Z")
    with pytest.raises(InvalidBackupIdError):
        pin([local], "../etc/passwd")


def test_each_target_rotates_with_its_own_policy(tmp_path: Path) -> None:
    """Per-target policies: keep 2 on the primary and 5 offsite, from overrides in settings."""
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    for d in range(6):
        for storage in (primary, offsite):
            make_backup(storage, NOW - timedelta(days=d))
    settings = Settings(_env_file=None, backup_max_backups=2)
    policies = policies_from_settings(settings, [primary, offsite])
    policies[offsite.url] = policies[offsite.url].with_overrides("max_backups=5")

    report = rotate([primary, offsite], policies, now=NOW)

    assert len(listed(primary)) == 2 and len(listed(offsite)) == 5
    assert report.targets[1].policy.startswith("last 5")
    with pytest.raises(ConfigError, match="no retention policy"):
        rotate([primary, offsite], {primary.url: Policy()}, now=NOW)


def test_the_primary_keeps_backups_not_yet_uploaded_offsite(tmp_path: Path) -> None:
    """A backup the offsite target has not received yet is held on the primary."""
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    uploaded = [make_backup(primary, NOW - timedelta(days=d)) for d in (5, 4)]
    for m in uploaded:
        make_backup(offsite, m.started_at)
    waiting = [make_backup(primary, NOW - timedelta(days=d)) for d in (3, 2, 1)]

    report = rotate([primary, offsite], Policy(keep_last=1), now=NOW)

    assert set(listed(primary)) == {m.id for m in waiting}  # uploaded ones rotated, others held
    reasons = {r["backup"]: r["reasons"] for r in report.as_table() if r["target"] == primary.url}
    assert reasons[waiting[0].id] == f"not yet uploaded to {offsite.url}"


def test_usage_is_measured_before_and_after_with_a_warning_over_threshold(
    local: LocalStorage,
) -> None:
    """Usage per target before/after rotation, and a warning above usage_warn_bytes."""
    history(local, NOW)
    report = rotate([local], Policy(keep_last=3, usage_warn_bytes=100), now=NOW)
    target = report.targets[0]
    assert target.usage_before is not None and target.usage_after is not None
    assert (target.usage_before.backups, target.usage_after.backups) == (9, 4)
    assert target.usage_after.bytes < target.usage_before.bytes
    assert any("over the warning threshold" in w for w in target.warnings)

    usage = usage_report([local], warn_bytes=10**9)
    assert usage.total == target.usage_after.bytes and not usage.warnings
    assert usage.as_table()[-1]["target"] == "total"


def test_one_failing_target_does_not_stop_the_others(tmp_path: Path) -> None:
    """A target that cannot be listed is an error in the report; the others still rotate."""
    good = LocalStorage(tmp_path / "good")
    for d in range(4):
        make_backup(good, NOW - timedelta(days=d))

    class Unlistable(LocalStorage):
        def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
            raise StorageError(f"cannot access {self.url}: permission denied")

    report = rotate([Unlistable(tmp_path / "broken"), good], Policy(keep_last=2), now=NOW)
    assert not report.ok and "cannot list" in report.targets[0].errors[0]
    assert len(listed(good)) == 2


# -- S3 (moto) ----------------------------------------------------------------------------------


def s3_storage(server: S3Server, bucket: str, **options: Any) -> Any:
    from pgkeeper.storage.s3 import S3Storage

    return S3Storage.from_url(f"s3://{bucket}/pg", None, client=server.client(), **options)


def s3_keys(storage: Any) -> list[tuple[str, int]]:
    return sorted((i.key, i.size) for i in storage.list())


def test_s3_rotation_deletes_the_planned_backups_and_dry_run_changes_nothing(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """On S3: a dry run lists the same deletions and leaves every object; the real run deletes
    them, manifest first."""
    storage = s3_storage(s3_server, s3_bucket)
    now = utcnow()
    made = history(storage, now)
    before = s3_keys(storage)

    dry = rotate([storage], POLICY, now=now, dry_run=True)
    assert s3_keys(storage) == before and dry.ok
    assert sorted(dry.deleted) == sorted(made[k].id for k in GONE)

    spy = Recording(storage)
    real = rotate([spy], POLICY, now=now)
    assert real.ok and real.deleted == dry.deleted
    assert set(listed(storage)) == {made[k].id for k in KEPT}
    assert folders(storage) == {made[k].id for k in KEPT}
    for key in GONE:
        keys = [k for k in spy.deleted if k.startswith(made[key].id + "/")]
        assert keys[0] == naming.manifest_key(made[key].id)


def test_s3_interrupted_rotation_is_finished_after_the_grace(
    s3_server: S3Server, s3_bucket: str
) -> None:
    """On S3 (upload dates are real): data left by a stopped rotation goes once past the grace."""
    storage = s3_storage(s3_server, s3_bucket)
    now = utcnow()
    made = history(storage, now)
    victim = made["day5"].id
    storage.delete(naming.manifest_key(victim))

    soon = rotate([storage], POLICY, now=now)
    assert victim in folders(storage) and victim not in soon.targets[0].incomplete_removed
    later = rotate([storage], POLICY, now=now + timedelta(days=2))
    assert victim in later.targets[0].incomplete_removed and victim not in folders(storage)


@pytest.fixture
def lock_bucket(s3_server: S3Server) -> Iterator[str]:
    """A bucket with Object Lock (hence versioning) enabled, removed after the test."""
    name = f"pgk-rotate-lock-{os.urandom(5).hex()}"
    s3_server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    yield name
    s3_server.remove_bucket(name)


def test_s3_object_lock_makes_backups_kept_by_lock_not_a_failure(
    s3_server: S3Server, lock_bucket: str
) -> None:
    """Backups under Object Lock retention are reported kept-by-lock; the run is ok and they
    stay listed, whole."""
    locked = s3_storage(s3_server, lock_bucket, object_lock_days=1)
    now = utcnow()
    made = history(locked, now)

    report = rotate([locked], POLICY, now=now)

    target = report.targets[0]
    assert report.ok and target.deleted == []
    assert sorted(target.kept_by_lock) == sorted(made[k].id for k in GONE)
    assert set(listed(locked)) == {m.id for m in made.values()}
    rows = {r["backup"]: r for r in report.as_table()}
    assert rows[made["day5"].id]["action"] == "kept-by-lock"
    assert "Object Lock" in rows[made["day5"].id]["reasons"]
    assert "kept-by-lock 5" in report.summary()


def test_s3_lock_on_data_only_writes_the_manifest_back(
    s3_server: S3Server, lock_bucket: str
) -> None:
    """Data locked, manifest not (rewritten by a process without lock days): the delete stops at
    the data, the manifest is written back and the backup is still listed and whole."""
    locked = s3_storage(s3_server, lock_bucket, object_lock_days=1)
    unlocked = s3_storage(s3_server, lock_bucket)
    now = utcnow()
    old = make_backup(locked, now - timedelta(days=3))
    catalog.write_manifest(unlocked, old)  # a new, unlocked version of the manifest
    make_backup(unlocked, now - timedelta(days=1))

    report = rotate([unlocked], Policy(keep_last=1), now=now)

    assert report.ok and report.targets[0].kept_by_lock == [old.id]
    assert "manifest written back" in report.targets[0].notes[old.id]
    assert old.id in listed(unlocked)
    assert catalog.read_manifest(unlocked, old.id) == old


def test_s3_incomplete_folder_under_lock_does_not_block_other_cleanup(
    s3_server: S3Server, lock_bucket: str
) -> None:
    """A killed backup's locked leftovers are kept-by-lock; other stale folders still go."""
    locked = s3_storage(s3_server, lock_bucket, object_lock_days=1)
    unlocked = s3_storage(s3_server, lock_bucket)
    put_bytes(locked, "auto_backup_2025-01-01T00-00-00Z/a.dump.zst", b"locked leftovers")
    put_bytes(unlocked, "auto_backup_2025-01-02T00-00-00Z/a.dump.zst", b"plain leftovers")

    report = rotate([unlocked], POLICY, now=utcnow() + timedelta(days=2))

    target = report.targets[0]
    assert report.ok
    assert target.incomplete_kept == ["auto_backup_2025-01-01T00-00-00Z"]
    assert target.incomplete_removed == ["auto_backup_2025-01-02T00-00-00Z"]


def test_per_target_policies_come_from_the_backup_retention_targets_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BACKUP_RETENTION_TARGETS (JSON, keyed by URL or kind) gives one target its own policy."""
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    for d in range(6):
        for storage in (primary, offsite):
            make_backup(storage, NOW - timedelta(days=d))
    monkeypatch.setenv("BACKUP_MAX_BACKUPS", "2")
    monkeypatch.setenv("BACKUP_RETENTION_TARGETS", json.dumps({offsite.url: "max_backups=5"}))
    settings = Settings(_env_file=None)

    report = rotate(
        [primary, offsite], policies_from_settings(settings, [primary, offsite]), now=NOW
    )

    assert len(listed(primary)) == 2 and len(listed(offsite)) == 5
    assert report.ok
