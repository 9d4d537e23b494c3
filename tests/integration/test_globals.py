"""A server's globals (roles, memberships, role settings, tablespaces): backed up with
``pg_dumpall --globals-only``, verified, restored into a server (missing roles created,
existing ones kept), and the whole-server disaster procedure performed end to end.

Roles are cluster-wide, so these tests run on two throwaway clusters of their own (``source``
and ``target``), never the session's shared one; each test leaves both as initdb made them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zstandard
from psycopg import sql

from pgkeeper import catalog, server_globals
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.errors import (
    BackupNotFoundError,
    BackupRunningError,
    IdentityError,
    NotADumpError,
    RestoreError,
    UsageError,
    VerificationError,
)
from pgkeeper.importing import import_file
from pgkeeper.manifest import Manifest
from pgkeeper.postgres import ConnInfo
from pgkeeper.restore import restore_backup
from pgkeeper.restore_test import run_restore_test
from pgkeeper.server_globals import GlobalsRestore, backup_globals, globals_lock
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import LocalStorage
from pgkeeper.verify import verify_copy
from tests.fidelity import compare
from tests.servers.postgres import PgCluster
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

AS_ROOT = os.geteuid() == 0


# --- clusters, settings and helpers ------------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> Iterator[PgCluster]:
    """A cluster whose globals are backed up (its own: roles are cluster-wide)."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def target() -> Iterator[PgCluster]:
    """A second cluster the globals are restored into."""
    with PgCluster() as cluster:
        yield cluster


def reset(cluster: PgCluster) -> None:
    """Back to what initdb made: no database but postgres and the templates, no tablespace
    but the built-in ones, no role but postgres (and the predefined pg_*)."""
    for (name,) in cluster.query(
        "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', "
        "'template1')"
    ):
        cluster.drop_database(name)
    for (name,) in cluster.query(
        "SELECT spcname FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')"
    ):
        cluster.execute(sql.SQL("DROP TABLESPACE {}").format(sql.Identifier(name)))
    cluster.execute("ALTER ROLE postgres RESET ALL")
    for (name,) in cluster.query(
        "SELECT rolname FROM pg_roles WHERE rolname <> 'postgres' AND rolname NOT LIKE 'pg\\_%'"
    ):
        role = sql.Identifier(name)
        for db in ("postgres", "template1"):
            cluster.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(role), dbname=db)
        cluster.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture
def clusters(source: PgCluster, target: PgCluster) -> Iterator[tuple[PgCluster, PgCluster]]:
    """Both clusters, reset after the test whatever it did."""
    yield source, target
    for cluster in (source, target):
        reset(cluster)


@pytest.fixture
def settings(source: PgCluster, tmp_path: Path) -> Settings:
    return load_settings(
        _env_file=None,
        database_url=source.url(),
        backup_dir=str(tmp_path / "backups"),
        backup_compression_threads=1,
    )


def storage_of(settings: Settings) -> LocalStorage:
    return LocalStorage(Path(settings.backup_dir))


@pytest.fixture
def server_dirs() -> Iterator[Callable[[], Path]]:
    """Makes empty folders the server's user owns (tablespace locations); they are removed
    after the clusters' reset (a test asks for this fixture before ``clusters``): a server
    whose tablespace folder vanished fails its checkpoints."""
    made: list[Path] = []

    def make() -> Path:
        path = Path(tempfile.mkdtemp(prefix="pgkeeper-ts-"))
        path.chmod(0o755)
        if AS_ROOT:
            shutil.chown(path, "postgres", "postgres")
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


def roles(cluster: PgCluster) -> dict[str, tuple[Any, ...]]:
    """Every role's attributes and password hash (pg_authid), by name."""
    rows = cluster.query(
        "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,"
        " rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil, rolpassword,"
        " shobj_description(oid, 'pg_authid')"
        " FROM pg_authid WHERE rolname NOT LIKE 'pg\\_%' ORDER BY 1"
    )
    return {row[0]: row[1:] for row in rows}


def memberships(cluster: PgCluster) -> set[tuple[str, str, bool]]:
    """(role, member, admin option) of every membership between non-predefined roles."""
    rows = cluster.query(
        "SELECT r.rolname, m.rolname, a.admin_option FROM pg_auth_members a"
        " JOIN pg_roles r ON r.oid = a.roleid JOIN pg_roles m ON m.oid = a.member"
        " WHERE r.rolname NOT LIKE 'pg\\_%'"
    )
    return {(str(r), str(m), bool(admin)) for r, m, admin in rows}


