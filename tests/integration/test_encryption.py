"""Encryption at rest (issue 14): age in the backup stream, and the restore side's identity.

Every test goes through the real `pgkeeper` command or the core with real servers: backups are
encrypted with BACKUP_ENCRYPTION_RECIPIENTS (public keys only), and decrypted where
BACKUP_ENCRYPTION_IDENTITY_FILE (or --identity) names the private key. Keys are made the way a
user makes them: `age-keygen` (Debian's `age`) and `ssh-keygen`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fidelity import compare
from tests.servers.postgres import PgCluster
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

AGE = shutil.which("age")
AGE_KEYGEN = shutil.which("age-keygen")
FORMATS = ("custom", "plain", "directory")
COMPRESSIONS = ("zstd", "gzip", "none")
AGE_MAGIC = b"age-encryption.org/v1\n"


@dataclass(frozen=True)
class AgeKey:
    identity: Path  # the private key file (age-keygen's output)
    recipient: str  # its public key, age1...


def make_key(folder: Path, name: str = "key") -> AgeKey:
    """A key pair made by `age-keygen`, as the README tells users to."""
    assert AGE_KEYGEN is not None, "age is not installed (scripts/system-deps.sh installs it)"
    folder.mkdir(parents=True, exist_ok=True)
    identity = folder / f"{name}.txt"
    subprocess.run([AGE_KEYGEN, "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run(
        [AGE_KEYGEN, "-y", str(identity)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return AgeKey(identity, public)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[AgeKey, AgeKey]:
    """Two age key pairs: the backups' and an unrelated one (a wrong identity)."""
    folder = tmp_path_factory.mktemp("keys")
    return make_key(folder, "backup"), make_key(folder, "other")


def stored_files(backups: Path, backup_id: str) -> list[Path]:
    return sorted(
        p for p in (backups / backup_id).rglob("*") if p.is_file() and p.name != "manifest.json"
    )


@pytest.fixture
def marked_db(pg_cluster: PgCluster) -> Iterator[tuple[str, str]]:
    """A database holding a marker string many times in plain columns; (url, marker)."""
    marker = f"PGK-MARKER-{uuid.uuid4().hex}"
    name = f"marked_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        "CREATE TABLE notes (id serial PRIMARY KEY, body text);"
        f"INSERT INTO notes (body) SELECT '{marker} ' || g FROM generate_series(1, 500) g;",
        dbname=name,
    )
    yield pg_cluster.url(name), marker
    pg_cluster.drop_database(name)


# --- what is stored ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_stored_bytes_are_age_files_without_the_marker(
    fmt: str, marked_db: tuple[str, str], keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> None:
    """With recipients set, every stored file is an age file and no plaintext reaches the
    target: a marker planted in the database is not in the stored bytes (uncompressed, it is
    in those of the same backup without recipients)."""
    url, marker = marked_db
    backups = tmp_path / "backups"
    plain_env = cli_env(url, backups)
    env = cli_env(url, backups, BACKUP_ENCRYPTION_RECIPIENTS=keys[0].recipient)
    compression = "gzip" if fmt == "directory" else "none"
    args = ["backup", "-F", fmt, "-C", compression, "--json"]
    if fmt == "directory":  # pg_dump -Fd compresses itself: uncompressed shows the marker
        args[4] = "none"
    control = run_cli(*args, env=plain_env, cwd=tmp_path)
    assert control.returncode == 0, control.stderr
    control_id = json.loads(control.stdout)["id"]
    assert any(marker.encode() in f.read_bytes() for f in stored_files(backups, control_id))

    made = run_cli(*args, env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    manifest = json.loads(made.stdout)
    assert manifest["encrypted"] is True
    assert manifest["encryption"]["method"] == "age"
    assert [r["type"] for r in manifest["encryption"]["recipients"]] == ["x25519"]
    assert keys[0].recipient not in made.stdout  # fingerprints, never keys
    files = stored_files(backups, manifest["id"])
    assert files and all(f.name.endswith(".age") for f in files)
    for f in files:
        data = f.read_bytes()
        assert data.startswith(AGE_MAGIC), f
        assert marker.encode() not in data
    # The backup host has no identity: verification said so, and still passed.
    verification = manifest["verification"]
    assert verification["ok"] is True and verification["decrypted"] is False
    assert any(
        c["name"] == "decryption" and c["detail"].startswith("not decrypted")
        for c in verification["checks"]
    )


# --- round trips on the fidelity schema --------------------------------------------------------


@pytest.fixture(scope="module")
def fidelity_url(pg_cluster: PgCluster) -> str:
    """A database holding tests/fidelity/schema.sql, of this module's own."""
    name = "fidelity_encrypted_src"
    pg_cluster.drop_database(name)
    pg_cluster.create_database(name)
    url = pg_cluster.url(name)
    compare.load_schema(url)
    return url


@pytest.fixture(scope="module")
def fidelity_snapshot(fidelity_url: str) -> compare.Snapshot:
    return compare.snapshot(fidelity_url)


def _pg_dump_major(cluster: PgCluster) -> int:
    out = subprocess.run(
        [str(cluster.bindir / "pg_dump"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1].split(".")[0])


@pytest.mark.slow
@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_encrypted_round_trip_is_exact(
    fmt: str,
    compression: str,
    pg_cluster: PgCluster,
    fidelity_url: str,
    fidelity_snapshot: compare.Snapshot,
    keys: tuple[AgeKey, AgeKey],
    tmp_path: Path,
) -> None:
    """Encrypted backup, verify with the identity, restore with the identity into a new
    database: the restored database is the source, for every format and compression."""
    if fmt == "directory" and compression == "zstd" and _pg_dump_major(pg_cluster) < 16:
        pytest.skip("pg_dump 15 cannot write zstd into a directory dump")
    backups = tmp_path / "backups"
    env = cli_env(
        fidelity_url, backups, BACKUP_ENCRYPTION_RECIPIENTS=keys[0].recipient,
        PGPASSWORD=pg_cluster.password,
    )  # fmt: skip
    made = run_cli("backup", "-F", fmt, "-C", compression, "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    env["BACKUP_ENCRYPTION_IDENTITY_FILE"] = str(keys[0].identity)
    verified = run_cli("verify", backup_id, "--json", env=env, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    verification = json.loads(verified.stdout)
    assert verification["decrypted"] is True
    assert {"decryption", "structure"} <= {c["name"] for c in verification["checks"]}
    target = f"fidelity_enc_{fmt}_{compression}"
    pg_cluster.drop_database(target)
    try:
        restored = run_cli(
            "restore", backup_id, "--target-url", pg_cluster.url(target, password=""),
            env=env, cwd=tmp_path, timeout=300,
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        compare.assert_same(fidelity_snapshot, compare.snapshot(pg_cluster.url(target)))
    finally:
        pg_cluster.drop_database(target)
