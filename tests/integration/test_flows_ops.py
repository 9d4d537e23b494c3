"""The operations flows end to end under the session-wide Prefect test server: rotate (its plan
artifact, dry run, and the step inside backup), upload to S3, and monitor (a healthy system, a
stale backup, a missing offsite copy)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from prefect.states import State

from pgkeeper import catalog
from pgkeeper.manifest import utcnow
from pgkeeper.settings import load_settings
from pgkeeper.storage import Storage, targets
from tests.integration.test_rotate import make_backup
from tests.servers.s3 import S3Server
from tests.support.flows import artifact_data, task_runs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _storages() -> list[Storage]:
    """The targets the flows see (settings from this test's environment)."""
    return targets(load_settings(_env_file=None))


def _ids(storage: Storage) -> list[str]:
    return [m.id for m in catalog.list_backups(storage)]


def _four_daily_backups(storage: Storage) -> list[str]:
    """Four verified backups of one database, a day apart, newest first."""
    now = utcnow()
    return [make_backup(storage, now - timedelta(days=d, hours=1)).id for d in range(4)]


# -- rotate ------------------------------------------------------------------------------------


def test_rotate_deletes_what_the_policy_does_not_keep_and_publishes_the_plan(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With BACKUP_MAX_BACKUPS=2 the rotate run deletes the two oldest of four backups and
    publishes the plan (every backup, its action and reason) and the usage table."""
    from flows.rotate import rotate

    monkeypatch.setenv("BACKUP_MAX_BACKUPS", "2")
    primary = _storages()[0]
    ids = _four_daily_backups(primary)

    state = rotate(return_state=True)

    assert state.is_completed(), state.message
    assert _ids(primary) == ids[:2]
    artifacts = artifact_data(state)
    plan = {row["backup"]: row for row in artifacts["rotation-plan"]}
    assert [plan[i]["action"] for i in ids] == ["keep", "keep", "deleted", "deleted"]
    assert plan[ids[3]]["reasons"] == "no rule keeps it"
    usage = artifacts["storage-usage"]
    assert usage[-1]["target"] == "total" and usage[-1]["backups"] == 2


def test_a_dry_run_changes_nothing_and_shows_what_it_would_delete(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rotate(dry_run=True) deletes nothing; its plan says "would delete" for the same two."""
    from flows.rotate import rotate

    monkeypatch.setenv("BACKUP_MAX_BACKUPS", "2")
    primary = _storages()[0]
    ids = _four_daily_backups(primary)
    before = sorted(p.relative_to(flow_env) for p in flow_env.rglob("*"))

    state = rotate(dry_run=True, return_state=True)

    assert state.is_completed(), state.message
    assert sorted(p.relative_to(flow_env) for p in flow_env.rglob("*")) == before
    plan = {row["backup"]: row["action"] for row in artifact_data(state)["rotation-plan"]}
    assert [plan[i] for i in ids] == ["keep", "keep", "would delete", "would delete"]


def test_the_backup_flow_rotates_after_backing_up_unless_told_not_to(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup run applies its database's retention after the upload step (with its plan
    artifact), leaving other databases' backups to their own runs; with rotate=False it
    leaves old backups alone."""
    from flows.backup import backup

    monkeypatch.setenv("BACKUP_MAX_BACKUPS", "1")
    primary = _storages()[0]
    ids = _four_daily_backups(primary)  # another database's: planned on their own

    kept = backup(rotate=False, return_state=True)
    assert kept.is_completed(), kept.message
    assert set(ids) <= set(_ids(primary))
    assert "rotation-plan" not in artifact_data(kept)

    rotated = backup(return_state=True)

    assert rotated.is_completed(), rotated.message
    # Of the real database only the newest verified backup remains; the other's are untouched.
    assert set(_ids(primary)) == {rotated.result(), *ids}
    assert {"rotate", "inventory", "backup-verdict"} <= set(task_runs(rotated))
    actions = {row["backup"]: row["action"] for row in artifact_data(rotated)["rotation-plan"]}
    assert actions[kept.result()] == "deleted" and actions[rotated.result()] == "keep"


# -- upload ------------------------------------------------------------------------------------


def _use_s3(monkeypatch: pytest.MonkeyPatch, server: S3Server, bucket: str) -> None:
    for name, value in server.env(bucket).items():
        monkeypatch.setenv(name, value)


def test_upload_copies_every_missing_backup_to_s3_and_says_where(
    flow_env: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without an id the upload run copies every backup S3 lacks and lists each copy; a second
    run of one id finds it already there."""
    from flows.upload import upload

    local = _storages()[0]
    ids = _four_daily_backups(local)
    _use_s3(monkeypatch, s3_server, s3_bucket)
    primary, s3 = _storages()

    state = upload(return_state=True)

    assert state.is_completed(), state.message
    assert primary.url == local.url and sorted(_ids(s3)) == sorted(ids)
    rows = artifact_data(state)["upload-report"]
    assert sorted((r["backup"], r["to"], r["result"]) for r in rows) == sorted(
        (i, s3.url, "copied") for i in ids
    )

    again = upload(backup_id=ids[0], return_state=True)

    assert again.is_completed(), again.message
    assert [r["result"] for r in artifact_data(again)["upload-report"]] == ["already there"]


def test_an_upload_failure_is_retried_only_when_every_failed_copy_was_transient() -> None:
    """The upload task's error is TransientStorageError (retried, resumed) only when every
    failed copy failed for a transient reason; one permanent failure makes it permanent."""
    from pgkeeper.errors import TransientStorageError
    from pgkeeper.upload import UploadReport
    from tasks.upload import upload_error

    def report(failed: dict[str, str], transient: list[str]) -> UploadReport:
        return UploadReport("b", "/local", failed=failed, transient=transient)

    assert upload_error([report({}, [])]) is None
    flaky = upload_error([report({"s3://a": "503"}, ["s3://a"])])
    assert isinstance(flaky, TransientStorageError)
    mixed = upload_error([report({"s3://a": "503", "gs://b": "403"}, ["s3://a"])])
    assert mixed is not None and not isinstance(mixed, TransientStorageError)
    assert str(mixed) == "upload failed: b -> s3://a: 503; b -> gs://b: 403"


def test_a_permanent_upload_failure_is_reported_then_fails_the_run_without_retries(
    flow_env: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source copy that no longer matches its checksum cannot be fixed by retrying: one
    attempt, the report says which copy failed and why, then the run fails; nothing is
    listed on S3."""
    from flows.upload import upload

    local = _storages()[0]
    backup_id = _four_daily_backups(local)[0]
    manifest, _ = catalog.find([local], backup_id)
    data = flow_env / backup_id / manifest.objects[0].name
    data.write_bytes(bytes(len(data.read_bytes())))  # same size, other bytes
    _use_s3(monkeypatch, s3_server, s3_bucket)

    state = upload(backup_id=backup_id, return_state=True)

    assert state.is_failed()
    assert f"upload failed: {backup_id} -> s3://{s3_bucket}" in (state.message or "")
    assert "the source changed or is corrupt" in (state.message or "")
    assert task_runs(state)["upload-backups"].run_count == 1
    rows = artifact_data(state)["upload-report"]
    assert [(r["backup"], r["result"]) for r in rows] == [(backup_id, "FAILED")]
    assert _ids(_storages()[1]) == []


# -- monitor -----------------------------------------------------------------------------------


def _statuses(state: State) -> dict[str, str]:
    report = artifact_data(state)["monitor-report"]
    rows = [
        line.split(" | ")
        for line in report.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    return {cells[1]: cells[2] for cells in rows[1:]}  # | subject | check | status | detail |


def test_monitor_passes_when_fresh_verified_and_restore_tested_and_fails_when_stale(
    flow_env: Path,
) -> None:
    """A fresh, verified, restore-tested backup passes every check (offsite skipped: none);
    the same backup recorded as started three days ago fails the run on freshness."""
    from flows.backup import backup
    from flows.monitor import monitor
    from flows.restore_test import restore_test

    backup_id = backup()
    assert restore_test(return_state=True).is_completed()

    healthy = monitor(return_state=True)

    assert healthy.is_completed(), healthy.message
    assert _statuses(healthy) == {
        "freshness": "ok", "verified": "ok", "size": "ok", "restore-test": "ok",
        "offsite": "skipped", "usage": "ok", "quota": "skipped", "disk": "ok", "storage": "ok",
        "scheduler": "skipped",
    }  # fmt: skip
    assert "Backup health: OK" in artifact_data(healthy)["monitor-report"]

    manifest, storage = catalog.find(_storages(), backup_id)
    three_days = timedelta(days=3)
    catalog.write_manifest(
        storage,
        manifest.model_copy(
            update={
                "started_at": manifest.started_at - three_days,
                "finished_at": manifest.finished_at - three_days,
            }
        ),
    )

    stale = monitor(return_state=True)

    assert stale.is_failed()
    assert "1 of 5 checks failed: freshness" in (stale.message or "")
    assert f"the newest backup {backup_id} started 3d ago" in (stale.message or "")
    assert _statuses(stale)["freshness"] == "**FAILED**"
    assert task_runs(stale)["monitor-verdict"].run_count == 1


def test_monitor_fails_when_an_offsite_target_lacks_the_newest_backup(
    flow_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offsite target added after the backup lacks it: the offsite check fails the run and
    names the target; an upload run makes the monitor pass again."""
    from flows.backup import backup
    from flows.monitor import monitor
    from flows.upload import upload

    backup_id = backup()
    offsite = tmp_path / "offsite"
    monkeypatch.setenv("BACKUP_TARGETS", str(offsite))
    offsite_url = _storages()[1].url

    missing = monitor(grace_minutes=0, return_state=True)

    assert missing.is_failed()
    assert f"{offsite_url} lacks the newest backup {backup_id}" in (missing.message or "")
    assert _statuses(missing)["offsite"] == "**FAILED**"

    assert upload(return_state=True).is_completed()
    assert monitor(grace_minutes=0, return_state=True).is_completed()