def role_settings(cluster: PgCluster) -> set[tuple[str, str, str]]:
    """(role, database or '', setting) of every role setting."""
    rows = cluster.query(
        "SELECT r.rolname, coalesce(d.datname, ''), unnest(s.setconfig)"
        " FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole"
        " LEFT JOIN pg_database d ON d.oid = s.setdatabase"
    )
    return {(str(r), str(d), str(c)) for r, d, c in rows}


def tablespaces(cluster: PgCluster) -> dict[str, tuple[Any, ...]]:
    rows = cluster.query(
        "SELECT spcname, pg_get_userbyid(spcowner), pg_tablespace_location(oid),"
        " spcacl::text, spcoptions::text FROM pg_tablespace"
        " WHERE spcname NOT IN ('pg_default', 'pg_global')"
    )
    return {row[0]: row[1:] for row in rows}


def can_login(cluster: PgCluster, user: str, password: str) -> bool:
    try:
        with psycopg.connect(cluster.url(user=user, password=password), connect_timeout=10):
            return True
    except psycopg.OperationalError:
        return False


def make_roles(cluster: PgCluster) -> None:
    """A role with a password (and a limit and an expiry), a NOLOGIN group with a member (with
    ADMIN), role settings (one in a database), a comment, a parameter grant, and a role the
    restoring user is a member of."""
    cluster.execute(
        "CREATE ROLE alice LOGIN PASSWORD 'alice-pw' CONNECTION LIMIT 5 "
        "VALID UNTIL '2099-01-01 00:00:00+00' CREATEDB"
    )
    cluster.execute('CREATE ROLE "Team; X" NOLOGIN')
    cluster.execute('GRANT "Team; X" TO alice WITH ADMIN OPTION')
    cluster.execute("ALTER ROLE alice SET work_mem = '8MB'")
    cluster.execute("ALTER ROLE alice SET search_path = 'a; b', public")
    cluster.execute("COMMENT ON ROLE alice IS $$alice's role; -- not a comment$$")
    cluster.execute("CREATE ROLE bob LOGIN NOINHERIT BYPASSRLS PASSWORD 'bob-pw'")
    cluster.execute("ALTER ROLE bob SET statement_timeout = '5s'")
    cluster.execute('GRANT "Team; X" TO bob')
    cluster.execute("GRANT SET ON PARAMETER work_mem TO bob")
    cluster.execute("CREATE ROLE auditors NOLOGIN")
    cluster.execute("GRANT auditors TO postgres")


def globals_text(storage: LocalStorage, manifest: Manifest) -> bytes:
    path = storage.root / manifest.id / manifest.objects[0].name
    return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())


