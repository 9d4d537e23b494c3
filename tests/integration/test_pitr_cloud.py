"""Point-in-time recovery with the archive in S3 (moto) and GCS (the emulator): archive_command
and restore_command talk to the cloud target through the env file, a base backup streams
there, and a restore from it brings back every commit; a local primary with an S3 offsite
target gets its WAL copied by the pusher, so a restore works from S3 alone."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper import wal
from pgkeeper.storage import LocalStorage
from tests.servers import free_port
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server
from tests.support.pitr import Archiving, archiving_cluster, restored, rows, shared_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def round_trip(arch: Archiving, **env: str) -> None:
    """Commit, base backup, commit, archive; restore --latest on a started server: all rows."""
    arch.cluster.execute("CREATE TABLE pitr_rows (v int PRIMARY KEY)")
    arch.commit(1)
    made = arch.cli("base-backup", "--json", **env)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["state"] == "verified"
    arch.commit(2)
    arch.switch_and_wait()
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder), "--start",
                        "--port", str(port), **env)  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2]


def s3_settings(server: S3Server) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "BACKUP_S3_REGION": server.region,
        "BACKUP_S3_ENDPOINT_URL": server.endpoint_url,
    }


def test_archive_and_restore_with_s3_as_the_primary(
    server_pgkeeper: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    """BACKUP_DIR=s3://bucket/prefix: WAL and the base backup land in S3 and restore from it."""
    with archiving_cluster(
        server_pgkeeper, f"s3://{s3_bucket}/pitr", extra=s3_settings(s3_server)
    ) as arch:
        round_trip(arch)
        keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert any(k.startswith("pitr/wal/") and k.endswith(".zst") for k in keys)
        assert any(k.startswith("pitr/base_") and k.endswith("manifest.json") for k in keys)


def test_archive_and_restore_with_gcs_as_the_primary(
    server_pgkeeper: Path, gcs_server: GcsServer, gcs_bucket: str
) -> None:
    """BACKUP_DIR=gs://bucket/prefix (the emulator reached through STORAGE_EMULATOR_HOST in
    the server's environment, as a real server would have its credentials)."""
    emulator = {"STORAGE_EMULATOR_HOST": gcs_server.endpoint}
    with archiving_cluster(
        server_pgkeeper, f"gs://{gcs_bucket}/pitr", server_env=emulator
    ) as arch:
        round_trip(arch, **emulator)
        names = [b.name for b in gcs_server.client().list_blobs(gcs_bucket)]
        assert any(n.startswith("pitr/wal/") for n in names)


@pytest.fixture
def offsite(
    server_pgkeeper: Path, s3_server: S3Server, s3_bucket: str
) -> Iterator[tuple[Archiving, str]]:
    url = f"s3://{s3_bucket}/offsite"
    with archiving_cluster(
        server_pgkeeper, extra={"BACKUP_TARGETS": url, **s3_settings(s3_server)}
    ) as arch:
        yield arch, url


def test_the_pusher_copies_wal_offsite_and_a_restore_needs_only_s3(
    offsite: tuple[Archiving, str], s3_server: S3Server, s3_bucket: str
) -> None:
    """With a local primary and an S3 offsite target, each archived segment is copied to S3
    right after it is acknowledged (and base-backup uploads its backup): with the local
    folder gone, a restore from S3 alone brings back every commit."""
    arch, url = offsite
    arch.cluster.execute("CREATE TABLE pitr_rows (v int PRIMARY KEY)")
    arch.commit(1)
    made = arch.cli("base-backup", "--json")
    assert made.returncode == 0, made.stderr
    assert url in json.loads(made.stdout)["locations"]
    arch.commit(2)
    last = arch.switch_and_wait()
    system = int(arch.cluster.query("SELECT system_identifier FROM pg_control_system()")[0][0])
    local = sorted(wal.list_archive(LocalStorage(arch.backups), system).files)
    deadline = time.monotonic() + 30
    client = s3_server.client()
    while True:
        listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=f"offsite/wal/{system}/")
        there = {k["Key"].rsplit("/", 1)[1].split("-")[0] for k in listed.get("Contents", [])}
        if set(local) <= there:
            break
        assert time.monotonic() < deadline, f"not copied offsite: {set(local) - there}"
        time.sleep(0.2)
    assert last in there
    shutil.rmtree(arch.backups)  # the primary is lost
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder), "--start",
                        "--port", str(port), BACKUP_DIR=url, BACKUP_TARGETS="")  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2]
