"""Issue 10: what a hostile or careless input must not do, tried for real against a cluster.

Each test reproduces a finding of the hostile review first (the wrong database's `latest`,
passwords in errors, links planted in a backup folder, a copied folder, a closed pipe, a file as
BACKUP_DIR, a file:// URL with a host, world-readable backups, an unverified safety backup, two
restores in one second, unrestorable -t backups, directory format on pg_dump 15) and checks
what must happen instead.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper import catalog, naming
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.importing import import_file
from pgkeeper.manifest import Manifest, StoredObject
from pgkeeper.restore import default_target_name, restore_backup
from pgkeeper.rotate import policies_from_settings, rotate
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import LocalStorage, targets
from tests.servers.postgres import PgCluster
from tests.support.cli import PGKEEPER, cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

PASSWORD = "s3cr3t-Pw-9x"


def settings_for(url: str | None, backups: Path, **extra: object) -> Settings:
    values: dict[str, object] = {"_env_file": None, "backup_dir": str(backups),
                                 "backup_compression_threads": 1}  # fmt: skip
    if url is not None:
        values["database_url"] = url
    return load_settings(**(values | extra))


@pytest.fixture
def two_databases(pg_cluster: PgCluster) -> Iterator[tuple[str, str]]:
    """Two small databases ("shop" and "other") on the test cluster: (shop url, other url)."""
    names = [f"hostile_shop_{uuid.uuid4().hex[:6]}", f"hostile_other_{uuid.uuid4().hex[:6]}"]
    for name in names:
        pg_cluster.create_database(name)
        pg_cluster.execute(
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)",
            dbname=name,
        )
    yield pg_cluster.url(names[0]), pg_cluster.url(names[1])
    for name in names:
        pg_cluster.drop_database(name)


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


def verified_backup(settings: Settings, url: str, name: str = "auto_backup") -> Manifest:
    from pgkeeper.verify import verify_backup

    made = run_backup(settings, BackupOptions(database_url=url, name=name))
    return verify_backup(settings, made.id)


# --- finding 3: `latest` is the configured database's newest verified backup -------------------


def test_latest_never_picks_another_databases_backup(
    two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """DATABASE_URL names shop; the newest backup is other's: latest is still shop's, for
    show, restore and --database; an imported 'unknown' dump is never latest either."""
    shop, other = two_databases
    backups = tmp_path / "backups"
    settings = settings_for(shop, backups)
    mine = verified_backup(settings, shop)
    theirs = verified_backup(settings, other)
    plain = tmp_path / "x.sql"
    plain.write_text("--\n-- PostgreSQL database dump\n--\n\nSELECT 1;\n\n"
                     "--\n-- PostgreSQL database dump complete\n--\n")  # fmt: skip
    imported = import_file(settings, plain)
    assert imported.database == "unknown" and imported.verified
    env = cli_env(shop, backups)

    shown = run_cli("show", "latest", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == mine.id
    shown = run_cli("show", "latest", "--database", dbname(other), "--json", env=env, cwd=tmp_path)
    assert json.loads(shown.stdout)["id"] == theirs.id

    restored = run_cli("restore", "latest", "--json", env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    result = json.loads(restored.stdout)
    assert result["backup_id"] == mine.id
    assert result["database"].startswith(f"{dbname(shop)}_restored_")


def test_latest_without_a_configured_database_is_ambiguous_in_one_line(
    two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """With backups of two databases and no DATABASE_URL, 'latest' names both and asks which."""
    shop, other = two_databases
    backups = tmp_path / "backups"
    settings = settings_for(None, backups)
    verified_backup(settings, shop)
    verified_backup(settings, other)
    proc = run_cli("restore", "latest", env=cli_env(None, backups), cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert "ambiguous" in line and dbname(shop) in line and dbname(other) in line
    assert "--database" in line


def test_latest_of_a_database_only_imported_from_elsewhere_lists_the_candidates(
    two_databases: tuple[str, str], tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """The only backup of 'shop' came from another server (an import): 'latest' refuses to
    guess and says where the candidates come from."""
    shop, _ = two_databases
    backups = tmp_path / "backups"
    settings = settings_for(shop, backups)
    dump = tmp_path / "shop.dump"
    subprocess.run(
        [str(pg_cluster.bindir / "pg_dump"), "-Fc", "-f", str(dump)],
        env={**os.environ, **pg_cluster.libpq_env(dbname(shop))}, check=True,
    )  # fmt: skip
    imported = import_file(settings, dump)
    assert imported.database == dbname(shop) and imported.server == "import"
    proc = run_cli("restore", "latest", env=cli_env(shop, backups), cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert "from import" in line and "by its id" in line


# --- finding 6: a malformed URL never prints its password -------------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"mysql://app:{PASSWORD}@db.example.com/shop", "not a PostgreSQL url"),
        (f"postgresql+psycopg2://app:{PASSWORD}@db.example.com/shop", "not a PostgreSQL url"),
        (f"postgrsql://app:{PASSWORD}@db.example.com/shop", "not a PostgreSQL url"),
        ("postgresql://app:s3cr3t/Pw-9x@db.example.com/shop", "%2F"),
        (f"postgresql://app:{PASSWORD}@db.example.com:notaport/shop", "port"),
        (f"postgresql://app:{PASSWORD}@db.example.com/shop?sslmode=bogus", "sslmode"),
    ],
)
def test_a_malformed_database_url_is_a_usage_error_without_the_password(
    url: str, words: str, tmp_path: Path
) -> None:
    """Each shape is exit 2 in one line saying what to fix; no part of the password shows."""
    proc = run_cli("backup", env=cli_env(url, tmp_path / "backups"), cwd=tmp_path)
    line = one_line_error(proc, 2)
    assert words in line
    assert "s3cr3t" not in proc.stderr + proc.stdout and "Pw-9x" not in proc.stderr + proc.stdout


# --- finding 8: reads never leave the backup's folder ----------------------------------------


def test_a_link_planted_in_a_backup_folder_leaks_nothing(
    sample_db: str, tmp_path: Path
) -> None:
    """`<id>/link -> /secret/dir` and a manifest naming `link/secret.txt`: download, verify
    and the API's Range download all refuse it and the backup counts as damaged."""
    backups = tmp_path / "backups"
    settings = settings_for(sample_db, backups)
    made = verified_backup(settings, sample_db)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    secret = secret_dir / "secret.txt"
    secret.write_text("root-only contents\n")
    folder = backups / made.id
    (folder / "link").symlink_to(secret_dir)
    import hashlib

    planted = made.model_copy(update={
        "objects": [StoredObject(name="link/secret.txt", size=secret.stat().st_size,
                                 sha256=hashlib.sha256(secret.read_bytes()).hexdigest())],
        "size": secret.stat().st_size, "compression": "none",
    })  # fmt: skip
    (folder / naming.MANIFEST).write_bytes(planted.to_json())
    env = cli_env(sample_db, backups)

    down = run_cli("download", made.id, "-o", "-", env=env, cwd=tmp_path)
    assert down.returncode == 1 and "root-only" not in down.stdout
    assert "symbolic link" in down.stderr
    check = run_cli("verify", made.id, env=env, cwd=tmp_path)
    assert check.returncode == 1 and "objects" in check.stderr
    assert catalog.find(targets(settings), made.id)[0].state == "corrupt"

    from pgkeeper.api import PrefectLink, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        response = client.get(
            f"/api/backups/download?id={made.id}", headers={"Range": "bytes=0-5"}
        )
    assert "root-only" not in response.text
    assert response.status_code >= 400


