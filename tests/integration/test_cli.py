"""The `pgkeeper` command end to end against a real PostgreSQL: results, exit codes and messages.

Every command runs as an operator would run it: `.venv/bin/pgkeeper` in a subprocess, in an
empty folder (so no stray `.env` is read), with an explicit environment holding only
`DATABASE_URL`/`BACKUP_DIR` and the settings a test needs. Exit codes are the contract:
0 ok, 1 failure, 2 bad usage or input; every error is one line on stderr without a traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.settings import load_settings
from pgkeeper.verify import verify_backup
from tests.fidelity import compare
from tests.servers import free_port
from tests.servers.postgres import PgCluster
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

SEED_FIELDS = ("id", "filename", "size", "timestamp", "database", "compressed", "sha256")
UNKNOWN_ID = "auto_backup_2001-01-01T00-00-00Z"


# --- helpers ------------------------------------------------------------------------------------


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert success with nothing on stderr (no progress bar when piped); return stdout."""
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr == "", proc.stderr
    return proc.stdout


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def new_db_url(cluster: PgCluster, prefix: str = "cli_target") -> tuple[str, str]:
    """(name, url) of a database that does not exist yet."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    return name, cluster.url(name)


def client(cluster: PgCluster, name: str) -> str:
    return str(cluster.bindir / name)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(pg_cluster: PgCluster) -> Iterator[tuple[str, str]]:
    """(name, url) of a small database with a few kinds of objects, shared by this module."""
    name = f"cli_src_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL, tags text[], doc jsonb);"
        "INSERT INTO items SELECT g, 'item ' || g, ARRAY['a', 'b'], jsonb_build_object('g', g)"
        " FROM generate_series(1, 500) g;"
        "CREATE SEQUENCE counter START 40; SELECT nextval('counter');"
        "CREATE TABLE notes (body text); INSERT INTO notes VALUES (E'line\\nbreak'), ('\\.');"
        "CREATE VIEW big_items AS SELECT * FROM items WHERE id > 250;"
        "SELECT lo_from_bytea(0, '\\x00ff00'::bytea);",
        dbname=name,
    )
    yield name, pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture(scope="module")
def source_snapshot(source: tuple[str, str]) -> compare.Snapshot:
    return compare.snapshot(source[1])


@pytest.fixture
def targets(pg_cluster: PgCluster) -> Iterator[list[str]]:
    """Names of databases a test creates by restoring; dropped afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        pg_cluster.drop_database(name)


@pytest.fixture
def backups(tmp_path: Path) -> Path:
    return tmp_path / "backups"


# --- backup, list, show, verify -----------------------------------------------------------------


