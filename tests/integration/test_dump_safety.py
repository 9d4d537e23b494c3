"""Hostile and cut-off dumps against a real server (issue 10, findings 1 and 4).

- A plain dump's psql meta-commands never run (DESIGN.md invariant 13): psql agrees with the
  scanner's verdict on every case; a hostile dump stored with a manifest that says verified
  (as a dump imported before the fix would be) makes `restore`, `restore latest` and
  `restore-test` fail in one line without running anything, the target untouched, also when
  the scanner is fooled (psql's restricted mode is the backstop); a pg_dump plain file
  (its own \\restrict lines, COPY rows starting with a backslash) still restores exactly.
- Cut-off archives get 422 over the API and fail `pgkeeper verify` (invariant 14).
- The README's two by-hand steps for a plain dump work as written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zstandard

from pgkeeper import catalog, naming
from pgkeeper import storage as storages
from pgkeeper.api import PrefectLink, create_app
from pgkeeper.backup import run_backup
from pgkeeper.errors import VerificationError
from pgkeeper.manifest import StoredObject
from pgkeeper.settings import load_settings
from pgkeeper.storage import LocalStorage
from pgkeeper.upload import upload_backup
from pgkeeper.verify import verify_backup
from tests.fidelity import compare
from tests.servers.postgres import PgCluster
from tests.servers.s3 import S3Server
from tests.support.cli import cli_env, one_line_error, run_cli
from tests.support.plain_cases import CLEAN, FOUND, HEAD

with warnings.catch_warnings():
    # As in test_api.py: Starlette 1.x asks for `httpx2` under its TestClient; httpx works.
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient`",
        category=StarletteDeprecationWarning,
    )  # fmt: skip
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

RECOVERY = Path(__file__).resolve().parents[2] / "docs" / "disaster-recovery.md"
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: data,
    "gzip": gzip.compress,
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}
SUFFIX = {"none": ".sql", "gzip": ".sql.gz", "zstd": ".sql.zst"}
# Rows whose COPY lines start with a backslash: \r (carriage return), \N (NULL), \\ and \.
TRICKY_ROWS = """
CREATE TABLE tricky (a text, b text);
INSERT INTO tricky VALUES (E'\\rcarriage return first', 'cr'), (NULL, 'null first'),
    (E'\\\\N', 'backslash N'), (E'\\\\.', 'backslash dot'), (E'\\restrict abc', 'cr + restrict'),
    (E'\\\\! not a command', 'bang'), ('', 'empty');
CREATE TABLE items (id int PRIMARY KEY, label text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 300) g;
"""


def _pg_env(cluster: PgCluster, dbname: str) -> dict[str, str]:
    path = f"{cluster.bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **cluster.libpq_env(dbname), "PATH": path}


def _plain_dump(cluster: PgCluster, dbname: str) -> bytes:
    return subprocess.run(
        [str(cluster.bindir / "pg_dump"), "--no-password", "--no-owner", "--format=plain"],
        env=_pg_env(cluster, dbname), check=True, capture_output=True,
    ).stdout  # fmt: skip


@pytest.fixture(scope="module")
def source(pg_cluster: PgCluster) -> Iterator[tuple[str, str]]:
    """(name, url) of a small database whose plain dump has COPY rows starting with backslashes."""
    name = f"safety_src_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(TRICKY_ROWS, dbname=name)
    yield name, pg_cluster.url(name)
    pg_cluster.drop_database(name)


@pytest.fixture(scope="module")
def plain(pg_cluster: PgCluster, source: tuple[str, str]) -> bytes:
    """pg_dump's plain output of the source: its own \\restrict lines, tricky COPY rows."""
    dump = _plain_dump(pg_cluster, source[0])
    key = dump.split(b"\n\\restrict ", 1)[1].split(b"\n", 1)[0]
    assert b"\n\\unrestrict " + key + b"\n" in dump
    assert b"\n\\restrict abc\tcr + restrict\n" in dump  # a COPY row that looks like a key line
    assert b"\n\\rcarriage" in dump and b"\n\\N\t" in dump and b"\n\\\\.\t" in dump
    return dump


@pytest.fixture
def targets(pg_cluster: PgCluster) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        pg_cluster.drop_database(name)


def _new_target(cluster: PgCluster, targets: list[str]) -> tuple[str, str]:
    name = f"safety_target_{uuid.uuid4().hex[:8]}"
    targets.append(name)
    return name, cluster.url(name)


