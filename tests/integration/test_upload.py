"""Upload to offsite targets: per-target failures, no churn against offsite retention, resume."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper import catalog, naming
from pgkeeper.backup import run_backup
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import open_storage, targets
from pgkeeper.upload import upload_backup, upload_missing
from pgkeeper.verify import verify_backup
from tests.servers.postgres import PgCluster
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.integration


@pytest.fixture
def source_db(pg_cluster: PgCluster) -> Iterator[str]:
    name = f"upload_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 500) g",
        dbname=name,
    )
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


def _settings(
    monkeypatch: pytest.MonkeyPatch, s3: S3Server, url: str, backup_dir: Path, targets: str
) -> Settings:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return load_settings(
        database_url=url, backup_dir=str(backup_dir), backup_targets=targets, _env_file=None
    )


def test_a_copy_deleted_by_offsite_retention_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_bucket: str,
    source_db: str,
    tmp_path: Path,
) -> None:
    """Once a proven copy landed offsite, upload_missing does not resend it after rotation."""
    settings = _settings(monkeypatch, s3_server, source_db, tmp_path, f"s3://{s3_bucket}/db")
    manifest = run_backup(settings)
    verify_backup(settings, manifest.id)
    (report,) = upload_missing(settings)
    assert report.copied_to == [f"s3://{s3_bucket}/db"]
    primary, offsite = targets(settings)
    assert catalog.read_manifest(primary, manifest.id).uploads  # type: ignore[union-attr]

    catalog.delete_backup(offsite, manifest.id)  # what offsite retention does
    assert upload_missing(settings) == []
    assert catalog.read_manifest(offsite, manifest.id) is None
    # An explicit upload of that id still copies it.
    assert upload_backup(settings, manifest.id).copied_to == [f"s3://{s3_bucket}/db"]


def test_an_unverified_backup_waits_for_its_verification(
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_bucket: str,
    source_db: str,
    tmp_path: Path,
) -> None:
    """upload_missing leaves a backup whose verification has not run yet."""
    settings = _settings(monkeypatch, s3_server, source_db, tmp_path, f"s3://{s3_bucket}")
    manifest = run_backup(settings)
    assert upload_missing(settings) == []
    verify_backup(settings, manifest.id)
    assert [r.backup_id for r in upload_missing(settings)] == [manifest.id]


def test_a_missing_bucket_fails_its_target_only(
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_bucket: str,
    source_db: str,
    tmp_path: Path,
) -> None:
    """One unreachable offsite target is reported per target; the others still get the copy."""
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}"
    good = f"s3://{s3_bucket}"
    settings = _settings(monkeypatch, s3_server, source_db, tmp_path, f"{missing},{good}")
    manifest = run_backup(settings)
    verify_backup(settings, manifest.id)
    report = upload_backup(settings, manifest.id)
    assert report.copied_to == [good]
    assert list(report.failed) == [missing]
    assert "no-such-bucket" in report.failed[missing]
    assert missing not in report.transient  # a missing bucket is not worth retrying


def test_upload_resumes_without_resending_a_proven_object(
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,
    s3_bucket: str,
    source_db: str,
    tmp_path: Path,
) -> None:
    """An object already offsite with the right checksum is kept; only the manifest is added."""
    settings = _settings(monkeypatch, s3_server, source_db, tmp_path, f"s3://{s3_bucket}")
    manifest = run_backup(settings)
    verify_backup(settings, manifest.id)
    offsite = open_storage(f"s3://{s3_bucket}", settings)
    obj = manifest.objects[0]
    key = naming.object_key(manifest.id, obj.name)
    local = targets(settings)[0].local_path(key)
    assert local is not None
    with offsite.open_write(key, metadata={"sha256": obj.sha256}) as out:
        out.write(local.read_bytes())  # a run that died after the data, before the manifest
    before = offsite.stat(key)
    time.sleep(1.1)  # S3 times have second resolution: a resend would now show a later time
    report = upload_backup(settings, manifest.id)
    assert report.copied_to == [f"s3://{s3_bucket}"]
    after = offsite.stat(key)
    assert before is not None and after is not None
    assert after.modified == before.modified  # not sent again
    assert catalog.read_manifest(offsite, manifest.id) is not None
