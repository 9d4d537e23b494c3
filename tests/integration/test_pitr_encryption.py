"""Point-in-time recovery with encryption at rest, on a real archiving cluster: WAL and base
backups stored as age files, restores that decrypt with the identity and stop in one line (or
exit 126, for PostgreSQL's restore_command) without it, and an archive that switched from
plain to encrypted on the way.

One cluster serves the module, in file order: it archives unencrypted first (commit 1, a base
backup, commit 2), then BACKUP_ENCRYPTION_RECIPIENTS is added to its env file (the running
pusher notices and hands over to one with the new settings), then a marker row, an encrypted
base backup and commits 3-5 at known times.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from pgkeeper import catalog, naming, wal
from pgkeeper.errors import IdentityError
from pgkeeper.pitr_test import run_pitr_restore_test
from pgkeeper.settings import load_settings
from pgkeeper.storage import LocalStorage
from tests.servers import free_port
from tests.support.cli import one_line_error
from tests.support.pitr import (
    AS_ROOT,
    Archiving,
    archiving_cluster,
    give_to_server,
    restored,
    rows,
    shared_dir,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGE_KEYGEN = shutil.which("age-keygen")
AGE_MAGIC = b"age-encryption.org/v1\n"
MARKER = "PGK-PITR-MARKER-5b0e7d21"


@dataclass(frozen=True)
class Keys:
    identity: Path  # readable by the server's user (restore_command decrypts with it)
    recipient: str
    other: Path  # a key that is not a recipient
    root_only: Path  # the identity again, readable by root only


def _keygen(path: Path) -> str:
    assert AGE_KEYGEN is not None, "age is not installed (scripts/system-deps.sh installs it)"
    subprocess.run([AGE_KEYGEN, "-o", str(path)], check=True, capture_output=True)
    return subprocess.run([AGE_KEYGEN, "-y", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    folder = shared_dir("pgkeeper-pitr-keys-")
    identity, other = folder / "restore-key.txt", folder / "other-key.txt"
    recipient = _keygen(identity)
    _keygen(other)
    root_only = folder / "root-only-key.txt"
    shutil.copy(identity, root_only)
    for path in (identity, other, root_only):
        path.chmod(0o600)
    give_to_server(identity)
    give_to_server(other)
    try:
        yield Keys(identity, recipient, other, root_only)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def arch(server_pgkeeper: Path) -> Iterator[Archiving]:
    with archiving_cluster(server_pgkeeper) as archiving:
        archiving.cluster.execute("CREATE TABLE pitr_rows (v int PRIMARY KEY)")
        archiving.cluster.execute("CREATE TABLE notes (v serial PRIMARY KEY, body text)")
        yield archiving


def _pushers(arch: Archiving) -> bool:
    found = subprocess.run(["pgrep", "-f", f"pgkeeper.wal_async --pg-wal {arch.cluster.data_dir}"],
                           capture_output=True)  # fmt: skip
    return found.returncode == 0


@pytest.fixture(scope="module")
def history(arch: Archiving, keys: Keys) -> dict[str, object]:
    """Plain: commit 1, base backup, commit 2. Then encryption on: a marker row, an encrypted
    base backup, commits 3-5 at known times; everything archived."""
    arch.commit(1)
    plain = arch.cli("base-backup", "--json")
    assert plain.returncode == 0, plain.stderr
    arch.commit(2)
    last_plain = arch.switch_and_wait()
    arch.env_file.write_text(
        arch.env_file.read_text() + f"BACKUP_ENCRYPTION_RECIPIENTS={keys.recipient}\n"
    )
    deadline = time.monotonic() + 30  # the pusher sees its env file changed and exits
    while _pushers(arch):
        assert time.monotonic() < deadline, "the pusher did not notice its env file changed"
        time.sleep(0.1)
    with psycopg.connect(arch.cluster.url(), autocommit=True) as conn:
        conn.execute("INSERT INTO notes (body) SELECT %s || g FROM generate_series(1, 300) g",
                     (MARKER + " ",))  # fmt: skip
    sealed = arch.cli("base-backup", "--json")
    assert sealed.returncode == 0, sealed.stderr
    times = {}
    for value in (3, 4, 5):
        times[value] = arch.commit(value)
        time.sleep(0.4)
    arch.switch_and_wait()
    return {
        "plain": json.loads(plain.stdout),
        "sealed": json.loads(sealed.stdout),
        "times": times,
        "last_plain": last_plain,
    }


def system_id(arch: Archiving) -> int:
    return int(arch.cluster.query("SELECT system_identifier FROM pg_control_system()")[0][0])


def test_stored_wal_and_base_backups_are_age_files_without_the_marker(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """With encryption on every WAL file archived is an age file under <name>-<sha256>.zst.age
    and the base backup is <id>.tar.zst.age with its recipients in the manifest; the marker
    planted in the database is in the decrypted WAL but nowhere in what the target holds.
    What was archived before encryption was turned on stays as it was (.zst)."""
    storage = LocalStorage(arch.backups)
    archive = wal.list_archive(storage, system_id(arch))
    last_plain = str(history["last_plain"])
    marked = []
    for name, copies in archive.files.items():
        (item,) = copies
        raw = (Path(arch.backups) / item.key).read_bytes()
        assert MARKER.encode() not in raw
        if item.encrypted:
            assert item.key.endswith(".zst.age") and raw.startswith(AGE_MAGIC)
            marked.append(name)
        elif wal.kind_of(name) == "segment":
            assert name <= last_plain, f"{name} was archived in plaintext after the switch"
    assert any(wal.kind_of(n) == "segment" for n in marked)
    sealed = history["sealed"]
    assert isinstance(sealed, dict)
    manifest, _ = catalog.find([storage], sealed["id"])
    assert manifest.encryption is not None and len(manifest.encryption.recipients) == 1
    (obj,) = manifest.objects
    assert obj.name.endswith(".tar.zst.age")
    data = (Path(arch.backups) / naming.object_key(manifest.id, obj.name)).read_bytes()
    assert data.startswith(AGE_MAGIC) and MARKER.encode() not in data
    assert manifest.verification is not None and manifest.verification.decrypted is False
    # The marker is in the WAL: the check above could fail.
    folder = shared_dir("pgkeeper-fetch-")
    try:
        found = False
        for name in sorted(n for n in marked if wal.kind_of(n) == "segment"):
            done = arch.cli("wal-fetch", "--system-id", str(system_id(arch)), name,
                            str(folder / name),
                            BACKUP_ENCRYPTION_IDENTITY_FILE=str(keys.identity))  # fmt: skip
            assert done.returncode == 0, done.stderr
            found = found or MARKER.encode() in (folder / name).read_bytes()
        assert found
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_restore_to_a_time_between_two_commits_decrypts_with_the_identity(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """--time between commit 4 and commit 5, from the encrypted base backup and encrypted WAL,
    on a started server whose restore_command decrypts: exactly rows 1-4."""
    times = history["times"]
    assert isinstance(times, dict)
    between = times[4] + (times[5] - times[4]) / 2
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli(
            "pitr", "restore", "--time", between.isoformat(), "--to", str(folder),
            "--start", "--port", str(port), "--identity", str(keys.identity),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2, 3, 4]
        sealed = history["sealed"]
        assert isinstance(sealed, dict) and sealed["id"] in done.stdout


def test_a_mixed_archive_restores_from_the_plain_base_backup(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """The unencrypted base backup, then unencrypted WAL, then encrypted WAL: --latest with
    the identity replays all of it."""
    plain = history["plain"]
    assert isinstance(plain, dict)
    port = free_port("127.0.0.1")
    folder = shared_dir("pgkeeper-restore-") / "data"
    with restored(folder):
        done = arch.cli(
            "pitr", "restore", "--latest", "--base", plain["id"], "--to", str(folder),
            "--start", "--port", str(port), BACKUP_ENCRYPTION_IDENTITY_FILE=str(keys.identity),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        assert rows(arch.cluster, port) == [1, 2, 3, 4, 5]
        assert rows(arch.cluster, port, "notes")[-1] == 300


def test_pitr_restore_without_the_right_identity_stops_before_writing(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """No identity, a key that is not a recipient, or (as root) one the server's user cannot
    read: one line each, and the --to folder is never created."""
    folder = shared_dir("pgkeeper-restore-") / "data"
    missing = arch.cli("pitr", "restore", "--latest", "--to", str(folder))
    message = one_line_error(missing, 2)
    assert "encrypted" in message and "BACKUP_ENCRYPTION_IDENTITY_FILE" in message
    wrong = arch.cli("pitr", "restore", "--latest", "--to", str(folder),
                     "--identity", str(keys.other))  # fmt: skip
    assert "none of its keys" in one_line_error(wrong, 2)
    if AS_ROOT:
        port = str(free_port("127.0.0.1"))
        hidden = arch.cli("pitr", "restore", "--latest", "--to", str(folder), "--start",
                          "--port", port, "--identity", str(keys.root_only))  # fmt: skip
        message = one_line_error(hidden, 2)
        assert "not readable by postgres" in message and str(keys.root_only) in message
    assert not folder.exists()


def test_wal_fetch_without_the_right_identity_exits_126(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """restore_command on an encrypted segment: no identity, or a key that is not a recipient,
    is exit 126 (recovery stops; 1 would end it early as the end of the archive) with one line
    naming the file; nothing is left at the destination. With the identity: the exact bytes."""
    sid = str(system_id(arch))
    archive = wal.list_archive(LocalStorage(arch.backups), int(sid))
    name = next(n for n in archive.segments(1) if archive.files[n][0].encrypted)
    folder = shared_dir("pgkeeper-fetch-")
    try:
        dest = folder / "RECOVERYXLOG"
        for extra, said in (({}, "needs the private key"),
                            ({"BACKUP_ENCRYPTION_IDENTITY_FILE": str(keys.other)},
                             "none of its keys")):  # fmt: skip
            done = arch.cli("wal-fetch", "--system-id", sid, name, str(dest), **extra)
            assert done.returncode == 126, (done.returncode, done.stderr)
            (line,) = done.stderr.strip().splitlines()
            assert line.startswith("error: ") and name in line and said in line
            assert list(folder.iterdir()) == []
        done = arch.cli("wal-fetch", "--system-id", sid, name, str(dest),
                        BACKUP_ENCRYPTION_IDENTITY_FILE=str(keys.identity))  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == archive.files[name][0].sha256
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_same_segment_twice_with_encryption_succeeds_other_bytes_are_refused(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """Encryption is randomised, yet pushing an archived segment again with the same bytes
    exits 0 and stores nothing new; one byte changed under the same name exits 1 naming it,
    and the archive keeps the original (still fetched byte-exact)."""
    sid = system_id(arch)
    name = arch.switch_and_wait()
    storage = LocalStorage(arch.backups)
    folder = shared_dir("pgkeeper-push-")
    identity = {"BACKUP_ENCRYPTION_IDENTITY_FILE": str(keys.identity)}
    try:
        done = arch.cli("wal-fetch", "--system-id", str(sid), name, str(folder / name), **identity)
        assert done.returncode == 0, done.stderr
        original = (folder / name).read_bytes()
        before = wal.archived_copies(storage, sid, name)
        (key,) = before.values()
        assert key.endswith(".age")
        stored = (Path(arch.backups) / key).read_bytes()
        again = arch.cli("wal-push", "--system-id", str(sid), str(folder / name))
        assert again.returncode == 0, again.stderr
        assert wal.archived_copies(storage, sid, name) == before
        assert (Path(arch.backups) / key).read_bytes() == stored
        changed = bytearray(original)
        changed[9000] ^= 0xFF
        (folder / name).write_bytes(bytes(changed))
        refused = arch.cli("wal-push", "--system-id", str(sid), str(folder / name))
        message = one_line_error(refused, 1)
        assert name in message and "other contents" in message
        assert wal.archived_copies(storage, sid, name) == before
        check = arch.cli("wal-fetch", "--system-id", str(sid), name, str(folder / "check"),
                         **identity)  # fmt: skip
        assert check.returncode == 0 and (folder / "check").read_bytes() == original
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_pitr_restore_test_decrypts_and_needs_the_identity(
    arch: Archiving, history: dict[str, object], keys: Keys
) -> None:
    """What the pitr-restore-test flow runs: with the identity it restores the newest
    (encrypted) base backup and all WAL on a scratch server and reads every table back;
    without it, a one-line IdentityError before any scratch folder is made."""
    scratch = set(Path("/tmp").glob("pgkeeper-pitr-test-*"))
    base = dict(_env_file=arch.env_file, database_url=arch.cluster.url(),
                backup_pitr_pgkeeper=str(arch.server_pgkeeper))  # fmt: skip
    storages = [LocalStorage(arch.backups)]
    with pytest.raises(IdentityError, match="BACKUP_ENCRYPTION_IDENTITY_FILE"):
        run_pitr_restore_test(load_settings(**base), storages)
    assert set(Path("/tmp").glob("pgkeeper-pitr-test-*")) == scratch
    settings = load_settings(**base, backup_encryption_identity_file=keys.identity)
    manifest, result = run_pitr_restore_test(settings, storages)
    sealed = history["sealed"]
    assert isinstance(sealed, dict) and manifest.id == sealed["id"]
    assert result.ok, result.checks
    assert result.tables_compared == 2