# --- finding 9: a copied or renamed folder ----------------------------------------------------


def test_a_copied_backup_folder_is_reported_not_listed_twice(
    sample_db: str, tmp_path: Path
) -> None:
    """`cp -r A B`: list shows A once (stored in the target once) and warns about B in one
    line; show B is not found (never A under B's name); show A works."""
    backups = tmp_path / "backups"
    settings = settings_for(sample_db, backups)
    made = verified_backup(settings, sample_db)
    copy_id = naming.make_id("copy", made.started_at)
    shutil.copytree(backups / made.id, backups / copy_id)
    env = cli_env(sample_db, backups)

    listed = run_cli("list", "--json", env=env, cwd=tmp_path)
    assert listed.returncode == 0
    records = json.loads(listed.stdout)["backups"]
    assert [r["id"] for r in records] == [made.id]
    assert records[0]["locations"] == [str(backups)]
    assert "copied or renamed" in listed.stderr and len(listed.stderr.strip().splitlines()) == 1

    shown = run_cli("show", copy_id, env=env, cwd=tmp_path)
    assert shown.returncode == 2 and "Traceback" not in shown.stderr
    assert "not found" in shown.stderr
    assert run_cli("show", made.id, env=env, cwd=tmp_path).returncode == 0


# --- finding 10: the smaller ones -------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [["list"], ["show", "latest"], ["download", "latest", "-o", "-"]]
)
def test_a_closed_stdout_is_a_normal_end(
    command: list[str], sample_db: str, tmp_path: Path
) -> None:
    """`pgkeeper list | head -1`: the reader going away ends pgkeeper quietly with exit 0."""
    backups = tmp_path / "backups"
    verified_backup(settings_for(sample_db, backups), sample_db)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before pgkeeper writes a byte
    proc = subprocess.run(
        [str(PGKEEPER), *command], stdout=write_end, stderr=subprocess.PIPE, text=True,
        env=cli_env(sample_db, backups), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_backup_dir_naming_a_file_is_a_usage_error(sample_db: str, tmp_path: Path) -> None:
    """BACKUP_DIR pointing at a file: backup and list both exit 2 with one line saying so."""
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    env = cli_env(sample_db, path)
    for command in (["backup"], ["list"]):
        line = one_line_error(run_cli(*command, env=env, cwd=tmp_path), 2)
        assert "is a file, not a folder" in line


def test_a_file_url_with_a_host_is_refused(sample_db: str, tmp_path: Path) -> None:
    """file://somehost/tmp/x used to write to /tmp/x on this machine without a word."""
    target = tmp_path / "x"
    env = cli_env(sample_db, tmp_path, BACKUP_DIR=f"file://somehost{target}")
    line = one_line_error(run_cli("backup", env=env, cwd=tmp_path), 2)
    assert "names the host" in line
    assert not target.exists()


@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_backups_and_downloads_are_private_to_their_owner(
    fmt: str, sample_db: str, tmp_path: Path
) -> None:
    """Every file pgkeeper writes for a backup (pg_dump -Fd's own files too) and every
    download is 0600, every folder 0700, whatever the umask."""
    backups = tmp_path / "backups"
    env = cli_env(sample_db, backups)
    old = os.umask(0o022)
    try:
        made = run_cli("backup", "-F", fmt, "--json", env=env, cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        backup_id = json.loads(made.stdout)["id"]
        down = run_cli("download", backup_id, "-o", str(tmp_path / "copy"), env=env, cwd=tmp_path)
        assert down.returncode == 0, down.stderr
    finally:
        os.umask(old)
    for path in [backups, *backups.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o600


# --- finding 7: the safety backup is verified and kept ----------------------------------------


def test_the_safety_backup_is_verified_and_kept_by_rotation(
    two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """Restoring over a database with data: its safety backup is verified, kept until
    BACKUP_SAFETY_KEEP from now, and rotation (max 1 backup) neither deletes it nor warns that
    nothing of that database is known to restore."""
    shop, other = two_databases
    backups = tmp_path / "backups"
    settings = settings_for(shop, backups, backup_max_backups=1, backup_safety_keep="2d")
    source = verified_backup(settings, shop)
    env = cli_env(shop, backups, BACKUP_MAX_BACKUPS="1", BACKUP_SAFETY_KEEP="2d")
    proc = run_cli("restore", source.id, "--target-url", other, "--confirm", dbname(other),
                   "--json", env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    safety_id = json.loads(proc.stdout)["safety_backup_id"]
    safety, _ = catalog.find(targets(settings), safety_id)
    assert safety.state == "verified" and safety.database == dbname(other)
    assert safety.keep_until is not None
    assert 47 * 3600 < (safety.keep_until - safety.started_at).total_seconds() <= 48 * 3600 + 60
    storages = targets(settings)
    report = rotate(storages, policies_from_settings(settings, storages))
    assert catalog.find(targets(settings), safety_id)[0].id == safety_id
    assert not any("nothing here is known to restore" in w for w in report.warnings)


def test_the_safety_backup_is_verified_through_the_api(
    two_databases: tuple[str, str], tmp_path: Path
) -> None:
    """POST /api/backups/restore over a database with data: the safety backup it names is
    verified and kept until a stated time."""
    shop, other = two_databases
    backups = tmp_path / "backups"
    settings = settings_for(shop, backups, backup_api_token="admin-token-0123456789abcdef")
    source = verified_backup(settings, shop)
    from pgkeeper.api import PrefectLink, create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        response = client.post(
            "/api/backups/restore",
            json={"backupId": source.id, "target": other, "confirm": dbname(other)},
            headers={"Authorization": "Bearer admin-token-0123456789abcdef"},
        )
    assert response.status_code == 200, response.text
    safety_id = response.json()["restore"]["safetyBackupId"]
    safety, _ = catalog.find(targets(settings), safety_id)
    assert safety.state == "verified" and safety.keep_until is not None


# --- also found: default names, -t dependencies, directory format, restore-test headline ------


def test_two_restores_into_the_default_name_in_one_second_both_succeed(
    sample_db: str, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """The default target gets a random part: two restores in the same second do not collide."""
    settings = settings_for(sample_db, tmp_path / "backups")
    made = verified_backup(settings, sample_db)
    first = restore_backup(settings, made.id, None)
    second = restore_backup(settings, made.id, None)
    assert first.database != second.database
    long_name = default_target_name("x" * 63)
    assert len(long_name.encode()) <= 63
    for name in (first.database, second.database):
        pg_cluster.drop_database(name)


@pytest.fixture
def sequenced_db(pg_cluster: PgCluster) -> Iterator[str]:
    """customers and orders in public, orders.invoice defaulting to a standalone sequence; a
    table in schema shop; a table referencing customers by a foreign key."""
    name = f"hostile_seq_{uuid.uuid4().hex[:6]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        "CREATE SEQUENCE invoice_seq START 1000;"
        "CREATE TABLE customers (id serial PRIMARY KEY, name text);"
        "CREATE TABLE orders (id serial PRIMARY KEY,"
        "  invoice bigint NOT NULL DEFAULT nextval('invoice_seq'), note text);"
        "CREATE TABLE payments (id int PRIMARY KEY, customer int REFERENCES customers);"
        "CREATE SCHEMA shop; CREATE TABLE shop.items (id int);"
        "INSERT INTO customers (name) VALUES ('a'), ('b');"
        "INSERT INTO orders (note) VALUES ('x'), ('y');",
        dbname=name,
    )
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


def test_a_table_filtered_backup_takes_the_sequences_its_tables_use(
    sequenced_db: str, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """-t customers -t orders (orders.invoice uses a standalone sequence): the sequence is
    added, the backup restores into a new database, and nextval goes on where it was."""
    backups = tmp_path / "backups"
    env = cli_env(sequenced_db, backups)
    made = run_cli("backup", "-t", "public.customers", "-t", "public.orders", "--json",
                   env=env, cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert record["options"]["added_sequences"] == ["public.invoice_seq"]
    restored = run_cli("restore", record["id"], "--json", env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    target = json.loads(restored.stdout)["database"]
    rows = pg_cluster.query("INSERT INTO orders (note) VALUES ('z') RETURNING invoice",
                            dbname=target)  # fmt: skip
    assert rows == [(1002,)]
    env["BACKUP_RESTORE_TEST_ON_SOURCE"] = "true"
    tested = run_cli("restore-test", record["id"], env=env, cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr
    assert "row counts NOT compared" in tested.stdout.splitlines()[0]
    pg_cluster.drop_database(target)


@pytest.mark.parametrize(
    ("tables", "missing"),
    [
        (["shop.items"], "schema shop"),
        (["public.payments"], "table customers"),
    ],
)
def test_a_table_filter_that_cannot_restore_fails_the_backup_naming_what_is_missing(
    tables: list[str], missing: str, sequenced_db: str, tmp_path: Path
) -> None:
    """-t of a table outside public, or of one referencing an unchosen table: exit 2 before
    anything is stored, naming the missing object."""
    backups = tmp_path / "backups"
    args = [a for t in tables for a in ("-t", t)]
    line = one_line_error(run_cli("backup", *args, env=cli_env(sequenced_db, backups),
                                  cwd=tmp_path), 2)  # fmt: skip
    assert missing in line
    assert catalog.list_all([LocalStorage(backups)]) == []


def test_a_table_pattern_matching_nothing_is_a_usage_error(
    sample_db: str, tmp_path: Path
) -> None:
    """`pgkeeper backup -t nosuch` is the user's mistake: exit 2, naming the pattern."""
    line = one_line_error(
        run_cli("backup", "-t", "nosuch", env=cli_env(sample_db, tmp_path / "b"), cwd=tmp_path), 2
    )
    assert "'nosuch'" in line


def test_directory_format_defaults_to_gzip_before_pg_dump_16(
    sample_db: str, tmp_path: Path, pg_cluster: PgCluster
) -> None:
    """BACKUP_FORMAT=directory works out of the box on pg_dump 15 (gzip); zstd asked for by
    name is a clear error that names no CLI flag (the API shows it too)."""
    out = subprocess.run([str(pg_cluster.bindir / "pg_dump"), "--version"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    if int(out.split()[2].split(".")[0]) >= 16:
        pytest.skip("pg_dump 16+ writes zstd directory dumps")
    backups = tmp_path / "backups"
    env = cli_env(sample_db, backups, BACKUP_FORMAT="directory")
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["compression"] == "gzip"
    env["BACKUP_COMPRESSION"] = "zstd"
    line = one_line_error(run_cli("backup", env=env, cwd=tmp_path), 2)
    assert "pg_dump 16" in line and "--" not in line
