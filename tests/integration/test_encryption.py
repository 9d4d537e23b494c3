"""Encryption at rest (issue 14): age in the backup stream, and the restore side's identity.

Every test goes through the real `pgkeeper` command or the core with real servers: backups are
encrypted with BACKUP_ENCRYPTION_RECIPIENTS (public keys only), and decrypted where
BACKUP_ENCRYPTION_IDENTITY_FILE (or --identity) names the private key. Keys are made the way a
user makes them: `age-keygen` (Debian's `age`) and `ssh-keygen`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
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
    pg_cluster.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)", dbname=name)
    with psycopg.connect(pg_cluster.url(name), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO notes (body) SELECT %s || g FROM generate_series(1, 500) g",
            (marker + " ",),
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


# --- the restore side's identity ---------------------------------------------------------------


@pytest.fixture
def encrypted_backup(
    sample_db: str, keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> tuple[dict[str, str], str]:
    """An encrypted custom/zstd backup of `sample_db`: (the CLI environment, its id)."""
    env = cli_env(sample_db, tmp_path / "backups", BACKUP_ENCRYPTION_RECIPIENTS=keys[0].recipient)
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    return env, json.loads(made.stdout)["id"]


def _databases(pg_cluster: PgCluster) -> set[str]:
    return {r[0] for r in pg_cluster.query("SELECT datname FROM pg_database")}


def test_restore_without_or_with_a_wrong_identity_fails_in_one_line_and_changes_nothing(
    encrypted_backup: tuple[dict[str, str], str],
    keys: tuple[AgeKey, AgeKey],
    pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    """No identity: one line saying what to set; a wrong one: one line naming the file. No
    database is created or changed either way (not even a scratch one)."""
    env, backup_id = encrypted_backup
    target = f"enc_target_{uuid.uuid4().hex[:6]}"
    pg_cluster.create_database(target)
    pg_cluster.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')",
                       dbname=target)  # fmt: skip
    before = _databases(pg_cluster)
    url = pg_cluster.url(target)
    try:
        missing = run_cli("restore", backup_id, "--target-url", url, "--confirm", target,
                          env=env, cwd=tmp_path)  # fmt: skip
        line = one_line_error(missing, 2)
        assert "is encrypted" in line and "BACKUP_ENCRYPTION_IDENTITY_FILE" in line
        wrong = run_cli("restore", backup_id, "--target-url", url, "--confirm", target,
                        "--identity", str(keys[1].identity), env=env, cwd=tmp_path)  # fmt: skip
        line = one_line_error(wrong, 2)
        assert "cannot decrypt" in line and str(keys[1].identity) in line
        assert "AGE-SECRET-KEY" not in wrong.stderr
        default = run_cli("restore", backup_id, env=env, cwd=tmp_path)  # a new database
        one_line_error(default, 2)
        assert _databases(pg_cluster) == before
        assert pg_cluster.query("SELECT v FROM kept", dbname=target) == [("before",)]
    finally:
        pg_cluster.drop_database(target)


def test_verify_download_and_restore_test_need_the_identity(
    encrypted_backup: tuple[dict[str, str], str], keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> None:
    """verify without the identity passes and says it did not decrypt; with a wrong one it
    stops (nothing recorded); download as stored needs no key, --decompress does; restore-test
    needs it too."""
    env, backup_id = encrypted_backup
    sealed = run_cli("verify", backup_id, env=env, cwd=tmp_path)
    assert sealed.returncode == 0, sealed.stderr
    assert "NOT decrypted" in sealed.stdout
    wrong = run_cli("verify", backup_id, "-i", str(keys[1].identity), env=env, cwd=tmp_path)
    assert "cannot decrypt" in one_line_error(wrong, 2)
    shown = json.loads(run_cli("show", backup_id, "--json", env=env, cwd=tmp_path).stdout)
    assert shown["state"] == "verified"  # a wrong key is not a damaged backup

    stored = tmp_path / "stored.bin"
    got = run_cli("download", backup_id, "-o", str(stored), env=env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert stored.read_bytes().startswith(AGE_MAGIC)
    raw = tmp_path / "raw.dump"
    refused = run_cli("download", backup_id, "--decompress", "-o", str(raw), env=env, cwd=tmp_path)
    assert "download --decompress needs its private key" in one_line_error(refused, 2)
    assert not raw.exists()
    got = run_cli("download", backup_id, "--decompress", "-o", str(raw),
                  "-i", str(keys[0].identity), env=env, cwd=tmp_path)  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert raw.read_bytes().startswith(b"PGDMP")

    test_env = {**env, "BACKUP_RESTORE_TEST_ON_SOURCE": "true"}
    untested = run_cli("restore-test", backup_id, env=test_env, cwd=tmp_path)
    assert "restoring it needs its private key" in one_line_error(untested, 2)
    tested = run_cli("restore-test", backup_id, "-i", str(keys[0].identity),
                     env=test_env, cwd=tmp_path)  # fmt: skip
    assert tested.returncode == 0, tested.stderr
    assert "restore test passed" in tested.stdout


def test_a_damaged_encrypted_backup_fails_verification_with_and_without_the_identity(
    sample_db: str, keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> None:
    """A flipped byte fails the checksum check (no key needed). A file cut short, its manifest
    forged to match: cut inside a chunk's first bytes, the length alone gives it away; cut at
    a chunk boundary, only decryption can tell (the last chunk is marked), so only the
    identity's verification fails."""
    backups = tmp_path / "backups"
    env = cli_env(sample_db, backups, BACKUP_ENCRYPTION_RECIPIENTS=keys[0].recipient)
    made = run_cli("backup", "-C", "none", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    data = stored_files(backups, backup_id)[0]
    original = data.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    data.write_bytes(bytes(flipped))
    bad = run_cli("verify", backup_id, env=env, cwd=tmp_path)
    assert "checksum" in one_line_error(bad, 1)

    header_end = original.index(b"\n--- ")
    header_end = original.index(b"\n", header_end + 1) + 1
    boundary = header_end + 16 + (64 * 1024 + 16)  # the nonce and one full chunk
    assert boundary + 100 < len(original), "the dump must span more than one age chunk"
    manifest_path = backups / backup_id / "manifest.json"
    clean = json.loads(manifest_path.read_text())

    def forge(cut: bytes) -> None:
        data.write_bytes(cut)
        manifest = json.loads(json.dumps(clean))
        manifest["objects"][0].update(size=len(cut), sha256=hashlib.sha256(cut).hexdigest())
        manifest["size"] = len(cut)
        manifest_path.write_text(json.dumps(manifest))

    forge(original[: boundary + 5])
    sealed = run_cli("verify", backup_id, env=env, cwd=tmp_path)
    assert "encryption check" in one_line_error(sealed, 1)
    full = run_cli("verify", backup_id, "-i", str(keys[0].identity), env=env, cwd=tmp_path)
    assert "decryption check" in one_line_error(full, 1)

    forge(original[:boundary])
    sealed = run_cli("verify", backup_id, env=env, cwd=tmp_path)
    assert sealed.returncode == 0, sealed.stderr  # the limit of what a header and length tell
    full = run_cli("verify", backup_id, "-i", str(keys[0].identity), env=env, cwd=tmp_path)
    assert "decryption check" in one_line_error(full, 1)


# --- restoring by hand with Debian's age --------------------------------------------------------


@pytest.mark.skipif(AGE is None, reason="age is not installed (scripts/system-deps.sh)")
def test_restore_by_hand_with_the_age_binary(
    encrypted_backup: tuple[dict[str, str], str],
    keys: tuple[AgeKey, AgeKey],
    pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    """The README's commands, as written: age -d -i key.txt FILE | zstd -d | pg_restore."""
    env, backup_id = encrypted_backup
    folder = Path(env["BACKUP_DIR"]) / backup_id
    target = f"by_hand_{uuid.uuid4().hex[:6]}"
    shell_env = {**cli_env(None, tmp_path), **pg_cluster.libpq_env("postgres")}
    script = (
        f"createdb {target} && "
        f"age -d -i {keys[0].identity} {backup_id}.dump.zst.age | zstd -dc | "
        f"pg_restore -d {target}"
    )
    bindir = str(pg_cluster.bindir)
    shell_env["PATH"] = f"{bindir}:{shell_env['PATH']}"
    try:
        done = subprocess.run(["bash", "-ec", script], cwd=folder, env=shell_env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        rows = pg_cluster.query("SELECT count(*) FROM shop.orders", dbname=target)
        assert rows == [(1200,)]
    finally:
        pg_cluster.drop_database(target)


# --- rekey --------------------------------------------------------------------------------------


def test_rekey_moves_a_backup_to_the_new_recipients_and_removes_the_old_one(
    encrypted_backup: tuple[dict[str, str], str],
    keys: tuple[AgeKey, AgeKey],
    pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    """Recipients rotated from key 0 to key 1: rekey (with key 0) writes a new, verified copy
    only key 1 opens, keeps the original's record, and deletes the old backup."""
    env, old_id = encrypted_backup
    backups = Path(env["BACKUP_DIR"])
    old = json.loads((backups / old_id / "manifest.json").read_text())
    env = {**env, "BACKUP_ENCRYPTION_RECIPIENTS": keys[1].recipient}
    without = run_cli("rekey", old_id, env=env, cwd=tmp_path)
    assert "rekeying it needs its private key" in one_line_error(without, 2)
    done = run_cli("rekey", old_id, "-i", str(keys[0].identity), "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    new_id = result["new_id"]
    assert result["removed_from"] == [str(backups)]
    assert not (backups / old_id).exists()
    new = json.loads((backups / new_id / "manifest.json").read_text())
    assert new["started_at"] == old["started_at"]
    assert new["table_counts"] == old["table_counts"]
    assert new["options"]["rekeyed_from"] == old_id
    assert new["verification"]["ok"] is True
    assert new["encryption"]["recipients"] != old["encryption"]["recipients"]
    assert keys[1].recipient not in json.dumps(new)
    # Only the new key opens it now.
    wrong = run_cli("verify", new_id, "-i", str(keys[0].identity), env=env, cwd=tmp_path)
    one_line_error(wrong, 2)
    good = run_cli("verify", new_id, "-i", str(keys[1].identity), env=env, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    target = f"rekeyed_{uuid.uuid4().hex[:6]}"
    try:
        restored = run_cli("restore", new_id, "--target-url", pg_cluster.url(target),
                           "-i", str(keys[1].identity), env=env, cwd=tmp_path)  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        assert pg_cluster.query("SELECT count(*) FROM shop.orders", dbname=target) == [(1200,)]
    finally:
        pg_cluster.drop_database(target)


def test_rekey_encrypts_a_backup_made_before_encryption_was_on(
    sample_db: str, keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> None:
    """An unencrypted directory backup, rekeyed: every file becomes an age file; no key needed."""
    backups = tmp_path / "backups"
    env = cli_env(sample_db, backups)
    made = run_cli("backup", "-F", "directory", "-C", "gzip", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    old_id = json.loads(made.stdout)["id"]
    env["BACKUP_ENCRYPTION_RECIPIENTS"] = keys[0].recipient
    done = run_cli("rekey", old_id, "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    new_id = json.loads(done.stdout)["new_id"]
    files = stored_files(backups, new_id)
    assert files and all(f.read_bytes().startswith(AGE_MAGIC) for f in files)
    env["BACKUP_ENCRYPTION_IDENTITY_FILE"] = str(keys[0].identity)
    good = run_cli("verify", new_id, env=env, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "NOT decrypted" not in good.stdout


# --- import -------------------------------------------------------------------------------------


def test_import_of_an_age_encrypted_dump_needs_the_identity_and_keeps_the_bytes(
    encrypted_backup: tuple[dict[str, str], str], keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> None:
    """A downloaded encrypted backup imports back: refused without the identity (one line),
    stored as it came (same sha256) and verified decrypted with it."""
    env, backup_id = encrypted_backup
    file = tmp_path / "download.dump.zst.age"
    got = run_cli("download", backup_id, "-o", str(file), env=env, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    refused = run_cli("import", str(file), env=env, cwd=tmp_path)
    assert "encrypted (age)" in one_line_error(refused, 2)
    done = run_cli("import", str(file), "-i", str(keys[0].identity), "--json",
                   env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["objects"][0]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert (manifest["format"], manifest["compression"]) == ("custom", "zstd")
    assert manifest["encrypted"] is True
    assert manifest["verification"]["decrypted"] is True


def test_an_unencrypted_import_is_encrypted_when_recipients_are_set(
    sample_db: str, keys: tuple[AgeKey, AgeKey], pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """pg_dump's own file, imported with recipients set, reaches the target only encrypted."""
    dump = tmp_path / "external.dump"
    subprocess.run(
        [str(pg_cluster.bindir / "pg_dump"), "-Fc", "-f", str(dump), "--no-password"],
        env={**cli_env(None, tmp_path), **pg_cluster.libpq_env(sample_db.rsplit("/", 1)[1])},
        check=True, capture_output=True,
    )  # fmt: skip
    env = cli_env(sample_db, tmp_path / "backups",
                  BACKUP_ENCRYPTION_RECIPIENTS=keys[0].recipient,
                  BACKUP_ENCRYPTION_IDENTITY_FILE=str(keys[0].identity))  # fmt: skip
    done = run_cli("import", str(dump), "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    files = stored_files(tmp_path / "backups", manifest["id"])
    assert [f.name.endswith(".dump.age") for f in files] == [True]
    assert files[0].read_bytes().startswith(AGE_MAGIC)
    assert manifest["verification"]["decrypted"] is True


# --- ssh keys as recipients ----------------------------------------------------------------------


def test_ssh_ed25519_and_rsa_keys_are_recipients_from_a_file(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """A file of ssh public keys (and a comment) as BACKUP_ENCRYPTION_RECIPIENTS; the ed25519
    private key restores; the manifest holds OpenSSH's fingerprints."""
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen is not installed")
    for kind, extra in (("ed25519", []), ("rsa", ["-b", "2048"])):
        subprocess.run([keygen, "-q", "-t", kind, *extra, "-N", "", "-f", str(tmp_path / kind)],
                       check=True, capture_output=True)  # fmt: skip
    listing = tmp_path / "recipients.txt"
    listing.write_text(
        "# the restore team\n"
        + (tmp_path / "ed25519.pub").read_text()
        + (tmp_path / "rsa.pub").read_text()
    )
    env = cli_env(sample_db, tmp_path / "backups", BACKUP_ENCRYPTION_RECIPIENTS=str(listing))
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    manifest = json.loads(made.stdout)
    listed = subprocess.run(
        [keygen, "-lf", str(tmp_path / "ed25519.pub")], capture_output=True, text=True, check=True
    )
    fingerprint = listed.stdout.split()[1]
    recorded = manifest["encryption"]["recipients"]
    assert [r["type"] for r in recorded] == ["ssh-ed25519", "ssh-rsa"]
    assert recorded[0]["fingerprint"] == fingerprint
    target = f"ssh_{uuid.uuid4().hex[:6]}"
    try:
        restored = run_cli("restore", manifest["id"], "--target-url", pg_cluster.url(target),
                           "-i", str(tmp_path / "ed25519"), env=env, cwd=tmp_path)  # fmt: skip
        assert restored.returncode == 0, restored.stderr
    finally:
        pg_cluster.drop_database(target)


def test_a_private_key_given_as_recipient_is_refused_without_echoing_it(
    sample_db: str, keys: tuple[AgeKey, AgeKey], tmp_path: Path
) -> None:
    """A secret key pasted into BACKUP_ENCRYPTION_RECIPIENTS stops the backup in one line that
    does not repeat it; nothing is stored."""
    secret = next(
        line for line in keys[0].identity.read_text().splitlines()
        if line.startswith("AGE-SECRET-KEY-")
    )
    env = cli_env(sample_db, tmp_path / "backups", BACKUP_ENCRYPTION_RECIPIENTS=secret)
    proc = run_cli("backup", env=env, cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert "private key" in line and secret not in proc.stderr + proc.stdout
    assert not any((tmp_path / "backups").glob("*/manifest.json"))


def test_the_safety_backup_of_an_encrypted_restore_is_encrypted_or_refused(
    encrypted_backup: tuple[dict[str, str], str],
    keys: tuple[AgeKey, AgeKey],
    pg_cluster: PgCluster,
    tmp_path: Path,
) -> None:
    """Replacing a database with an encrypted backup takes a safety backup: where restores run
    without recipients it would be stored unencrypted, so the restore stops first (one line,
    nothing changed); with them, the safety backup is an age file like the others."""
    env, backup_id = encrypted_backup
    target = f"enc_safety_{uuid.uuid4().hex[:6]}"
    pg_cluster.create_database(target)
    pg_cluster.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')",
                       dbname=target)  # fmt: skip
    url = pg_cluster.url(target)
    restore_env = {**env, "BACKUP_ENCRYPTION_IDENTITY_FILE": str(keys[0].identity)}
    try:
        bare = {k: v for k, v in restore_env.items() if k != "BACKUP_ENCRYPTION_RECIPIENTS"}
        refused = run_cli("restore", backup_id, "--target-url", url, "--confirm", target,
                          env=bare, cwd=tmp_path)  # fmt: skip
        assert "would be stored unencrypted" in one_line_error(refused, 2)
        assert pg_cluster.query("SELECT v FROM kept", dbname=target) == [("before",)]
        done = run_cli("restore", backup_id, "--target-url", url, "--confirm", target, "--json",
                       env=restore_env, cwd=tmp_path)  # fmt: skip
        assert done.returncode == 0, done.stderr
        safety = json.loads(done.stdout)["safety_backup_id"]
        files = stored_files(Path(env["BACKUP_DIR"]), safety)
        assert files and all(f.read_bytes().startswith(AGE_MAGIC) for f in files)
    finally:
        pg_cluster.drop_database(target)