def test_backup_every_format_and_compression_then_list(
    source: tuple[str, str], backups: Path, tmp_path: Path
) -> None:
    """Each format x compression backs up with the seed's JSON fields; list: all, newest first."""
    name, url = source
    env = cli_env(url, backups)
    made: list[dict[str, object]] = []
    for fmt in ("custom", "plain", "directory"):
        for compression in ("zstd", "gzip", "none"):
            args = ["backup", "--format", fmt, "--compression", compression, "--json"]
            proc = run_cli(*args, env=env, cwd=tmp_path)
            if (fmt, compression) == ("directory", "zstd"):  # pg_dump 15 has no zstd
                message = one_line_error(proc, 2)
                assert "pg_dump 16" in message and "gzip compression" in message
                continue
            record = json.loads(ok(proc))
            assert list(record)[: len(SEED_FIELDS)] == list(SEED_FIELDS)
            assert record["database"] == name
            assert record["format"] == fmt and record["compression"] == compression
            assert record["compressed"] is (compression != "none")
            assert record["state"] == "verified"
            assert datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00"))
            stored = backups / str(record["id"]) / str(record["filename"])
            assert stored.exists()
            if fmt != "directory":
                assert record["size"] == stored.stat().st_size
                assert record["sha256"] == sha256_file(stored)
                assert str(record["filename"]).endswith(
                    {"custom": ".dump", "plain": ".sql"}[fmt]
                    + {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
                )
            else:
                assert stored.is_dir() and (stored / "toc.dat").exists()
            made.append(record)
    assert len(made) == 8

    listing = json.loads(ok(run_cli("list", "--json", env=env, cwd=tmp_path)))
    newest_first = [r["id"] for r in reversed(made)]
    assert [b["id"] for b in listing["backups"]] == newest_first
    assert listing["total"] == 8
    assert listing["totalSize"] == sum(int(str(r["size"])) for r in made)
    times = [b["timestamp"] for b in listing["backups"]]
    assert times == sorted(times, reverse=True)
    for entry in listing["backups"]:
        assert set(SEED_FIELDS) <= set(entry)

    table = ok(run_cli("list", env=env, cwd=tmp_path))
    positions = [table.index(str(i)) for i in newest_first]
    assert positions == sorted(positions)
    assert "8 backups" in table
    assert "verified" in table


def test_show_verify_and_download(
    pg_cluster: PgCluster, source: tuple[str, str], backups: Path, tmp_path: Path
) -> None:
    """show/verify read one backup; download writes the stored bytes or the raw dump."""
    _, url = source
    env = cli_env(url, backups)
    record = json.loads(ok(run_cli("backup", "--json", env=env, cwd=tmp_path)))
    backup_id = str(record["id"])

    shown = ok(run_cli("show", backup_id, env=env, cwd=tmp_path))
    assert backup_id in shown and str(record["sha256"]) in shown
    shown_json = json.loads(ok(run_cli("show", backup_id, "--json", env=env, cwd=tmp_path)))
    assert {k: shown_json[k] for k in SEED_FIELDS} == {k: record[k] for k in SEED_FIELDS}

    verified = ok(run_cli("verify", backup_id, env=env, cwd=tmp_path))
    assert f"backup {backup_id} is good" in verified
    checks = json.loads(ok(run_cli("verify", backup_id, "--json", env=env, cwd=tmp_path)))
    assert checks["ok"] is True
    assert [c["name"] for c in checks["checks"]] == ["objects", "checksum", "compression",
                                                     "structure"]  # fmt: skip

    stored = tmp_path / "stored.dump.zst"
    assert str(stored) in ok(run_cli("download", backup_id, "-o", str(stored), env=env,
                                     cwd=tmp_path))  # fmt: skip
    assert sha256_file(stored) == record["sha256"]
    raw = tmp_path / "raw.dump"
    ok(run_cli("download", backup_id, "-o", str(raw), "--decompress", env=env, cwd=tmp_path))
    assert raw.read_bytes().startswith(b"PGDMP")
    listing = subprocess.run(
        [client(pg_cluster, "pg_restore"), "--list", str(raw)], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    assert "TABLE DATA public items" in listing.stdout

    # Into a folder: the stored file name. Over an existing file: refused, file untouched.
    folder = tmp_path / "into"
    folder.mkdir()
    ok(run_cli("download", backup_id, "-o", str(folder), env=env, cwd=tmp_path))
    assert sha256_file(folder / str(record["filename"])) == record["sha256"]
    refused = run_cli("download", backup_id, "-o", str(stored), env=env, cwd=tmp_path)
    assert "already exists" in one_line_error(refused, 2)
    assert sha256_file(stored) == record["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".part")) == []


def test_download_plain_and_directory(
    source: tuple[str, str], backups: Path, tmp_path: Path
) -> None:
    """A plain backup decompresses to SQL; a directory backup downloads as a tar of its files."""
    _, url = source
    env = cli_env(url, backups)
    plain = json.loads(ok(run_cli("backup", "-F", "plain", "-C", "gzip", "--json", env=env,
                                  cwd=tmp_path)))  # fmt: skip
    sql = tmp_path / "plain.sql"
    ok(run_cli("download", str(plain["id"]), "-o", str(sql), "--decompress", env=env,
               cwd=tmp_path))  # fmt: skip
    text = sql.read_text()
    assert text.startswith("--\n-- PostgreSQL database dump")
    assert "-- PostgreSQL database dump complete" in text[-200:]
    assert gzip.decompress((backups / str(plain["id"]) / str(plain["filename"])).read_bytes()) == (
        sql.read_bytes()
    )

    directory = json.loads(ok(run_cli("backup", "-F", "directory", "-C", "gzip", "--json",
                                      env=env, cwd=tmp_path)))  # fmt: skip
    tar_path = tmp_path / "dir.tar"
    ok(run_cli("download", str(directory["id"]), "-o", str(tar_path), env=env, cwd=tmp_path))
    with tarfile.open(tar_path) as archive:
        names = archive.getnames()
    assert any(n.endswith("/toc.dat") for n in names)


# --- import -------------------------------------------------------------------------------------


def test_import_external_dumps_and_restore_them(
    pg_cluster: PgCluster,
    source: tuple[str, str],
    source_snapshot: compare.Snapshot,
    backups: Path,
    tmp_path: Path,
    targets: list[str],
) -> None:
    """Dumps made by hand (custom, plain .sql.gz, directory tarred) import and restore exactly."""
    name, url = source
    env = cli_env(url, backups)
    pg_env = {**os.environ, **pg_cluster.libpq_env(name)}
    pg_dump = client(pg_cluster, "pg_dump")
    custom = tmp_path / "by-hand.dump"
    subprocess.run([pg_dump, "--no-password", "-Fc", "-f", str(custom)], env=pg_env, check=True)
    plain = tmp_path / "by-hand.sql.gz"
    dumped = subprocess.run([pg_dump, "--no-password"], env=pg_env, check=True,
                            capture_output=True).stdout  # fmt: skip
    plain.write_bytes(gzip.compress(dumped))
    folder = tmp_path / "by-hand.dir"
    subprocess.run([pg_dump, "--no-password", "-Fd", "-j", "2", "-f", str(folder)], env=pg_env,
                   check=True)  # fmt: skip
    dir_tar = tmp_path / "by-hand.dir.tar"
    subprocess.run(["tar", "-cf", str(dir_tar), "-C", str(tmp_path), folder.name], check=True)
    # A misleading name: detection is by content, not by extension.
    disguised = tmp_path / "looks-like.sql"
    shutil.copy(custom, disguised)

    expected = {
        custom: ("custom", "none"),
        plain: ("plain", "gzip"),
        dir_tar: ("directory", "none"),
        disguised: ("custom", "none"),
    }
    for path, (fmt, compression) in expected.items():
        record = json.loads(ok(run_cli("import", str(path), "--name", "handmade", "--json",
                                       env=env, cwd=tmp_path)))  # fmt: skip
        assert record["format"] == fmt and record["compression"] == compression, path
        assert record["trigger"] == "import"
        assert record["state"] == "verified"
        assert str(record["id"]).startswith("handmade_")
        target, target_url = new_db_url(pg_cluster, "cli_import")
        targets.append(target)
        restored = run_cli("restore", str(record["id"]), "--target-url", target_url,
                           env=env, cwd=tmp_path)  # fmt: skip
        assert target in ok(restored)
        compare.assert_same(source_snapshot, compare.snapshot(target_url))
    assert len(json.loads(ok(run_cli("list", "--json", env=env, cwd=tmp_path)))["backups"]) == 4


@pytest.mark.parametrize(
    ("what", "content"),
    [
        ("an empty file", b""),
        ("a png", bytes.fromhex("89504e470d0a1a0a0000000d49484452") + b"\0" * 64),
        ("some sql", b"CREATE TABLE t (a int);\n"),
    ],
    ids=["empty", "png", "sql"],
)
def test_import_refuses_what_is_not_a_dump(
    source: tuple[str, str], backups: Path, tmp_path: Path, what: str, content: bytes
) -> None:
    """Importing something that is not a pg_dump output: exit 2, one line, nothing stored."""
    path = tmp_path / "input.dump"
    path.write_bytes(content)
    env = cli_env(source[1], backups)
    message = one_line_error(run_cli("import", str(path), env=env, cwd=tmp_path), 2)
    assert "not a postgresql dump" in message.lower()
    assert not backups.exists() or list(backups.rglob("*")) == []
    missing = run_cli("import", str(tmp_path / "nope.dump"), env=env, cwd=tmp_path)
    assert "does not exist" in one_line_error(missing, 2)


# --- delete and restore -------------------------------------------------------------------------


def test_delete(source: tuple[str, str], backups: Path, tmp_path: Path) -> None:
    """delete removes a backup from the listing and the disk; a second delete is exit 2."""
    env = cli_env(source[1], backups)
    keep = json.loads(ok(run_cli("backup", "--json", env=env, cwd=tmp_path)))["id"]
    gone = json.loads(ok(run_cli("backup", "--json", env=env, cwd=tmp_path)))["id"]
    assert f"deleted {gone}" in ok(run_cli("delete", gone, env=env, cwd=tmp_path))
    listing = json.loads(ok(run_cli("list", "--json", env=env, cwd=tmp_path)))
    assert [b["id"] for b in listing["backups"]] == [keep]
    assert not (backups / gone).exists()
    assert "not found" in one_line_error(run_cli("delete", gone, env=env, cwd=tmp_path), 2)
    assert "not found" in one_line_error(run_cli("show", gone, env=env, cwd=tmp_path), 2)


def test_restore_latest_into_a_new_database(
    pg_cluster: PgCluster, source: tuple[str, str], backups: Path, tmp_path: Path,
    targets: list[str],
) -> None:  # fmt: skip
    """`restore latest` restores the newest backup into a database it creates."""
    _, url = source
    env = cli_env(url, backups)
    settings = load_settings(database_url=url, backup_dir=str(backups))
    run_backup(settings, BackupOptions(tables=["public.notes"]))  # older: only one table
    newest = json.loads(ok(run_cli("backup", "--json", env=env, cwd=tmp_path)))
    target, target_url = new_db_url(pg_cluster)
    targets.append(target)
    result = json.loads(ok(run_cli("restore", "latest", "--target-url", target_url, "--json",
                                   env=env, cwd=tmp_path)))  # fmt: skip
    assert result["backup_id"] == newest["id"]
    assert result["replaced"] is False and result["safety_backup_id"] is None
    counts = pg_cluster.query("SELECT count(*) FROM items", dbname=target)
    assert counts[0][0] == 500


# --- bad input ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_backup(source: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backup folder holding one real backup (made with the Python API, which is quicker)."""
    folder = tmp_path_factory.mktemp("one") / "backups"
    settings = load_settings(database_url=source[1], backup_dir=str(folder))
    verify_backup(settings, run_backup(settings).id)  # 'latest' is the newest *verified* one
    return folder


COMMANDS = {
    "show": [],
    "verify": [],
    "restore": ["--target-url", "postgresql://nobody@127.0.0.1:1/never"],
    "delete": [],
    "download": ["-o", "out.bin"],
}
BAD_IDS = {  # every other shape is refused by naming.validate_id (tests/unit/test_naming.py)
    UNKNOWN_ID: "not found",
    "../etc/passwd": "is not a backup id",
    "a/b": "is not a backup id",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_and_path_like_ids(
    source: tuple[str, str], one_backup: Path, tmp_path: Path, command: str
) -> None:
    """An unknown or path-like id is exit 2 with one line saying to run 'pgkeeper list'."""
    env = cli_env(source[1], one_backup)
    before = sorted(p.as_posix() for p in one_backup.rglob("*"))
    for bad, expected in BAD_IDS.items():
        proc = run_cli(command, bad, *COMMANDS[command], env=env, cwd=tmp_path)
        message = one_line_error(proc, 2)
        assert expected in message, (bad, message)
        assert "pgkeeper list" in message
    assert sorted(p.as_posix() for p in one_backup.rglob("*")) == before  # nothing touched
    assert not (tmp_path / "out.bin").exists()


def test_latest_without_backups(source: tuple[str, str], backups: Path, tmp_path: Path) -> None:
    """`latest` with no backup at all is exit 2 and says to take one."""
    env = cli_env(source[1], backups)
    message = one_line_error(run_cli("restore", "latest", env=env, cwd=tmp_path), 2)
    assert "pgkeeper backup" in message


def test_wrong_password(pg_cluster: PgCluster, source: tuple[str, str], tmp_path: Path) -> None:
    """A wrong password: exit 2, one line saying to check it, and no password printed."""
    name, _ = source
    wrong = f"wrong-{uuid.uuid4().hex}"
    url = pg_cluster.url(name, password=wrong)
    proc = run_cli("backup", env=cli_env(url, tmp_path / "backups"), cwd=tmp_path)
    message = one_line_error(proc, 2)
    assert "check the user and password" in message
    for secret in (wrong, pg_cluster.password):
        assert secret not in proc.stdout + proc.stderr
    assert not (tmp_path / "backups").exists() or list((tmp_path / "backups").iterdir()) == []


def test_wrong_password_in_the_restore_target(
    pg_cluster: PgCluster, source: tuple[str, str], one_backup: Path, tmp_path: Path
) -> None:
    """A wrong password in --target-url: exit 2, one line, no password printed."""
    name, url = source
    wrong = f"wrong-{uuid.uuid4().hex}"
    target = pg_cluster.url(f"{name}_copy", password=wrong)
    proc = run_cli("restore", "latest", "--target-url", target, env=cli_env(url, one_backup),
                   cwd=tmp_path)  # fmt: skip
    assert "check the user and password" in one_line_error(proc, 2)
    for secret in (wrong, pg_cluster.password):
        assert secret not in proc.stdout + proc.stderr


def test_pg_dump_older_than_the_server(
    pg_cluster: PgCluster, source: tuple[str, str], tmp_path: Path
) -> None:
    """An old pg_dump on PG_BIN_DIR: exit 2 naming postgresql-client-15 and PG_BIN_DIR."""
    bin_dir = tmp_path / "oldbin"
    bin_dir.mkdir()
    fake = bin_dir / "pg_dump"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 12.3"; exit 0; fi\n'
        "echo 'pg_dump: error: this fake must never dump' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    for name in ("pg_restore", "psql"):
        (bin_dir / name).symlink_to(pg_cluster.bindir / name)
    backups = tmp_path / "backups"
    env = cli_env(source[1], backups, PG_BIN_DIR=str(bin_dir))
    message = one_line_error(run_cli("backup", env=env, cwd=tmp_path), 2)
    assert "postgresql-client-15" in message
    assert "PG_BIN_DIR" in message
    assert "12.3" in message
    assert not backups.exists() or list(backups.iterdir()) == []


def test_unreachable_server(tmp_path: Path) -> None:
    """A server that is not listening: exit 1, one line asking whether it is running."""
    url = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/db"
    message = one_line_error(run_cli("backup", env=cli_env(url, tmp_path / "b"), cwd=tmp_path), 1)
    assert "cannot connect" in message and "is the server running" in message
    assert "pw@" not in message


def test_database_missing(pg_cluster: PgCluster, tmp_path: Path) -> None:
    """A database that does not exist: exit 2, one line naming it."""
    url = pg_cluster.url(f"missing_{uuid.uuid4().hex[:8]}")
    proc = run_cli("backup", env=cli_env(url, tmp_path / "b"), cwd=tmp_path)
    message = one_line_error(proc, 2)
    assert "does not exist" in message and "missing_" in message


def test_database_url_missing(tmp_path: Path) -> None:
    """No DATABASE_URL at all: exit 2, one line saying what to set."""
    message = one_line_error(run_cli("backup", env=cli_env(None, tmp_path), cwd=tmp_path), 2)
    assert "DATABASE_URL" in message


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write to: chmod 555 for a normal user, a read-only bind as root."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    binds = [["mount", "--bind", str(folder), str(folder)],
             ["mount", "-o", "remount,ro,bind", str(folder)]]  # fmt: skip
    for argv in binds:
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
            pytest.skip(f"cannot make a read-only folder as root ({done.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_backup_folder_not_writable(
    source: tuple[str, str], read_only_folder: Path, tmp_path: Path
) -> None:
    """A backup folder that cannot be written: exit 2, one line saying how to fix it."""
    env = cli_env(source[1], read_only_folder / "backups")
    message = one_line_error(run_cli("backup", env=env, cwd=tmp_path), 2)
    assert "cannot write" in message
    assert "writable" in message and "BACKUP_DIR" in message