def rewrite_globals(storage: LocalStorage, manifest: Manifest, text: bytes) -> Manifest:
    """Replace a stored globals file and re-hash its manifest: the bytes are then the
    manifest's, so only the content itself can be judged."""
    path = storage.root / manifest.id / manifest.objects[0].name
    data = zstandard.ZstdCompressor().compress(text)
    path.write_bytes(data)
    import hashlib

    obj = manifest.objects[0].model_copy(
        update={"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    )
    forged = manifest.model_copy(update={"objects": [obj], "size": len(data), "verification": None})
    catalog.write_manifest(storage, forged)
    return forged


# --- backup and verification ---------------------------------------------------------------------


def test_globals_backup_is_a_listed_verified_backup_of_the_server(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """backup_globals stores pg_dumpall --globals-only as a plain, compressed backup of kind
    globals (database '*', server host:port, role passwords recorded as included), which lists,
    passes full and quick verification, and is never a database's 'latest'."""
    source, _ = clusters
    make_roles(source)
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    assert manifest.kind == "globals"
    assert manifest.database == "*"
    assert manifest.server == f"{source.host}:{source.port}"
    assert manifest.format == "plain" and manifest.compression == "zstd"
    assert manifest.id.startswith("globals_")
    assert manifest.filename == f"{manifest.id}.globals.sql.zst"
    assert manifest.objects[0].name == manifest.filename
    assert manifest.options["role_passwords"] is True
    text = globals_text(storage, manifest)
    assert b"CREATE ROLE alice;" in text and b"PASSWORD 'SCRAM-SHA-256$" in text
    assert [m.id for m in catalog.list_backups(storage)] == [manifest.id]

    for level in ("quick", "full"):
        checked = verify_copy(settings, storage, manifest, level=level)
        assert checked.verification is not None and checked.verification.ok, checked.verification
    structure = next(c for c in checked.verification.checks if c.name == "structure")
    assert structure.detail == "header, trailer, SQL only"

    # A database's 'latest' never means the globals; '*' names them.
    entries = catalog.list_all([storage])
    with pytest.raises(BackupNotFoundError):
        catalog.latest(entries, None)
    with pytest.raises(BackupNotFoundError):
        catalog.latest(entries, "postgres")
    assert catalog.latest(entries, "*").id == manifest.id


def test_a_tampered_globals_file_fails_verification_and_restores_nothing(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """A byte changed in the stored file fails the checksum check, and a restore stops before
    executing any statement: the target server gains no role."""
    source, target = clusters
    make_roles(source)
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    path = storage.root / manifest.id / manifest.objects[0].name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as failed:
        verify_copy(settings, storage, manifest)
    assert failed.value.check == "checksum"
    before = roles(target)
    with pytest.raises(VerificationError) as refused:
        restore_backup(settings, manifest.id, target.url(), storages=[storage])
    assert refused.value.check == "checksum"
    assert "nothing was restored" in str(refused.value)
    assert roles(target) == before


def test_a_whole_cluster_dump_is_not_a_globals_backup(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """A globals file that holds databases (\\connect) fails the structure check, saying it is
    a whole pg_dumpall and not --globals-only."""
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    text = globals_text(storage, manifest)
    forged = rewrite_globals(
        storage, manifest, text.replace(b"\n--\n-- Roles", b"\n\\connect template1\n--\n-- Roles")
    )
    with pytest.raises(VerificationError, match="whole pg_dumpall cluster dump"):
        verify_copy(settings, storage, forged)


def test_two_globals_backups_of_one_server_never_run_at_once(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """While one globals backup of a server holds its lock, another is refused in one line,
    and leaves nothing behind; a database's backup lock is another lock."""
    source, _ = clusters
    storage = storage_of(settings)
    with globals_lock(ConnInfo.parse(source.url())):
        with pytest.raises(BackupRunningError, match="another backup of the globals"):
            backup_globals(settings, storage=storage)
        # A backup of the postgres database itself is not held up by the globals' lock.
        made = run_backup(settings, BackupOptions(name="pgdb"), storage=storage)
    assert [m.id for m in catalog.list_backups(storage)] == [made.id]
    assert list(storage.root.iterdir()) == [storage.root / made.id]


def test_a_backup_role_that_is_not_superuser_gets_no_role_passwords(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """A user who may not read pg_authid backs up the globals with --no-role-passwords,
    recorded in the manifest; restored roles then have no password, and the report says so."""
    source, target = clusters
    make_roles(source)
    source.execute("CREATE ROLE backup_op LOGIN PASSWORD 'op-pw'")
    storage = storage_of(settings)
    manifest = backup_globals(
        settings, source.url(user="backup_op", password="op-pw"), storage=storage
    )
    assert manifest.options["role_passwords"] is False
    text = globals_text(storage, manifest)
    assert b"CREATE ROLE alice;" in text and b"PASSWORD" not in text
    verify_copy(settings, storage, manifest)
    report = restore_backup(settings, manifest.id, target.url(), storages=[storage])
    assert isinstance(report, GlobalsRestore)
    assert report.role_passwords is False
    assert roles(target)["alice"][9] is None  # rolpassword
    assert any("holds no role passwords" in line for line in report.lines())


# --- restore -------------------------------------------------------------------------------------


def test_restore_into_another_server_creates_roles_memberships_settings_and_tablespaces(
    server_dirs: Callable[[], Path], clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """Restored into a fresh server, the globals recreate every role with its attributes,
    password hash and comment, the memberships (with ADMIN), the role settings and parameter
    grants; a tablespace whose location exists (empty) is created, one whose location is
    gone or in use is skipped with the reason; the restoring user is never altered."""
    source, target = clusters
    make_roles(source)
    free, gone, busy = server_dirs(), server_dirs(), server_dirs()
    for name, location in (("ts_free", free), ("ts_gone", gone), ("ts_busy", busy)):
        source.execute(
            sql.SQL("CREATE TABLESPACE {} OWNER alice LOCATION {}").format(
                sql.Identifier(name), sql.Literal(str(location))
            )
        )
    source.execute('GRANT CREATE ON TABLESPACE ts_free TO "Team; X"')
    source.execute("COMMENT ON TABLESPACE ts_free IS 'fast disks'")
    source.execute("ALTER TABLESPACE ts_free SET (random_page_cost = 1.1)")
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    verify_copy(settings, storage, manifest)
    expected_tablespaces = tablespaces(source)
    # ts_free's folder is free again and ts_gone's is gone; ts_busy stays the source's.
    source.execute("DROP TABLESPACE ts_free")
    source.execute("DROP TABLESPACE ts_gone")
    gone.rmdir()

    report = restore_backup(settings, manifest.id, target.url(), storages=[storage])
    assert isinstance(report, GlobalsRestore)
    assert report.ok, report.lines()
    assert sorted(report.created_roles) == ["Team; X", "alice", "auditors", "bob"]
    assert report.kept_roles == ["postgres"]
    assert report.created_tablespaces == ["ts_free"]
    assert tablespaces(target) == {"ts_free": expected_tablespaces["ts_free"]}
    skipped = {s.statement: s.reason for s in report.skipped}
    assert any("ts_gone" in s and "does not exist" in r for s, r in skipped.items()), skipped
    assert any("ts_busy" in s and "already in use" in r for s, r in skipped.items()), skipped
    assert any("auditors" in s and "restoring user postgres" in r for s, r in skipped.items()), (
        skipped
    )

    wanted = roles(source)
    wanted["postgres"] = roles(target)["postgres"]  # kept as it was
    assert roles(target) == wanted
    assert memberships(target) == memberships(source) - {("auditors", "postgres", False)}
    assert role_settings(target) == role_settings(source)
    assert target.query("SELECT has_parameter_privilege('bob', 'work_mem', 'SET')") == [(True,)]
    assert can_login(target, "alice", "alice-pw")
    assert can_login(target, "bob", "bob-pw")
    lines = report.lines()
    assert "created role alice" in lines
    assert "kept role postgres (it exists: left as it is)" in lines
    assert "applied membership Team; X to alice" in lines
    assert "applied setting alice: work_mem" in lines
    assert "created tablespace ts_free" in lines
    assert all("SCRAM" not in line and "alice-pw" not in line for line in lines)


def test_restore_keeps_existing_roles_as_they_are(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """Roles that already exist on the target keep their attributes, password and settings
    (their CREATE, ALTER and COMMENT are skipped and they are reported as kept); missing roles
    are created, and memberships between existing roles are applied."""
    source, target = clusters
    make_roles(source)
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    target.execute("CREATE ROLE alice LOGIN PASSWORD 'other-pw' NOCREATEDB")
    target.execute("ALTER ROLE alice SET work_mem = '1MB'")
    target.execute('CREATE ROLE "Team; X" NOLOGIN')
    target.execute('GRANT "Team; X" TO alice')  # held already, without ADMIN
    alice_before = roles(target)["alice"]
    report = restore_backup(settings, manifest.id, target.url(), storages=[storage])
    assert isinstance(report, GlobalsRestore)
    assert report.ok, report.lines()
    assert sorted(report.kept_roles) == ["Team; X", "alice", "postgres"]
    assert sorted(report.created_roles) == ["auditors", "bob"]
    assert roles(target)["alice"] == alice_before
    assert can_login(target, "alice", "other-pw") and not can_login(target, "alice", "alice-pw")
    assert ("alice", "", "work_mem=1MB") in role_settings(target)
    assert not any(
        r == "alice" and c.startswith("search_path") for r, _, c in role_settings(target)
    )
    assert ("bob", "", "statement_timeout=5s") in role_settings(target)
    assert ("Team; X", "bob", False) in memberships(target)
    assert "Team; X to alice" in report.memberships  # already held: applied without error

    again = restore_backup(settings, manifest.id, target.url(), storages=[storage])
    assert isinstance(again, GlobalsRestore) and again.ok and not again.created_roles


def test_a_hostile_globals_file_executes_nothing(
    clusters: tuple[PgCluster, PgCluster], settings: Settings, tmp_path: Path
) -> None:
    """A psql meta-command planted in a globals file (its manifest re-hashed to match) fails
    verification and stops a restore before any statement runs; SQL that is not about roles
    or tablespaces (COPY ... TO PROGRAM) is never executed, only reported as skipped."""
    source, target = clusters
    make_roles(source)
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    text = globals_text(storage, manifest)
    marker = tmp_path / "marker"
    planted = text.replace(
        b"CREATE ROLE alice;", f"\\! touch {marker}\nCREATE ROLE alice;".encode()
    )
    hostile = rewrite_globals(storage, manifest, planted)
    with pytest.raises(VerificationError, match=r"meta-command \\!"):
        verify_copy(settings, storage, hostile)
    before = roles(target)
    with pytest.raises(VerificationError, match="nothing was executed"):
        restore_backup(settings, hostile.id, target.url(), storages=[storage])
    assert not marker.exists()
    assert roles(target) == before

    program = tmp_path / "program"
    sql_hostile = text.replace(
        b"CREATE ROLE alice;",
        f"COPY (SELECT 1) TO PROGRAM 'touch {program}';\nCREATE ROLE alice;".encode(),
    )
    forged = rewrite_globals(storage, manifest, sql_hostile)
    report = restore_backup(settings, forged.id, target.url(), storages=[storage])
    assert isinstance(report, GlobalsRestore)
    assert not program.exists()
    assert "alice" in report.created_roles
    copy = next(s for s in report.skipped if s.statement.startswith("COPY"))
    assert "not a statement about roles or tablespaces" in copy.reason
    assert str(program) not in copy.statement  # a string's contents never reach the report


def test_restore_test_refuses_a_globals_backup(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """restore-test never restores a globals backup (it would create roles on staging): by
    id, or named with --database '*', it is a one-line usage error."""
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    verify_copy(settings, storage, manifest)
    for backup_id, database in ((manifest.id, None), (None, "*")):
        with pytest.raises(UsageError, match="not restore-tested"):
            run_restore_test(settings, backup_id, storages=[storage], database=database)


# --- the front doors -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_backs_up_lists_restores_and_refuses_to_restore_test_the_globals(
    clusters: tuple[PgCluster, PgCluster], tmp_path: Path
) -> None:
    """`pgkeeper backup --globals` takes, verifies and lists a globals backup (database shown
    as '(globals)'); `pgkeeper restore ID --target-url` prints one line per created, kept and
    skipped item (or the report as JSON); `restore-test` refuses it in one line; dump options
    with --globals are a usage error."""
    source, target = clusters
    make_roles(source)
    backups = tmp_path / "backups"
    env = cli_env(source.url(), backups, BACKUP_COMPRESSION_THREADS="1")
    made = run_cli("backup", "--globals", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    assert record["kind"] == "globals" and record["database"] == "*"
    assert record["state"] == "verified"
    assert record["filename"].endswith(".globals.sql.zst")
    backup_id = record["id"]

    listed = run_cli("list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(backup_id))
    assert "(globals)" in row and "verified" in row
    shown = run_cli("show", backup_id, env=env, cwd=tmp_path)
    assert f"(globals) on {source.host}:{source.port}" in shown.stdout
    assert "role passwords  included" in shown.stdout

    restored = run_cli("restore", backup_id, "--target-url", target.url(), env=env, cwd=tmp_path)
    assert restored.returncode == 0, restored.stderr
    lines = restored.stdout.splitlines()
    assert lines[0].startswith(f"restored the globals of {backup_id} into 127.0.0.1:")
    assert "  created role alice" in lines
    assert "  kept role postgres (it exists: left as it is)" in lines
    assert any(line.startswith("  skipped line ") and "auditors" in line for line in lines)
    again = run_cli(
        "restore", backup_id, "--target-url", target.url(), "--json", env=env, cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["ok"] is True and report["created_roles"] == []
    assert "alice" in report["kept_roles"]
    assert "SCRAM" not in again.stdout + restored.stdout

    refused = run_cli("restore-test", backup_id, env=env, cwd=tmp_path)
    assert "not restore-tested" in one_line_error(refused, 2)
    refused = run_cli("restore-test", "--database", "*", env=env, cwd=tmp_path)
    assert "not restore-tested" in one_line_error(refused, 2)
    bad = run_cli("backup", "--globals", "--format", "plain", env=env, cwd=tmp_path)
    assert "do not apply to --globals" in one_line_error(bad, 2)

    # -d NAME: the globals of that inventory database's server (here the only one).
    fleet = cli_env(None, backups, BACKUP_DATABASES=source.url("postgres"))
    by_name = run_cli("backup", "--globals", "-d", "postgres", "--json", env=fleet, cwd=tmp_path)
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout)["server"] == f"{source.host}:{source.port}"


def test_api_restore_answers_the_globals_report(
    clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """POST /api/backups/restore of a globals backup restores into the target server and
    answers what was created, kept and skipped."""
    from pgkeeper.api import PrefectLink, create_app
    from tests.support.api import AUTH, TestClient, settings_for

    source, target = clusters
    make_roles(source)
    storage = storage_of(settings)
    manifest = backup_globals(settings, storage=storage)
    api_settings = settings_for(source.url(), storage.root)
    app = create_app(api_settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app) as client:
        response = client.post(
            "/api/backups/restore",
            json={"backupId": manifest.id, "target": target.url()},
            headers=AUTH,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert body["backup"]["kind"] == "globals"
    assert body["restore"]["database"] == "*"
    report = body["globals"]
    assert report["ok"] is True and report["rolePasswords"] is True
    assert sorted(report["createdRoles"]) == ["Team; X", "alice", "auditors", "bob"]
    assert report["keptRoles"] == ["postgres"]
    assert "Team; X to alice" in report["memberships"]
    skipped = next(s for s in report["skipped"] if "auditors" in s["statement"])
    assert "restoring user postgres" in skipped["reason"] and skipped["failed"] is False
    assert "SCRAM" not in response.text
    assert can_login(target, "alice", "alice-pw")


# --- the whole-server disaster -------------------------------------------------------------------

SERVER_ROLES = """
CREATE ROLE owner_a LOGIN PASSWORD 'owner-pw' CREATEDB;
CREATE ROLE app LOGIN PASSWORD 'app-pw' CONNECTION LIMIT 20;
CREATE ROLE readers NOLOGIN;
GRANT readers TO app;
ALTER ROLE app SET search_path = app, public;
ALTER ROLE app SET statement_timeout = '45s';
"""

CRM = """
CREATE SCHEMA app AUTHORIZATION app;
SET ROLE app;
CREATE TABLE app.customers (id serial PRIMARY KEY, name text NOT NULL, secret text);
INSERT INTO app.customers (name, secret)
    SELECT 'c' || g, md5(g::text) FROM generate_series(1, 200) g;
CREATE VIEW app.names AS SELECT id, name FROM app.customers;
ALTER TABLE app.customers ENABLE ROW LEVEL SECURITY;
CREATE POLICY readers_see_few ON app.customers FOR SELECT TO readers USING (id < 100);
GRANT USAGE ON SCHEMA app TO readers;
GRANT SELECT (id, name) ON app.customers TO readers;
GRANT SELECT ON app.names TO readers;
ALTER DEFAULT PRIVILEGES IN SCHEMA app GRANT SELECT ON TABLES TO readers;
RESET ROLE;
"""

LEDGER = """
CREATE TABLE public.entries (id bigserial PRIMARY KEY, amount numeric(12, 2), at date)
    TABLESPACE disk2;
INSERT INTO public.entries (amount, at)
    SELECT g * 1.5, date '2025-01-01' + g FROM generate_series(1, 300) g;
CREATE TABLE public.owned_by_a (id int PRIMARY KEY);
ALTER TABLE public.owned_by_a OWNER TO owner_a;
GRANT INSERT, SELECT ON public.entries TO app;
GRANT USAGE ON SEQUENCE public.entries_id_seq TO app;
CREATE FUNCTION public.total() RETURNS numeric LANGUAGE sql SECURITY DEFINER
    AS $$ SELECT sum(amount) FROM public.entries $$;
ALTER FUNCTION public.total() OWNER TO owner_a;
REVOKE ALL ON FUNCTION public.total() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.total() TO readers;
"""

DATABASE_LEVEL = """
REVOKE CONNECT ON DATABASE ledger FROM PUBLIC;
GRANT CONNECT ON DATABASE ledger TO app;
GRANT CREATE ON DATABASE crm TO owner_a;
ALTER DATABASE crm SET work_mem = '12MB';
ALTER ROLE readers IN DATABASE crm SET statement_timeout = '10s';
COMMENT ON DATABASE crm IS 'the customers';
"""


def database_properties(cluster: PgCluster, name: str) -> tuple[Any, ...]:
    """What a database is beyond its contents: owner, access, settings, comment."""
    rows = cluster.query(
        "SELECT pg_get_userbyid(d.datdba),"
        " (SELECT array_agg(a::text ORDER BY a::text) FROM unnest(d.datacl) a), d.datconnlimit,"
        " shobj_description(d.oid, 'pg_database'),"
        " (SELECT array_agg(coalesce(r.rolname, '') || ':' || c ORDER BY 1)"
        "  FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole,"
        "  unnest(s.setconfig) c WHERE s.setdatabase = d.oid)"
        " FROM pg_database d WHERE d.datname = %s",
        [name],
    )
    return rows[0]


@pytest.mark.slow
def test_whole_server_disaster_roles_and_databases_rebuilt_from_backups(
    server_dirs: Callable[[], Path], clusters: tuple[PgCluster, PgCluster], settings: Settings
) -> None:
    """The README's whole-server procedure, performed: a server with roles (passwords,
    settings, memberships), a tablespace, and three databases owned by those roles with
    grants, policies and default privileges is backed up (globals, then each database, each
    verified); the databases, the tablespace and the roles are dropped; the globals are
    restored, then each database by 'latest --database NAME'. Roles, memberships, role
    settings and every database (object by object, owners and grants included, and the
    database itself: owner, access, settings, comment) come back as they were."""
    server, _ = clusters
    server.execute(SERVER_ROLES)
    disk2 = server_dirs()
    server.execute(
        sql.SQL("CREATE TABLESPACE disk2 OWNER owner_a LOCATION {}").format(sql.Literal(str(disk2)))
    )
    server.create_database("fid", owner="owner_a")
    compare.load_schema(server.url("fid"))  # its own roles, owners, grants, RLS, ...
    server.create_database("crm", owner="app")
    server.execute(CRM, dbname="crm")
    server.create_database("ledger")
    server.execute(LEDGER, dbname="ledger")
    server.execute(DATABASE_LEVEL)
    databases = ("fid", "crm", "ledger")
    before = {
        "roles": roles(server),
        "memberships": memberships(server),
        "settings": role_settings(server),
        "tablespaces": tablespaces(server),
    }
    snapshots = {db: compare.snapshot(server.url(db)) for db in databases}
    properties = {db: database_properties(server, db) for db in databases}

    # Take: the globals, then each database; each verified.
    storage = storage_of(settings)
    made = backup_globals(settings, storage=storage)
    verify_copy(settings, storage, made)
    for db in databases:
        dump = run_backup(settings, BackupOptions(database_url=server.url(db)), storage=storage)
        verify_copy(settings, storage, dump)

    # The disaster: every database, the tablespace and every role are gone.
    reset(server)
    assert roles(server).keys() == {"postgres"}

    # Recover: the globals into the server, then each database by its name.
    report = restore_backup(settings, made.id, server.url(), storages=[storage])
    assert isinstance(report, GlobalsRestore)
    assert report.ok, report.lines()
    assert report.created_tablespaces == ["disk2"]
    for db in databases:
        newest = catalog.latest_backup(settings, [storage], db)
        restore_backup(settings, newest.id, server.url(db), storages=[storage])

    after = {
        "roles": roles(server),
        "memberships": memberships(server),
        "settings": role_settings(server),
        "tablespaces": tablespaces(server),
    }
    for db in databases:
        compare.assert_same(snapshots[db], compare.snapshot(server.url(db)))
    assert {db: database_properties(server, db) for db in databases} == properties
    assert after == before
    assert server.query(
        "SELECT tablespace FROM pg_tables WHERE tablename = 'entries'", dbname="ledger"
    ) == [("disk2",)]
    assert can_login(server, "owner_a", "owner-pw") and can_login(server, "app", "app-pw")


def test_a_restored_database_gets_its_owner_access_and_settings_back(
    clusters: tuple[PgCluster, PgCluster], settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A restore that creates the database gives it the backup's owner, access privileges,
    settings, per-role settings and comment (from the archive's own entries). Without the
    roles its objects need it fails and says to restore the globals first; when only a
    database-level grant names a missing role, the data is restored and a warning says so; a
    replaced database keeps its owner; a plain dump has none of these to give."""
    source, target = clusters
    source.execute(SERVER_ROLES)
    source.execute("CREATE ROLE visitor NOLOGIN")
    source.create_database("crm", owner="app")
    source.execute(CRM, dbname="crm")
    source.execute(DATABASE_LEVEL.split("\n", 3)[3])  # crm's lines only
    source.execute("GRANT CONNECT ON DATABASE crm TO visitor")
    wanted = database_properties(source, "crm")
    storage = storage_of(settings)
    dump = run_backup(settings, BackupOptions(database_url=source.url("crm")), storage=storage)
    plain = run_backup(
        settings, BackupOptions(database_url=source.url("crm"), format="plain"), storage=storage
    )

    with pytest.raises(RestoreError, match="restore the server's globals first"):
        restore_backup(settings, dump.id, target.url("early"), storages=[storage])
    assert not target.database_exists("early")

    target.execute("CREATE ROLE app LOGIN; CREATE ROLE readers; CREATE ROLE owner_a")
    with caplog.at_level("WARNING", logger="pgkeeper.database_properties"):
        restore_backup(settings, dump.id, target.url("early"), storages=[storage])
    assert "role visitor does not exist on this server" in caplog.text
    early = database_properties(target, "early")
    assert early[0] == "app" and early[3:] == wanted[3:]
    assert target.query("SELECT count(*) FROM app.customers", dbname="early") == [(200,)]

    made = backup_globals(settings, storage=storage)
    restore_backup(settings, made.id, target.url(), storages=[storage])
    restore_backup(settings, dump.id, target.url("crm"), storages=[storage])
    assert database_properties(target, "crm") == wanted

    target.execute("ALTER DATABASE crm OWNER TO readers")
    target.execute("ALTER DATABASE crm RESET ALL")
    restore_backup(settings, dump.id, target.url("crm"), confirm="crm", storages=[storage])
    replaced = database_properties(target, "crm")
    assert replaced[0] == "readers"  # a replaced database keeps its owner
    assert replaced[3:] == wanted[3:]  # its comment and settings are the backup's

    restore_backup(settings, plain.id, target.url("from_plain"), storages=[storage])
    assert database_properties(target, "from_plain") == ("postgres", None, -1, None, None)


def test_globals_go_to_database_urls_server_by_default_and_are_capped(
    clusters: tuple[PgCluster, PgCluster], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server URL whose database is '*' (the fleet's) backs up that server's globals;
    restored with no target they go into DATABASE_URL's server, where every role exists
    (all kept, nothing created); a file over the size cap is refused before anything runs."""
    source, _ = clusters
    make_roles(source)
    storage = storage_of(settings)
    manifest = backup_globals(settings, source.url("*"), storage=storage)
    assert manifest.server == f"{source.host}:{source.port}"
    report = restore_backup(settings, manifest.id, None, storages=[storage])
    assert isinstance(report, GlobalsRestore)
    assert report.target == manifest.server
    assert report.created_roles == [] and report.ok
    assert sorted(report.kept_roles) == ["Team; X", "alice", "auditors", "bob", "postgres"]

    monkeypatch.setattr(server_globals, "MAX_GLOBALS_BYTES", 256)
    with pytest.raises(UsageError, match=r"larger than .* reads globals whole"):
        restore_backup(settings, manifest.id, None, storages=[storage])


def test_import_takes_pg_dumpall_globals_only_and_refuses_a_whole_cluster(
    clusters: tuple[PgCluster, PgCluster], settings: Settings, tmp_path: Path
) -> None:
    """`pgkeeper import` of pg_dumpall --globals-only output makes a verified globals backup
    that restores into a server; a whole pg_dumpall (with databases) is refused."""
    source, target = clusters
    make_roles(source)
    env = {**os.environ, **source.libpq_env()}
    pg_dumpall = str(source.bindir / "pg_dumpall")
    only = tmp_path / "globals.sql"
    whole = tmp_path / "cluster.sql"
    subprocess.run([pg_dumpall, "--globals-only", "-f", str(only)], env=env, check=True)
    subprocess.run([pg_dumpall, "-f", str(whole)], env=env, check=True)
    imported = import_file(settings, only, name="old_server")
    assert (imported.kind, imported.database, imported.server) == ("globals", "*", "import")
    assert imported.filename.endswith(".globals.sql")
    assert imported.verified
    report = restore_backup(settings, imported.id, target.url(), storages=[storage_of(settings)])
    assert isinstance(report, GlobalsRestore) and "alice" in report.created_roles
    with pytest.raises(NotADumpError, match="cluster dump with databases"):
        import_file(settings, whole)


@pytest.mark.skipif(shutil.which("age-keygen") is None, reason="age is not installed")
def test_globals_are_encrypted_like_a_database_and_need_the_identity_to_restore(
    clusters: tuple[PgCluster, PgCluster], settings: Settings, tmp_path: Path
) -> None:
    """With BACKUP_ENCRYPTION_RECIPIENTS, the globals (role password hashes) are stored as an
    age file; restoring them needs the identity, and with it creates the roles."""
    source, target = clusters
    make_roles(source)
    key = tmp_path / "key.txt"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(key)], check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    encrypting = settings.model_copy(update={"backup_encryption_recipients": public})
    storage = storage_of(settings)
    manifest = backup_globals(encrypting, storage=storage)
    stored = (Path(settings.backup_dir) / manifest.id / manifest.objects[0].name).read_bytes()
    assert manifest.encryption is not None and stored.startswith(b"age-encryption.org/v1")
    assert b"SCRAM" not in stored and b"alice" not in stored
    with pytest.raises(IdentityError):
        restore_backup(encrypting, manifest.id, target.url(), storages=[storage])
    assert "bob" not in roles(target)
    opening = encrypting.model_copy(update={"backup_encryption_identity_file": key})
    report = restore_backup(opening, manifest.id, target.url(), storages=[storage])
    assert isinstance(report, GlobalsRestore) and "bob" in report.created_roles
