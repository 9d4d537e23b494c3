"""The operations flows end to end under the session-wide Prefect test server: rotate (its plan
artifact, dry run, and the step inside backup), upload to S3, and monitor (a healthy system, a
stale backup, a missing offsite copy)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from pgkeeper import catalog
from pgkeeper.manifest import utcnow
from pgkeeper.settings import load_settings
from pgkeeper.storage import Storage, targets
from tests.integration.test_rotate import make_backup
from tests.servers.s3 import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def ops_env(
    prefect_server: str, sample_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Tasks read settings from the environment: the sample db, backups in a tmp folder."""
    backups = tmp_path / "backups"
    monkeypatch.setenv("DATABASE_URL", sample_db)
    monkeypatch.setenv("BACKUP_DIR", str(backups))
    monkeypatch.setenv("BACKUP_COMPRESSION_THREADS", "1")
    return backups


def _storages() -> list[Storage]:
    """The targets the flows see (settings from this test's environment)."""
    return targets(load_settings(_env_file=None))


def _ids(storage: Storage) -> list[str]:
    return [m.id for m in catalog.list_backups(storage)]


def _artifacts(state: State) -> dict[str, Any]:
    """Artifacts of the run by key; table data decoded to a list of rows."""
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    data = {a.key: a.data for a in found if a.key}
    return {k: json.loads(v) if isinstance(v, str) and v[:1] == "[" else v for k, v in data.items()}


def _task_runs(state: State) -> dict[str, TaskRun]:
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def _four_daily_backups(storage: Storage) -> list[str]:
    """Four verified backups of one database, a day apart, newest first."""
    now = utcnow()
    return [make_backup(storage, now - timedelta(days=d, hours=1)).id for d in range(4)]


# -- rotate ------------------------------------------------------------------------------------


def test_rotate_deletes_what_the_policy_does_not_keep_and_publishes_the_plan(
    ops_env: Path, monkeypatch: pytest.MonkeyPatch
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
    artifacts = _artifacts(state)
    plan = {row["backup"]: row for row in artifacts["rotation-plan"]}
    assert [plan[i]["action"] for i in ids] == ["keep", "keep", "deleted", "deleted"]
    assert plan[ids[3]]["reasons"] == "no rule keeps it"
    usage = artifacts["storage-usage"]
    assert usage[-1]["target"] == "total" and usage[-1]["backups"] == 2


def test_a_dry_run_changes_nothing_and_shows_what_it_would_delete(
    ops_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rotate(dry_run=True) deletes nothing; its plan says "would delete" for the same two."""
    from flows.rotate import rotate

    monkeypatch.setenv("BACKUP_MAX_BACKUPS", "2")
    primary = _storages()[0]
    ids = _four_daily_backups(primary)
    before = sorted(p.relative_to(ops_env) for p in ops_env.rglob("*"))

    state = rotate(dry_run=True, return_state=True)

    assert state.is_completed(), state.message
    assert sorted(p.relative_to(ops_env) for p in ops_env.rglob("*")) == before
    plan = {row["backup"]: row["action"] for row in _artifacts(state)["rotation-plan"]}
    assert [plan[i] for i in ids] == ["keep", "keep", "would delete", "would delete"]


def test_the_backup_flow_rotates_after_backing_up_unless_told_not_to(
    ops_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup run applies retention after the upload step (with its plan artifact); with
    rotate=False it leaves old backups alone."""
    from flows.backup import backup

    monkeypatch.setenv("BACKUP_MAX_BACKUPS", "1")
    primary = _storages()[0]
    ids = _four_daily_backups(primary)  # another database's: planned on their own

    kept = backup(rotate=False, return_state=True)
    assert kept.is_completed(), kept.message
    assert set(ids) <= set(_ids(primary))
    assert "rotation-plan" not in _artifacts(kept)

    rotated = backup(return_state=True)

    assert rotated.is_completed(), rotated.message
    # Of the real database only the newest verified backup remains; of the other one, too.
    assert set(_ids(primary)) == {rotated.result(), ids[0]}
    assert {"rotate", "inventory", "rotation-verdict"} <= set(_task_runs(rotated))
    actions = {row["backup"]: row["action"] for row in _artifacts(rotated)["rotation-plan"]}
    assert actions[kept.result()] == "deleted" and actions[rotated.result()] == "keep"


# -- upload ------------------------------------------------------------------------------------


def _use_s3(monkeypatch: pytest.MonkeyPatch, server: S3Server, bucket: str) -> None:
    for name, value in server.env(bucket).items():
        monkeypatch.setenv(name, value)


def test_upload_copies_every_missing_backup_to_s3_and_says_where(
    ops_env: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
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
    rows = _artifacts(state)["upload-report"]
    assert sorted((r["backup"], r["to"], r["result"]) for r in rows) == sorted(
        (i, s3.url, "copied") for i in ids
    )

    again = upload(backup_id=ids[0], return_state=True)

    assert again.is_completed(), again.message
    assert [r["result"] for r in _artifacts(again)["upload-report"]] == ["already there"]


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
    ops_env: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source copy that no longer matches its checksum cannot be fixed by retrying: one
    attempt, the report says which copy failed and why, then the run fails; nothing is
    listed on S3."""
    from flows.upload import upload

    local = _storages()[0]
    backup_id = _four_daily_backups(local)[0]
    manifest, _ = catalog.find([local], backup_id)
    data = ops_env / backup_id / manifest.objects[0].name
    data.write_bytes(bytes(len(data.read_bytes())))  # same size, other bytes
    _use_s3(monkeypatch, s3_server, s3_bucket)

    state = upload(backup_id=backup_id, return_state=True)

    assert state.is_failed()
    assert f"upload failed: {backup_id} -> s3://{s3_bucket}" in (state.message or "")
    assert "the source changed or is corrupt" in (state.message or "")
    assert _task_runs(state)["upload-backups"].run_count == 1
    rows = _artifacts(state)["upload-report"]
    assert [(r["backup"], r["result"]) for r in rows] == [(backup_id, "FAILED")]
    assert _ids(_storages()[1]) == []


# -- monitor -----------------------------------------------------------------------------------


def _statuses(state: State) -> dict[str, str]:
    report = _artifacts(state)["monitor-report"]
    rows = [
        line.split(" | ")
        for line in report.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    return {cells[0].lstrip("| "): cells[1] for cells in rows[1:]}


def test_monitor_passes_when_fresh_verified_and_restore_tested_and_fails_when_stale(
    ops_env: Path,
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
        "freshness": "ok", "verified": "ok", "restore-test": "ok", "offsite": "skipped",
        "usage": "ok", "storage": "ok",
    }  # fmt: skip
    assert "Backup health: OK" in _artifacts(healthy)["monitor-report"]

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
    assert "1 of 6 checks failed: freshness" in (stale.message or "")
    assert f"the newest backup {backup_id} started 3d ago" in (stale.message or "")
    assert _statuses(stale)["freshness"] == "**FAILED**"
    assert _task_runs(stale)["monitor-verdict"].run_count == 1


def test_monitor_fails_when_an_offsite_target_lacks_the_newest_backup(
    ops_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
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
