"""End to end: back up, upload to S3 and GCS, lose the local folder, restore from each copy."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper import catalog
from pgkeeper.backup import run_backup
from pgkeeper.restore import restore_backup
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from pgkeeper.upload import upload_backup
from pgkeeper.verify import verify_backup
from tests.fidelity import compare
from tests.servers.gcs import GcsServer
from tests.servers.postgres import PgCluster
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.integration


@pytest.fixture
def rich_db(pg_cluster: PgCluster) -> Iterator[str]:
    """A database holding the fidelity schema (every hard type and object kind)."""
    name = f"offsite_src_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    compare.load_schema(pg_cluster.url(name))
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_restore_from_s3_and_from_gcs_after_the_local_folder_is_lost(
    fmt: str,
    monkeypatch: pytest.MonkeyPatch,
    pg_cluster: PgCluster,
    s3_server: S3Server,
    s3_bucket: str,
    gcs_server: GcsServer,
    gcs_bucket: str,
    rich_db: str,
    tmp_path: Path,
) -> None:
    """Copies proven on S3 and GCS each restore to a database identical to the source."""
    for key, value in {**s3_server.env(s3_bucket), **gcs_server.env(gcs_bucket)}.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "backups"
    settings = load_settings(
        database_url=rich_db,
        backup_dir=str(local),
        backup_format=fmt,
        backup_compression="gzip" if fmt == "directory" else "zstd",
        _env_file=None,
    )
    manifest = run_backup(settings)
    verify_backup(settings, manifest.id)
    report = upload_backup(settings, manifest.id)
    assert report.ok, report.failed
    assert sorted(report.copied_to) == [f"gs://{gcs_bucket}", f"s3://{s3_bucket}"]

    shutil.rmtree(local)  # the database host's disk is gone
    source = compare.snapshot(rich_db)
    entries = catalog.list_all(targets(settings))
    assert [e.id for e in entries] == [manifest.id]
    assert sorted(entries[0].locations) == [f"gs://{gcs_bucket}", f"s3://{s3_bucket}"]

    from_s3 = f"from_s3_{uuid.uuid4().hex[:8]}"
    result = restore_backup(settings, manifest.id, pg_cluster.url(from_s3))
    assert result.source == f"s3://{s3_bucket}"  # the first target holding a copy
    compare.assert_same(source, compare.snapshot(pg_cluster.url(from_s3)))

    monkeypatch.delenv("AWS_S3_BUCKET")  # only GCS left
    gcs_only = load_settings(
        database_url=rich_db, backup_dir=str(tmp_path / "empty"), _env_file=None
    )
    from_gcs = f"from_gcs_{uuid.uuid4().hex[:8]}"
    result = restore_backup(gcs_only, manifest.id, pg_cluster.url(from_gcs))
    assert result.source == f"gs://{gcs_bucket}"
    compare.assert_same(source, compare.snapshot(pg_cluster.url(from_gcs)))
    for name in (from_s3, from_gcs):
        pg_cluster.drop_database(name)
