"""Fault tests of the backup engine against a real PostgreSQL: what a broken run leaves behind.

Each test breaks one thing on purpose (pg_dump killed, pgkeeper killed before its manifest, a
flipped byte, a full disk, a concurrent run, a restore that fails halfway) and checks the safety
invariants of DESIGN.md: nothing broken is listed, leftovers are cleaned by the next run, a
failed restore leaves the target exactly as it was, and no secret escapes. The real command
(`.venv/bin/pgkeeper`) runs in a subprocess with an explicit environment; the Python API is used
where it is simpler to set the scene.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pgkeeper import backup, catalog
from pgkeeper.settings import load_settings
from pgkeeper.storage import LocalStorage
from tests.fidelity import compare
from tests.servers.postgres import PgCluster
from tests.support.cli import PGKEEPER, cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

BIG_ROWS = 300_000
# zstd at level 9 in one thread turns the big database's ~30 MB dump into a run of several
# seconds in which pg_dump is blocked on its pipe: a window to find and kill processes.
SLOW = {"BACKUP_COMPRESSION_LEVEL": "9", "BACKUP_COMPRESSION_THREADS": "1"}


# --- helpers ------------------------------------------------------------------------------------


def listed(env: dict[str, str], cwd: Path) -> list[dict[str, object]]:
    proc = run_cli("list", "--json", env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    backups: list[dict[str, object]] = json.loads(proc.stdout)["backups"]
    return backups


def files_in(folder: Path) -> list[str]:
    """Every entry (file or folder, hidden ones included) under `folder`."""
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def make_db(cluster: PgCluster, rows: int = 200) -> tuple[str, str]:
    """A new small database with a table, a sequence and a large object; (name, url)."""
    name = f"faults_{uuid.uuid4().hex[:10]}"
    cluster.create_database(name)
    cluster.execute(
        "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL, qty int NOT NULL);"
        "CREATE SEQUENCE counter START 7; SELECT nextval('counter'), nextval('counter');"
        "CREATE TABLE notes (body text); INSERT INTO notes VALUES (E'tab\\there'), ('\\.');",
        dbname=name,
    )
    cluster.execute(
        "INSERT INTO items SELECT g, 'item ' || g, g * 10 FROM generate_series(1, %s) g",
        [rows], dbname=name,
    )  # fmt: skip
    return name, cluster.url(name)


def db_oid(cluster: PgCluster, name: str) -> int:
    rows = cluster.query("SELECT oid FROM pg_database WHERE datname = %s", [name])
    return int(rows[0][0])


def leftover_databases(cluster: PgCluster) -> list[str]:
    """Scratch databases a restore creates and must always drop."""
    rows = cluster.query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'pgk\\_restore\\_%' "
        "OR datname LIKE 'pgk\\_old\\_%'"
    )
    return [str(r[0]) for r in rows]


def children_named(parent: int, name: str) -> list[int]:
    """Pids of the direct children of `parent` whose command name is `name`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            ppid = int(text[text.rindex(")") + 2 :].split()[1])
            if comm == name and ppid == parent:
                found.append(int(stat.parent.name))
    return found


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def temp_bytes(folder: Path) -> int:
    """Bytes in the hidden temp files under `folder` (files may vanish while we look)."""
    total = 0
    for path in folder.rglob(".*tmp-*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def pid_alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


@contextlib.contextmanager
def popen_cli(*args: str, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """`pgkeeper ARGS` in the background; killed if the test leaves early."""
    proc = subprocess.Popen(
        [str(PGKEEPER), *args], env=env, cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_db(pg_cluster: PgCluster) -> Iterator[str]:
    """URL of a database whose dump is ~30 MB of random text (300k rows made server-side)."""
    name = f"faults_big_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute("CREATE TABLE big (id int PRIMARY KEY, body text NOT NULL)", dbname=name)
    pg_cluster.execute(
        "INSERT INTO big SELECT g, md5(random()::text) || md5(random()::text)"
        " || md5(random()::text) FROM generate_series(1, %s) g",
        [BIG_ROWS], dbname=name,
    )  # fmt: skip
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture
def small_db(pg_cluster: PgCluster) -> Iterator[tuple[str, str]]:
    """(name, url) of a fresh small database, dropped afterwards."""
    name, url = make_db(pg_cluster)
    yield name, url
    pg_cluster.drop_database(name)


# --- an interrupted backup ----------------------------------------------------------------------


def test_pg_dump_killed_mid_stream(big_db: str, tmp_path: Path) -> None:
    """pg_dump SIGKILLed mid-stream: one-line error, exit 1, nothing listed, no temp file left."""
    backups = tmp_path / "backups"
    env = cli_env(big_db, backups, BACKUP_VERIFY="off", **SLOW)
    with popen_cli("backup", env=env, cwd=tmp_path) as proc:
        wait_for(lambda: children_named(proc.pid, "pg_dump"), 30, "pg_dump to start")
        # Some compressed bytes reached the temp file: we are mid-stream.
        wait_for(lambda: temp_bytes(backups) > 0, 30, "the first bytes of the backup")
        (pg_dump,) = children_named(proc.pid, "pg_dump")
        os.kill(pg_dump, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    message = one_line_error(result, 1)
    assert "pg_dump was killed by SIGKILL" in message
    assert "run the backup again" in message
    assert listed(env, tmp_path) == []
    assert files_in(backups) == []
    assert not pid_alive(pg_dump)


_BLOCK_BEFORE_MANIFEST = """
import sys, time
from pgkeeper import catalog
from pgkeeper.backup import run_backup
from pgkeeper.settings import load_settings

def never_commit(storage, manifest):
    print("data written", flush=True)
    time.sleep(600)

catalog.write_manifest = never_commit
run_backup(load_settings())
"""


def test_pgkeeper_killed_between_data_and_manifest(
    small_db: tuple[str, str], tmp_path: Path
) -> None:
    """pgkeeper SIGKILLed after the data, before the manifest: nothing listed; next run cleans."""
    _, url = small_db
    backups = tmp_path / "backups"
    env = cli_env(url, backups)
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCK_BEFORE_MANIFEST], env=env, cwd=tmp_path, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "data written", proc.stderr
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    (abandoned,) = [p for p in backups.iterdir() if p.is_dir()]
    left = files_in(abandoned)
    assert any(name.endswith(".dump.zst") for name in left), left  # the data made it to disk
    assert "manifest.json" not in left
    assert listed(env, tmp_path) == []

    # A run in the same second may reuse the freed id (harmless, but it would hide whether the
    # leftover folder was removed), so the next run starts in the next second.
    time.sleep(1.1)
    # The server drops the dead session's lock at once; the timeout only absorbs scheduling.
    nxt = run_cli("backup", "--json", env={**env, "BACKUP_LOCK_TIMEOUT": "10"}, cwd=tmp_path)
    assert nxt.returncode == 0, nxt.stderr
    new_id = json.loads(nxt.stdout)["id"]
    assert not abandoned.exists()
    assert [b["id"] for b in listed(env, tmp_path)] == [new_id]
    assert files_in(backups) == sorted(
        [new_id, f"{new_id}/manifest.json", f"{new_id}/{new_id}.dump.zst"]
    )


# --- a corrupted backup -------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    where = len(data) // 2 if offset is None else offset
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_corrupted_byte_fails_verify_and_restore(
    pg_cluster: PgCluster, small_db: tuple[str, str], tmp_path: Path, compression: str
) -> None:
    """One flipped byte: verify fails naming the checksum check; restore refuses, target intact."""
    name, url = small_db
    backups = tmp_path / "backups"
    env = cli_env(url, backups)
    made = run_cli("backup", "--compression", compression, "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    _flip_byte(backups / record["id"] / record["filename"])

    verify = run_cli("verify", record["id"], env=env, cwd=tmp_path)
    message = one_line_error(verify, 1)
    assert "failed the checksum check" in message
    assert "do not restore it" in message
    out = tmp_path / "copy.bin"
    download = run_cli("download", record["id"], "-o", str(out), env=env, cwd=tmp_path)
    assert "checksum" in one_line_error(download, 1)
    assert not out.exists() and not list(tmp_path.glob(".copy.bin*"))

    pg_cluster.execute("INSERT INTO items VALUES (100000, 'added later', 1)", dbname=name)
    before, oid = compare.snapshot(url), db_oid(pg_cluster, name)
    for jobs in ("1", "2"):  # one pg_restore fed by the stream, and the parallel loader
        restore = run_cli(
            "restore", record["id"], "--target-url", url, "--confirm", name, "--jobs", jobs,
            env=env, cwd=tmp_path,
        )  # fmt: skip
        message = one_line_error(restore, 1)
        assert "checksum" in message, (jobs, message)
    compare.assert_same(before, compare.snapshot(url))
    assert db_oid(pg_cluster, name) == oid
    assert leftover_databases(pg_cluster) == []
    assert [b["id"] for b in listed(env, tmp_path)] == [record["id"]]  # no safety backup taken


def _valid_zstd_of_size(size: int) -> bytes:
    """A well-formed zstd stream of exactly ``size`` bytes whose content is not a dump."""
    import zstandard

    def frame(n: int) -> bytes:
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(os.urandom(n))

    overhead = len(frame(size)) - size  # random bytes are stored raw: headers only
    for n in range(size - overhead - 8, size - overhead + 9):
        if len(candidate := frame(n)) == size:
            return candidate
    raise AssertionError(f"no {size}-byte zstd frame of random bytes")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_damaged_copy_that_still_decodes_falls_back_to_the_offsite_copy(
    pg_cluster: PgCluster, small_db: tuple[str, str], tmp_path: Path, jobs: str
) -> None:
    """The primary copy was replaced by bytes that decode (valid zstd) but are no dump:
    pg_restore chokes on them before the checksum is known. The restore still judges the
    copy by its checksum, skips it for the offsite copy, and restores; the target is the
    backup's content."""
    name, url = small_db
    # Larger than the pipes into pg_restore, so it fails while the copy is still being read.
    pg_cluster.execute(
        "CREATE TABLE filler AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g",
        dbname=name,
    )
    backups, offsite = tmp_path / "backups", tmp_path / "offsite"
    env = cli_env(url, backups, BACKUP_TARGETS=str(offsite))
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert (offsite / record["id"] / record["filename"]).is_file()
    stored = backups / record["id"] / record["filename"]
    stored.write_bytes(_valid_zstd_of_size(stored.stat().st_size))
    expected = compare.snapshot(url)

    target = f"fallback_{jobs}_{uuid.uuid4().hex[:6]}"
    target_url = url.rsplit("/", 1)[0] + f"/{target}"
    restore = run_cli(
        "restore", record["id"], "--target-url", target_url, "--jobs", jobs, env=env, cwd=tmp_path
    )
    try:
        assert restore.returncode == 0, restore.stderr
        assert "checksum" in restore.stderr and str(backups) in restore.stderr  # the warning
        compare.assert_same(expected, compare.snapshot(target_url))
        assert leftover_databases(pg_cluster) == []
    finally:
        pg_cluster.drop_database(target)

    # With no other copy, the same damage is a one-line checksum error.
    alone = cli_env(url, backups)
    failed = run_cli("restore", record["id"], "--jobs", jobs, env=alone, cwd=tmp_path)
    assert "checksum" in one_line_error(failed, 1)


# --- a full disk ----------------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True, text=True,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_full_disk(big_db: str, tmp_path: Path, fmt: str) -> None:
    """A full backup folder: one-line 'no space left' error, exit 1, partial gone, none listed."""
    with tiny_tmpfs(tmp_path / "tiny") as backups:
        env = cli_env(big_db, backups)
        args = ["backup", "--format", fmt, "--compression", "none" if fmt == "custom" else "gzip"]
        proc = run_cli(*args, env=env, cwd=tmp_path)
        message = one_line_error(proc, 1)
        assert "no space left" in message.lower()
        assert files_in(backups) == []
        assert listed(env, tmp_path) == []


# --- two backups at once --------------------------------------------------------------------------


def test_concurrent_backups_of_one_database(big_db: str, tmp_path: Path) -> None:
    """A second backup of a database being backed up fails fast; with a lock timeout it waits."""
    backups = tmp_path / "backups"
    env = cli_env(big_db, backups, BACKUP_VERIFY="off", **SLOW)
    with popen_cli("backup", "--json", env=env, cwd=tmp_path) as first:
        # pending.json is written while holding the lock.
        wait_for(lambda: list(backups.glob("*/pending.json")), 30, "the first backup to start")
        started = time.monotonic()
        second = run_cli("backup", env=env, cwd=tmp_path)
        assert time.monotonic() - started < 10
        message = one_line_error(second, 1)
        assert "another backup" in message and "is running" in message
        assert "BACKUP_LOCK_TIMEOUT" in message
        assert first.poll() is None  # the first one was not disturbed

        waiting_env = {**env, "BACKUP_LOCK_TIMEOUT": "120", "BACKUP_COMPRESSION_LEVEL": "1"}
        third = run_cli("backup", "--json", env=waiting_env, cwd=tmp_path)
        assert first.poll() is not None  # the third ran only once the first had finished
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert third.returncode == 0, third.stderr
    first_id, third_id = json.loads(out)["id"], json.loads(third.stdout)["id"]
    assert [b["id"] for b in listed(env, tmp_path)] == [third_id, first_id]


# --- a restore that fails halfway -----------------------------------------------------------------


def test_restore_failing_midway_leaves_the_target_as_it_was(
    pg_cluster: PgCluster, small_db: tuple[str, str], tmp_path: Path
) -> None:
    """A valid-checksum archive that breaks pg_restore halfway leaves the target untouched."""
    name, url = small_db
    backups = tmp_path / "backups"
    env = cli_env(url, backups)
    pg_cluster.execute("UPDATE items SET qty = 424242 WHERE id = 150", dbname=name)
    made = run_cli("backup", "--compression", "none", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    # Break one row of the COPY data in place (same length, so the archive's blocks still
    # parse), then give the manifest the new checksum: only pg_restore can notice.
    data_path = backups / record["id"] / record["filename"]
    data = data_path.read_bytes()
    assert data.count(b"\t424242\n") == 1
    data = data.replace(b"\t424242\n", b"\t42x242\n")
    data_path.write_bytes(data)
    manifest_path = backups / record["id"] / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["objects"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    manifest["verification"] = None
    manifest_path.write_text(json.dumps(manifest))

    pg_cluster.execute("DELETE FROM items WHERE id > 100", dbname=name)  # differs from the backup
    before, oid = compare.snapshot(url), db_oid(pg_cluster, name)
    for jobs in ("1", "2"):
        proc = run_cli(
            "restore", record["id"], "--target-url", url, "--confirm", name, "--jobs", jobs,
            env=env, cwd=tmp_path,
        )  # fmt: skip
        message = one_line_error(proc, 1)
        assert "pg_restore" in message
    compare.assert_same(before, compare.snapshot(url))
    assert db_oid(pg_cluster, name) == oid
    assert leftover_databases(pg_cluster) == []
    assert [b["id"] for b in listed(env, tmp_path)] == [record["id"]]  # no safety backup kept
    assert [p for p in files_in(backups) if "pgkeeper-restore" in p] == []


def test_restore_over_data_needs_confirmation(
    pg_cluster: PgCluster, small_db: tuple[str, str], tmp_path: Path
) -> None:
    """Without --confirm a database with data is not replaced; with it, a safety backup is kept."""
    name, url = small_db
    backups = tmp_path / "backups"
    env = cli_env(url, backups)
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    pg_cluster.execute("DELETE FROM items WHERE id <= 50", dbname=name)
    changed, oid = compare.snapshot(url), db_oid(pg_cluster, name)

    for confirm in ([], ["--confirm", "some_other_db"]):
        args = ["restore", backup_id, "--target-url", url, *confirm]
        refused = run_cli(*args, env=env, cwd=tmp_path)
        message = one_line_error(refused, 2)
        assert f"--confirm {name}" in message
    compare.assert_same(changed, compare.snapshot(url))
    assert db_oid(pg_cluster, name) == oid

    done = run_cli(
        "restore", backup_id, "--target-url", url, "--confirm", name, "--json",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    safety_id = result["safety_backup_id"]
    assert safety_id and safety_id.startswith("pre_restore_")
    assert {b["id"] for b in listed(env, tmp_path)} == {backup_id, safety_id}
    assert pg_cluster.query("SELECT count(*) FROM items", dbname=name)[0][0] == 200
    assert leftover_databases(pg_cluster) == []

    # The safety backup holds what was there: restoring it brings the deletion back.
    undo = run_cli(
        "restore", safety_id, "--target-url", url, "--confirm", name, "--no-safety-backup",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert undo.returncode == 0, undo.stderr
    compare.assert_same(changed, compare.snapshot(url))


# --- secrets ------------------------------------------------------------------------------------


def test_password_never_leaks(pg_cluster: PgCluster, big_db: str, tmp_path: Path) -> None:
    """The password is in no file, output, log line or process argv during a backup."""
    password = f"pgk-canary-{uuid.uuid4().hex}"
    role = f"canary_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_role(role, password=password, superuser=True)
    dbname = big_db.rsplit("/", 1)[1]
    url = pg_cluster.url(dbname, user=role, password=password)
    backups = tmp_path / "backups"
    env = cli_env(url, backups, BACKUP_COMPRESSION_LEVEL="6", BACKUP_COMPRESSION_THREADS="1")
    argvs: set[bytes] = set()
    saw_pg_dump = False
    with popen_cli("--debug", "backup", "--json", env=env, cwd=tmp_path) as proc:
        while proc.poll() is None:
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):
                    argv = cmdline.read_bytes()
                    if b"pg_dump" in argv or b"pgkeeper" in argv or b"pg_restore" in argv:
                        argvs.add(argv)
                        saw_pg_dump = saw_pg_dump or b"pg_dump\0" in argv
            time.sleep(0.01)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert saw_pg_dump, "the poll never saw pg_dump running"
    secret = password.encode()
    for argv in argvs:
        assert secret not in argv, argv.replace(b"\0", b" ")
    assert password not in stdout and password not in stderr
    record = json.loads(stdout)
    assert record["database"] == dbname
    for path in backups.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path
    for command in (["list", "--json"], ["show", record["id"], "--json"], ["show", record["id"]]):
        shown = run_cli(*command, env=env, cwd=tmp_path)
        assert shown.returncode == 0 and password not in shown.stdout + shown.stderr


# --- ids ------------------------------------------------------------------------------------------


def test_same_name_backups_of_two_databases_get_two_ids(
    pg_cluster: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two databases backed up at the same moment under one name both end up listed."""
    both_chose = threading.Barrier(2, timeout=30)
    claim = LocalStorage.create_exclusive
    first_claims: set[int] = set()

    def in_step(self: LocalStorage, key: str, data: bytes) -> bool:
        if threading.get_ident() not in first_claims:
            first_claims.add(threading.get_ident())
            both_chose.wait()  # each has picked the same id; neither has claimed it yet
        return claim(self, key, data)

    moment = datetime(2025, 10, 2, 10, 0, 0, tzinfo=UTC)  # the same second for both
    monkeypatch.setattr(LocalStorage, "create_exclusive", in_step)
    monkeypatch.setattr(catalog, "utcnow", lambda: moment)
    names = [make_db(pg_cluster)[0] for _ in range(2)]
    results: dict[str, str] = {}

    def run(dbname: str) -> None:
        settings = load_settings(database_url=pg_cluster.url(dbname), backup_dir=str(tmp_path))
        try:
            results[dbname] = backup.run_backup(settings).id
        except Exception as exc:  # reported by the assertions below
            results[dbname] = repr(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for name in names:
        pg_cluster.drop_database(name)
    listed_dbs = sorted(m.database for m in catalog.list_backups(LocalStorage(tmp_path)))
    assert listed_dbs == sorted(names), results
    assert len(set(results.values())) == 2, results