def _hostile(plain: bytes, line: bytes, own_key: bool = False) -> bytes:
    """``plain`` with ``line`` after its first SET, where psql would run it as a command, and
    (unless ``own_key``) without pg_dump's own \\restrict lines, whose restricted mode would
    have refused it: as pg_dump before 15.14 writes a dump, or as whoever forged it."""
    anchor = b"SET statement_timeout = 0;\n"
    assert plain.count(anchor) == 1
    if not own_key:
        key = plain.split(b"\n\\restrict ", 1)[1].split(b"\n", 1)[0]
        for own in (b"\\restrict ", b"\\unrestrict "):
            plain = plain.replace(b"\n" + own + key + b"\n", b"\n")
    return plain.replace(anchor, anchor + line)


def _store_over(backups: Path, backup_id: str, data: bytes) -> None:
    """Replace a stored backup's bytes and record their size and sha256 in its manifest, which
    still says verified: what a dump imported before hostile ones were refused looks like."""
    storage = LocalStorage(backups)
    manifest = catalog.read_manifest(storage, backup_id)
    assert manifest is not None and manifest.verified
    obj = manifest.objects[0]
    (backups / backup_id / obj.name).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    stored = StoredObject(name=obj.name, size=len(data), sha256=digest)
    catalog.write_manifest(storage, manifest.model_copy(update={"objects": [stored],
                                                                "size": len(data)}))  # fmt: skip


def _import(path: Path, env: dict[str, str], cwd: Path) -> str:
    proc = run_cli("import", str(path), "--json", env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["id"])


# --- psql agrees with the scanner -------------------------------------------------------------


def test_psql_refuses_exactly_what_the_scanner_finds(pg_cluster: PgCluster) -> None:
    """Every case of tests/support/plain_cases.py, replayed into psql in restricted mode: psql
    refuses a meta-command in exactly the cases where the scanner finds one (so the scanner's
    view of strings, comments, dollar quotes and COPY data is psql's)."""
    name = f"safety_agree_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    try:
        pg_cluster.execute("CREATE TABLE t (a text); CREATE TABLE item (a text)", dbname=name)
        psql = str(pg_cluster.bindir / "psql")
        cases = [(body, True) for body, _, _ in FOUND] + [(body, False) for body in CLEAN]
        for body, refused in cases:
            stream = b"\\restrict ourkey\n" + HEAD[: HEAD.index(b"\\restrict")] + body
            out = subprocess.run(
                [psql, "--no-password", "-X", "-q", "-f", "-"], input=stream + b"SELECT 2;\n",
                env=_pg_env(pg_cluster, name), capture_output=True, timeout=60,
            )  # fmt: skip
            said = b"backslash commands are restricted" in out.stderr or (
                b"\\unrestrict: wrong key" in out.stderr
            )
            assert said is refused, (body, out.stderr)
    finally:
        pg_cluster.drop_database(name)


# --- hostile plain dumps never run ------------------------------------------------------------

