"""Point-in-time recovery with the archive in S3 (moto) and GCS (the emulator): archive_command
and restore_command talk to the cloud target through the env file, a base backup streams
there, and a restore from it brings back every commit; a local primary with an S3 offsite
target gets its WAL copied by the pusher, so a restore works from S3 alone, encrypted too
(every object in the bucket but the manifests an age file, restored with the identity)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pyrage
import pytest
import zstandard
from pyrage import x25519

from pgkeeper import wal
from pgkeeper.storage import LocalStorage
from tests.servers import free_port
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server
from tests.support.cli import one_line_error
from tests.support.pitr import (
    Archiving,
    archiving_cluster,
    give_to_server,
    restored,
    rows,
    shared_dir,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGE_MAGIC = b"age-encryption.org/v1\n"
MARKER = "PGK-PITR-S3-MARKER-c41f09a3"


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


def wait_offsite(arch: Archiving, server: S3Server, bucket: str, prefix: str) -> set[str]:
    """Wait until every WAL file of the local primary has its copy under prefix/ in S3 (the
    pusher copies right after each acknowledgement); the names copied."""
    system = int(arch.cluster.query("SELECT system_identifier FROM pg_control_system()")[0][0])
    local = set(wal.list_archive(LocalStorage(arch.backups), system).files)
    deadline = time.monotonic() + 30
    client = server.client()
    while True:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/wal/{system}/")
        there = {k["Key"].rsplit("/", 1)[1].split("-")[0] for k in listed.get("Contents", [])}
        if local <= there:
            return there
        assert time.monotonic() < deadline, f"not copied offsite: {local - there}"
        time.sleep(0.2)


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
    there = wait_offsite(arch, s3_server, s3_bucket, "offsite")
    assert last in there
    shutil.rmtree(arch.backups)  # the primary is lost
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder), "--start",
                        "--port", str(port), BACKUP_DIR=url, BACKUP_TARGETS="")  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2]


@pytest.fixture
def sealed_offsite(
    server_pgkeeper: Path, s3_server: S3Server, s3_bucket: str
) -> Iterator[tuple[Archiving, str, Path]]:
    """The offsite setup with BACKUP_ENCRYPTION_RECIPIENTS from the start, and the identity
    (readable by the server's user: the restored server's restore_command decrypts)."""
    keys = shared_dir("pgkeeper-pitr-keys-")
    identity = x25519.Identity.generate()
    key_file = keys / "restore-key.txt"
    key_file.write_text(f"{identity}\n")
    key_file.chmod(0o600)
    give_to_server(key_file)
    url = f"s3://{s3_bucket}/sealed"
    extra = {
        "BACKUP_TARGETS": url,
        "BACKUP_ENCRYPTION_RECIPIENTS": str(identity.to_public()),
        **s3_settings(s3_server),
    }
    try:
        with archiving_cluster(server_pgkeeper, extra=extra) as arch:
            yield arch, url, key_file
    finally:
        shutil.rmtree(keys, ignore_errors=True)


def test_encrypted_wal_and_base_backup_reach_s3_as_age_files_and_restore_from_there(
    sealed_offsite: tuple[Archiving, str, Path], s3_server: S3Server, s3_bucket: str
) -> None:
    """With encryption on, the pusher's offsite copies of WAL and the base backup's upload are
    age files: every object in the bucket but the (readable by design) manifests starts with
    the age header, and a marker planted in the database is in none of them. With the local
    folder gone, a restore from S3 alone stops in one line without the identity and with it
    brings back every commit."""
    arch, url, key_file = sealed_offsite
    arch.cluster.execute("CREATE TABLE pitr_rows (v int PRIMARY KEY)")
    arch.cluster.execute("CREATE TABLE notes (body text)")
    arch.cluster.execute(
        f"INSERT INTO notes SELECT '{MARKER} ' || g FROM generate_series(1, 300) g"  # noqa: S608
    )
    arch.commit(1)
    made = arch.cli("base-backup", "--json")
    assert made.returncode == 0, made.stderr
    assert url in json.loads(made.stdout)["locations"]
    arch.commit(2)
    last = arch.switch_and_wait()
    assert last in wait_offsite(arch, s3_server, s3_bucket, "sealed")
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="sealed/")["Contents"]
    identity = x25519.Identity.from_str(key_file.read_text().strip())
    sealed = {"wal": 0, "base": 0}
    in_plaintext = 0
    for item in listed:
        body = client.get_object(Bucket=s3_bucket, Key=item["Key"])["Body"].read()
        assert MARKER.encode() not in body, item["Key"]
        if item["Key"].endswith("/manifest.json"):
            continue
        assert item["Key"].endswith(".age") and body.startswith(AGE_MAGIC), item["Key"]
        sealed["wal" if item["Key"].startswith("sealed/wal/") else "base"] += 1
        # What it decrypts to holds the marker: the checks above could fail.
        plain = zstandard.ZstdDecompressor().decompressobj().decompress(
            pyrage.decrypt(body, [identity])
        )
        in_plaintext += MARKER.encode() in plain
    assert sealed["wal"] >= 2 and sealed["base"] == 1, sealed
    assert in_plaintext >= 1
    shutil.rmtree(arch.backups)  # the primary is lost
    folder = shared_dir("pgkeeper-restore-") / "data"
    missing = arch.cli("pitr", "restore", "--latest", "--to", str(folder), BACKUP_DIR=url,
                       BACKUP_TARGETS="")  # fmt: skip
    assert "BACKUP_ENCRYPTION_IDENTITY_FILE" in one_line_error(missing, 2)
    assert not folder.exists()
    port = free_port("127.0.0.1")
    with restored(folder):
        done = arch.cli("pitr", "restore", "--latest", "--to", str(folder), "--start",
                        "--port", str(port), "--identity", str(key_file), BACKUP_DIR=url,
                        BACKUP_TARGETS="")  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2]
        assert rows_count(arch, port) == 300


def rows_count(arch: Archiving, port: int) -> int:
    url = f"postgresql://postgres:{arch.cluster.password}@127.0.0.1:{port}/postgres"
    with psycopg.connect(url, connect_timeout=10) as conn:
        found = conn.execute("SELECT count(*) FROM notes WHERE body LIKE %s", (MARKER + "%",))
        return int(found.fetchone()[0])  # type: ignore[index]