MARKER = "MARKER"  # replaced by the marker file's path
HOSTILE = {
    "shell, zstd": (b"\\! touch MARKER\n", "zstd", "psql meta-command \\! at line"),
    "output file": (b"\\o MARKER\nSELECT 1;\n", "none", "psql meta-command \\o at line"),
    "copy to program, gzip": (
        b"\\copy (SELECT 1) to program 'touch MARKER'\n",
        "gzip",
        "psql meta-command \\copy at line",
    ),
    "include": (b"\\i SCRIPT\n", "zstd", "psql meta-command \\i at line"),
    "pg_dump's key undone": (
        b"\\unrestrict KEY\n\\! touch MARKER\n",
        "zstd",
        "psql meta-command \\! at line",
    ),
    "after SQL on a line": (b"SELECT 1; \\! touch MARKER\n", "none", "meta-command \\! at line"),
    # The scanner lets a ; inside parentheses end a statement, psql does not: the scanner takes
    # the next lines for COPY data, psql reads them as commands and its restricted mode refuses.
    "scanner fooled": (
        b"SELECT (1; COPY items FROM stdin;\n\\! touch MARKER\n\\.\n);\n",
        "zstd",
        "holds a psql meta-command at line",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_stored_hostile_plain_dump_never_runs(
    pg_cluster: PgCluster, source: tuple[str, str], plain: bytes, targets: list[str],
    tmp_path: Path, case: str,
) -> None:  # fmt: skip
    """A plain dump holding a psql meta-command, stored with a manifest that says verified:
    `restore ID`, `restore latest` and `restore-test` each fail in one line naming it, the
    command never runs (no marker file), and a target with data is left as it was."""
    line, compression, words = HOSTILE[case]
    marker, script = tmp_path / "marker", tmp_path / "script.sql"
    script.write_bytes(f"\\! touch {marker}\n".encode())
    key = plain.split(b"\n\\restrict ", 1)[1].split(b"\n", 1)[0]
    line = line.replace(b"MARKER", str(marker).encode()).replace(b"SCRIPT", str(script).encode())
    undone = b"KEY" in line  # \\unrestrict of pg_dump's own key, then a command
    hostile = COMPRESS[compression](_hostile(plain, line.replace(b"KEY", key), undone))
    name, url = source
    backups = tmp_path / "backups"
    env = cli_env(url, backups, STAGING_DATABASE_URL=url)
    clean = tmp_path / f"clean{SUFFIX[compression]}"
    clean.write_bytes(COMPRESS[compression](plain))
    backup_id = _import(clean, env, tmp_path)
    _store_over(backups, backup_id, hostile)

    _, new_url = _new_target(pg_cluster, targets)
    # 'latest' of an imported plain dump (database 'unknown') is only that backup when no
    # DATABASE_URL names another database (issue 10, finding 3).
    alone = {k: v for k, v in env.items() if k != "DATABASE_URL"}
    for args, with_env in ((("restore", backup_id, "--target-url", new_url), env),
                           (("restore", "latest", "--target-url", new_url), alone)):  # fmt: skip
        proc = run_cli(*args, env=with_env, cwd=tmp_path)
        assert not marker.exists(), proc.stderr
        error = one_line_error(proc, 1)
        assert "was not restored" in error and words in error, error
    assert not pg_cluster.database_exists(new_url.rsplit("/", 1)[1])

    # Over a database with data (confirmed): refused the same way, its rows untouched.
    proc = run_cli("restore", backup_id, "--target-url", url, "--confirm", name,
                   "--no-safety-backup", env=env, cwd=tmp_path)  # fmt: skip
    assert not marker.exists(), proc.stderr
    assert words in one_line_error(proc, 1)
    assert pg_cluster.query("SELECT count(*) FROM items", dbname=name) == [(300,)]

    proc = run_cli("restore-test", backup_id, env=env, cwd=tmp_path)
    assert not marker.exists(), proc.stderr
    error = one_line_error(proc, 1)
    assert "restore-test of backup" in error and "meta-command" in error, error


def test_pg_dump_plain_output_restores_exactly(
    pg_cluster: PgCluster, source: tuple[str, str], plain: bytes, targets: list[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    """pg_dump's own plain file (its \\restrict key lines, COPY rows starting with \\r, \\N,
    \\\\) imports, restores through the restricted replay and compares equal to the source."""
    url = source[1]
    backups = tmp_path / "backups"
    env = cli_env(url, backups)
    dump = tmp_path / "by-hand.sql.zst"
    dump.write_bytes(COMPRESS["zstd"](plain))
    backup_id = _import(dump, env, tmp_path)
    _, new_url = _new_target(pg_cluster, targets)
    proc = run_cli("restore", backup_id, "--target-url", new_url, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert compare.snapshot(new_url) == compare.snapshot(url)
    rows = pg_cluster.query("SELECT a, b FROM tricky ORDER BY b", dbname=new_url.rsplit("/", 1)[1])
    assert ("\restrict abc", "cr + restrict") in rows and (None, "null first") in rows


# --- cut-off archives: the API and `pgkeeper verify` ------------------------------------------


def _custom_dump(cluster: PgCluster, dbname: str) -> bytes:
    return subprocess.run(
        [str(cluster.bindir / "pg_dump"), "--no-password", "--format=custom"],
        env=_pg_env(cluster, dbname), check=True, capture_output=True,
    ).stdout  # fmt: skip


DUMP = {"Content-Type": "application/octet-stream"}


def test_the_api_refuses_hostile_and_cut_off_dumps_with_422(
    pg_cluster: PgCluster, source: tuple[str, str], plain: bytes, tmp_path: Path
) -> None:
    """POST /api/backups/import of a plain dump with \\! or of a custom dump cut short (as
    `head -c` cuts a 41 KB dump at 20000 bytes) gets 422 in one line; nothing is stored."""
    backups = tmp_path / "backups"
    settings = load_settings(_env_file=None, database_url=source[1], backup_dir=str(backups))
    custom = _custom_dump(pg_cluster, source[0])
    bodies = {
        "psql meta-command \\! at line": _hostile(plain, b"\\! touch /tmp/never\n"),
        "pg_restore could not read the archive to its end": custom[: len(custom) // 2],
    }
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app, base_url="http://127.0.0.1") as api:
        for words, body in bodies.items():
            response = api.post("/api/backups/import", content=body, headers=DUMP)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert words in error and "\n" not in error, error
        whole = api.post("/api/backups/import", content=custom, headers=DUMP)
        assert whole.status_code == 200, whole.text
    assert [m.id for m in catalog.list_backups(LocalStorage(backups))] == [
        whole.json()["backup"]["id"]
    ]


def test_verify_fails_a_stored_cut_off_dump(
    pg_cluster: PgCluster, source: tuple[str, str], tmp_path: Path
) -> None:
    """`pgkeeper import` of a cut-off custom dump fails in one line (exit 2); the same dump
    stored with a matching manifest fails `pgkeeper verify` (exit 1) on the structure check,
    while the whole dump still verifies."""
    backups = tmp_path / "backups"
    env = cli_env(source[1], backups)
    custom = _custom_dump(pg_cluster, source[0])
    cut = tmp_path / "cut.dump"
    cut.write_bytes(custom[: len(custom) // 2])
    error = one_line_error(run_cli("import", str(cut), env=env, cwd=tmp_path), 2)
    assert "failed the structure check" in error

    whole = tmp_path / "whole.dump"
    whole.write_bytes(custom)
    backup_id = _import(whole, env, tmp_path)
    assert run_cli("verify", backup_id, env=env, cwd=tmp_path).returncode == 0
    _store_over(backups, backup_id, custom[: len(custom) // 2])
    error = one_line_error(run_cli("verify", backup_id, env=env, cwd=tmp_path), 1)
    assert "failed the structure check" in error and "read the archive to its end" in error


# --- the README's recipe ----------------------------------------------------------------------


def _readme_recipe() -> str:
    """The sh block of 'Restoring by hand' that starts with the '# 1. Look' step."""
    section = RECOVERY.read_text().split("## Restoring by hand, without pgkeeper", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    recipe = next(b for b in blocks if b.startswith("# 1. Look"))
    assert "ID.sql.zst" in recipe and "app_new" in recipe
    return recipe


def test_the_readme_recipe_replays_a_safe_dump_and_refuses_a_hostile_one(
    pg_cluster: PgCluster, source: tuple[str, str], plain: bytes, targets: list[str],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The README's two steps, as written (file and database names aside): a pg_dump file
    lists only its key lines and restores equal to its source; a hostile one lists its command,
    and the replay stops at it, runs nothing and leaves the new database empty."""
    recipe = _readme_recipe()
    marker = tmp_path / "marker"
    for kind, data in (("safe", plain),
                       ("hostile", _hostile(plain, f"\\! touch {marker}\n".encode()))):  # fmt: skip
        db, db_url = _new_target(pg_cluster, targets)
        (tmp_path / f"{kind}.sql.zst").write_bytes(COMPRESS["zstd"](data))
        script = recipe.replace("ID.sql.zst", f"{kind}.sql.zst").replace("app_new", db)
        env = _pg_env(pg_cluster, "postgres")
        out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True,
                             text=True, env=env, timeout=120)  # fmt: skip
        listed = [line for line in out.stdout.splitlines() if re.match(r"\d+: \\", line)]
        if kind == "safe":
            assert out.returncode == 0, out.stderr
            assert [line.split(" ", 2)[1] for line in listed] == ["\\restrict", "\\unrestrict"]
            assert compare.snapshot(db_url) == compare.snapshot(source[1])
        else:
            assert out.returncode == 3, out.stderr
            assert "backslash commands are restricted" in out.stderr
            assert any(line.endswith(f"\\! touch {marker}") for line in listed), listed
            assert not marker.exists()
            tables = pg_cluster.query(
                "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace",
                dbname=db,
            )
            assert tables == [(0,)]


def test_full_verification_reads_a_remote_directory_copy_to_the_end(
    monkeypatch: pytest.MonkeyPatch, source: tuple[str, str], s3_server: S3Server,
    s3_bucket: str, tmp_path: Path,
) -> None:  # fmt: skip
    """A directory backup on S3 is staged while it is hashed and read whole by pg_restore: a
    data file cut short there (its manifest matching) fails the structure check."""
    for key, value in s3_server.env(s3_bucket).items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "backups"
    settings = load_settings(database_url=source[1], backup_dir=str(local), _env_file=None,
                             backup_format="directory", backup_compression="gzip")  # fmt: skip
    manifest = run_backup(settings)
    assert upload_backup(settings, manifest.id).ok
    shutil.rmtree(local)
    s3 = next(s for s in storages.targets(settings) if s.url.startswith("s3://"))
    verified = verify_backup(settings, manifest.id, storages=[s3])
    assert verified.verification is not None
    assert verified.verification.checks[-1].detail == "pg_restore read every entry"

    obj = max((o for o in manifest.objects if o.name.endswith(".dat.gz")), key=lambda o: o.size)
    key = naming.object_key(manifest.id, obj.name)
    with s3.open_read(key) as src:
        cut = src.read()[: obj.size // 2]
    with s3.open_write(key) as out:
        out.write(cut)
    others = [o for o in manifest.objects if o.name != obj.name]
    stored = StoredObject(name=obj.name, size=len(cut), sha256=hashlib.sha256(cut).hexdigest())
    catalog.write_manifest(s3, manifest.model_copy(update={"objects": [*others, stored]}))
    with pytest.raises(VerificationError) as info:
        verify_backup(settings, manifest.id, storages=[s3])
    assert info.value.check == "structure"
    assert "pg_restore could not read the archive to its end" in str(info.value)
