"""Backups that name roles a server lacks: an object owned by an application's role and GRANTs
to another, restored onto a staging server that is not a copy of production (roles are
server-wide: staging does not have them).

A restore test is then no failure of the backup: owners and grants naming missing roles are
left out (pg_restore --no-owner / --no-privileges), the test passes on what it did test and
says plainly what it did not, and nothing alerts. With the roles on staging, owners and grants
are restored and checked. ``pgkeeper restore`` keeps restoring them by default and leaves them
out only when told to (--no-owner, --no-privileges; the flow's and the API's fields).

These tests run on two throwaway clusters of their own (``source`` and ``staging``), never the
session's shared one: they create roles, which are cluster-wide.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from pgkeeper import catalog
from pgkeeper.api import PrefectLink, create_app
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.errors import ConfigError, UsageError
from pgkeeper.manifest import Manifest
from pgkeeper.monitor import Expectations, monitor
from pgkeeper.restore import LeaveOut, MissingRoleError, restore_backup
from pgkeeper.restore_test import OWNERSHIP, SCRATCH_PREFIX, headline, run_restore_test
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import targets
from tests.servers.postgres import PgCluster
from tests.servers.receivers import WebhookReceiver
from tests.support.api import AUTH, TestClient, assert_error, settings_for
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DB = "shop"
OWNER = "shop_owner"  # owns shop.items on the source
APP = "shop_app"  # SELECT/INSERT/UPDATE on the schema's tables, as the demo's application
ITEMS, ORDERS = 400, 900

SOURCE_SQL = f"""
CREATE SCHEMA shop;
CREATE TABLE shop.items (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO shop.items SELECT g, 'item ' || g FROM generate_series(1, {ITEMS}) g;
CREATE TABLE shop.orders (id serial PRIMARY KEY, item int REFERENCES shop.items, qty int);
INSERT INTO shop.orders (item, qty) SELECT 1 + g % {ITEMS}, g FROM generate_series(1, {ORDERS}) g;
ALTER TABLE shop.items OWNER TO {OWNER};
GRANT USAGE ON SCHEMA shop TO {APP};
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA shop TO {APP};
ALTER DEFAULT PRIVILEGES IN SCHEMA shop GRANT SELECT ON TABLES TO {APP};
"""  # noqa: S608 - constants of this test

# Run in the scratch database before it is dropped: what the restore did with owners and grants.
RESTORED_AS_SOURCE = f"""
SELECT (SELECT tableowner FROM pg_tables WHERE schemaname = 'shop' AND tablename = 'items')
       = '{OWNER}'
   AND has_table_privilege('{APP}', 'shop.orders', 'INSERT')
   AND EXISTS (SELECT 1 FROM pg_default_acl WHERE defaclacl::text LIKE '%{APP}=r/%')
"""  # noqa: S608 - constants of this test
OWNED_BY_RESTORER = """
SELECT (SELECT tableowner FROM pg_tables WHERE schemaname = 'shop' AND tablename = 'items')
       = current_user
"""
NO_GRANTS = """
SELECT (SELECT relacl FROM pg_class WHERE oid = 'shop.orders'::regclass) IS NULL
   AND NOT EXISTS (SELECT 1 FROM pg_default_acl)
"""

# Where the restore test's report tells to look: the README's globals command, for staging.
ADVICE = "pgkeeper restore latest -d '*' --target-url \"$STAGING_DATABASE_URL\""

LOADS = [  # (format, compression, jobs): every way a restore loads a backup
    pytest.param("custom", "zstd", 1, id="custom-stream"),
    pytest.param("custom", "zstd", 2, id="custom-parallel-stream"),
    pytest.param("custom", "none", 2, id="custom-local-file-j2"),
    pytest.param("directory", "gzip", 2, id="directory-j2"),
]


# --- clusters and settings ---------------------------------------------------------------------


def _make_roles(cluster: PgCluster, *names: str) -> None:
    for name in names:
        cluster.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(name)))


def _drop_roles(cluster: PgCluster) -> None:
    for (name,) in cluster.query(
        "SELECT rolname FROM pg_roles WHERE rolname <> 'postgres' AND rolname NOT LIKE 'pg\\_%'"
    ):
        role = sql.Identifier(name)
        for (db,) in cluster.query("SELECT datname FROM pg_database WHERE datallowconn"):
            cluster.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(role), dbname=db)
        cluster.execute(sql.SQL("DROP ROLE {}").format(role))


@pytest.fixture(scope="module")
def source() -> Iterator[PgCluster]:
    """Production: database ``shop`` with a table owned by shop_owner and grants to shop_app."""
    with PgCluster() as cluster:
        _make_roles(cluster, OWNER, APP)
        cluster.create_database(DB)
        cluster.execute(SOURCE_SQL, dbname=DB)
        yield cluster


@pytest.fixture(scope="module")
def staging_cluster() -> Iterator[PgCluster]:
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def staging(staging_cluster: PgCluster) -> Iterator[PgCluster]:
    """A staging server with no role but postgres (a test may add some: removed after it)."""
    yield staging_cluster
    for (name,) in staging_cluster.query(
        "SELECT datname FROM pg_database WHERE datname NOT IN ('postgres', 'template0', "
        "'template1')"
    ):
        staging_cluster.drop_database(name)
    _drop_roles(staging_cluster)


def make_settings(source: PgCluster, staging: PgCluster, backups: Path, **extra: Any) -> Settings:
    return load_settings(
        _env_file=None,
        database_url=source.url(DB),
        staging_database_url=staging.url("postgres"),
        backup_dir=str(backups),
        backup_compression_threads=1,
        **extra,
    )


@pytest.fixture
def settings(source: PgCluster, staging: PgCluster, tmp_path: Path) -> Settings:
    return make_settings(source, staging, tmp_path / "backups")


def stored(settings: Settings, backup_id: str) -> Manifest:
    manifest, _ = catalog.find(targets(settings), backup_id)
    return manifest


def scratch_left(staging: PgCluster) -> list[str]:
    return [r[0] for r in staging.query(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", [SCRATCH_PREFIX + "%"]
    )]  # fmt: skip


def checks_folder(tmp_path: Path, **checks: str) -> Path:
    folder = tmp_path / "checks"
    folder.mkdir(exist_ok=True)
    for name, text in checks.items():
        (folder / f"{name}.sql").write_text(text)
    return folder


# --- restore tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "compression", "jobs"), LOADS)
def test_roles_staging_lacks_are_left_out_and_the_test_passes_saying_so(
    source: PgCluster, staging: PgCluster, tmp_path: Path, fmt: str, compression: str, jobs: int
) -> None:
    """Staging has neither shop_owner nor shop_app: the backup is restored without its owners
    and grants (the scratch database holds tables owned by the restoring user, no grants), row
    counts and checks pass, and the recorded result says ownership and grants were not tested
    and why, without failing: the backup stays verified."""
    settings = make_settings(
        source, staging, tmp_path / "backups",
        backup_format=fmt, backup_compression=compression, backup_restore_jobs=jobs,
    )  # fmt: skip
    made = run_backup(settings, BackupOptions(name="rt"))
    checks = checks_folder(tmp_path, a_owned_by_restorer=OWNED_BY_RESTORER, b_no_grants=NO_GRANTS)

    result = run_restore_test(settings, checks_dir=checks)

    assert result.ok, result
    assert result.missing_roles == [APP, OWNER]
    assert result.untested == ["ownership", "grants"]
    assert result.tables_compared == 2 and result.mismatches == []
    verdicts = {c.name: (c.ok, c.skipped) for c in result.checks}
    assert verdicts == {
        "restore": (True, False), OWNERSHIP: (True, True), "row counts": (True, False),
        "a_owned_by_restorer.sql": (True, False), "b_no_grants.sql": (True, False),
    }  # fmt: skip
    assert result.untested_note == (
        f"ownership and grants not tested: staging (127.0.0.1:{staging.port}) has no roles "
        f"{APP}, {OWNER}"
    )
    line = headline(result)
    assert line.startswith("restore test passed: ")
    assert result.untested_note in line and ADVICE in line
    recorded = stored(settings, made.id)
    assert recorded.restore_tests == [result]
    assert not recorded.restore_failed and not recorded.verification_failed
    assert scratch_left(staging) == []


def test_with_the_roles_on_staging_owners_and_grants_are_restored_and_checked(
    source: PgCluster, staging: PgCluster, settings: Settings, tmp_path: Path
) -> None:
    """Once staging has the roles, the restore keeps the backup's owners and grants: a check
    sees shop.items owned by shop_owner and shop_app's privileges in the scratch database."""
    _make_roles(staging, OWNER, APP)
    run_backup(settings, BackupOptions(name="rt"))

    result = run_restore_test(
        settings, checks_dir=checks_folder(tmp_path, restored_as_source=RESTORED_AS_SOURCE)
    )

    assert result.ok, result
    assert result.missing_roles == [] and result.untested == []
    ownership = next(c for c in result.checks if c.name == OWNERSHIP)
    assert not ownership.skipped and "every role it names exists on staging" in ownership.detail
    assert "not tested" not in headline(result)


def test_only_the_grants_are_left_out_when_only_a_grantee_is_missing(
    source: PgCluster, staging: PgCluster, settings: Settings, tmp_path: Path
) -> None:
    """The demo's case: the owner exists on staging, the application role shop_app does not.
    Ownership is still restored (and checked); only the grants are left out."""
    _make_roles(staging, OWNER)
    run_backup(settings, BackupOptions(name="rt"))
    owner_kept = f"""SELECT (SELECT tableowner FROM pg_tables WHERE tablename = 'items')
                     = '{OWNER}'"""  # noqa: S608 - constants of this test

    result = run_restore_test(
        settings, checks_dir=checks_folder(tmp_path, owner_kept=owner_kept, no_grants=NO_GRANTS)
    )

    assert result.ok, result
    assert result.missing_roles == [APP] and result.untested == ["grants"]
    assert result.untested_note == (
        f"grants not tested: staging (127.0.0.1:{staging.port}) has no role {APP}"
    )


@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_an_encrypted_backup_is_read_for_its_roles_with_the_identity(
    source: PgCluster, staging: PgCluster, tmp_path: Path, fmt: str
) -> None:
    """An encrypted backup's table of contents is decrypted to find its roles (custom: its
    head, directory: toc.dat); the test passes with the same note."""
    from tests.integration.test_encryption import make_key

    key = make_key(tmp_path / "keys")
    settings = make_settings(
        source, staging, tmp_path / "backups", backup_format=fmt,
        backup_encryption_recipients=key.recipient,
        backup_encryption_identity_file=key.identity, backup_restore_jobs=2,
    )  # fmt: skip
    made = run_backup(settings, BackupOptions(name="rt"))
    assert made.encryption is not None

    result = run_restore_test(settings)

    assert result.ok, result
    assert result.missing_roles == [APP, OWNER]
    assert result.untested == ["ownership", "grants"]


def test_a_plain_dump_naming_a_role_staging_lacks_is_staging_s_error_not_the_backup_s(
    source: PgCluster, staging: PgCluster, tmp_path: Path
) -> None:
    """psql replays a plain dump as written, so it cannot leave the owners out: the restore
    test stops with one line saying staging lacks the role, records nothing (the backup is
    not judged) and leaves no scratch database."""
    settings = make_settings(source, staging, tmp_path / "backups", backup_format="plain")
    made = run_backup(settings, BackupOptions(name="rt"))

    with pytest.raises(ConfigError) as info:
        run_restore_test(settings)

    message = str(info.value)
    assert f"cannot run on staging (127.0.0.1:{staging.port}): it has no role" in message
    assert "plain dump is replayed as written" in message and ADVICE in message
    assert "do not rely" not in message
    assert stored(settings, made.id).restore_tests == []
    assert scratch_left(staging) == []


def test_a_policy_naming_a_role_staging_lacks_stops_before_the_restore(
    source: PgCluster, staging: PgCluster, settings: Settings
) -> None:
    """A row-level security policy's role cannot be left out by pg_restore: the test refuses
    to start, naming the role and the policy, before loading anything."""
    _make_roles(staging, OWNER, APP)
    source.execute(
        sql.SQL("CREATE POLICY clerks_only ON shop.orders TO {} USING (true)").format(
            sql.Identifier(APP)
        ),
        dbname=DB,
    )
    try:
        made = run_backup(settings, BackupOptions(name="rt"))
    finally:
        source.execute("DROP POLICY clerks_only ON shop.orders", dbname=DB)
    staging.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(APP)))

    with pytest.raises(ConfigError, match=rf"has no role '{APP}', which the backup names in "
                       "policy clerks_only, which a restore cannot leave out"):  # fmt: skip
        run_restore_test(settings)

    assert stored(settings, made.id).restore_tests == []
    assert scratch_left(staging) == []


# --- every door ---------------------------------------------------------------------------------


def test_cli_restore_test_and_show_say_what_was_not_tested(
    source: PgCluster, staging: PgCluster, tmp_path: Path
) -> None:
    """`pgkeeper restore-test` exits 0 with the note and the advice in its headline and a
    ``skip`` line for ownership and grants; `pgkeeper show` and `--json` carry it too, and the
    monitor's restore-test and verified checks pass with the note."""
    backups = tmp_path / "backups"
    env = cli_env(source.url(DB), backups, STAGING_DATABASE_URL=staging.url("postgres"))
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]

    tested = run_cli("restore-test", env=env, cwd=tmp_path)

    assert tested.returncode == 0, tested.stderr
    first, *rest = tested.stdout.splitlines()
    assert first.startswith("restore test passed: ") and ADVICE in first
    assert f"ownership and grants not tested: staging (127.0.0.1:{staging.port}) has no " \
           f"roles {APP}, {OWNER}" in first  # fmt: skip
    assert any(line.startswith(f"  skip {OWNERSHIP} ownership and grants not tested")
               for line in rest), tested.stdout  # fmt: skip
    assert staging.password not in tested.stdout + tested.stderr
    shown = run_cli("show", backup_id, env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "restore test" in shown.stdout and "ownership and grants not tested" in shown.stdout
    as_json = json.loads(run_cli("show", backup_id, "--json", env=env, cwd=tmp_path).stdout)
    test = as_json["restore_tests"][-1]
    assert test["ok"] is True and test["missing_roles"] == [APP, OWNER]
    assert test["untested"] == ["ownership", "grants"] and as_json["state"] == "verified"
    report = monitor(targets(load_settings(_env_file=None, backup_dir=str(backups))),
                     Expectations(backup_interval=None), database=DB)  # fmt: skip
    checks = {c.name: c for c in report.checks}
    assert checks["verified"].status == "ok"
    assert checks["restore-test"].status == "ok"
    assert "ownership and grants not tested" in checks["restore-test"].detail


def test_the_restore_test_flow_completes_with_the_note_and_alerts_nobody(
    source: PgCluster,
    staging: PgCluster,
    flow_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    webhook_receiver: WebhookReceiver,
    inboxes: None,
    tmp_path: Path,
) -> None:
    """The restore-test flow run completes; its report says what was not tested and why; no
    alert reaches the webhook (a missing role on staging is no failure of the backup)."""
    from flows.restore_test import restore_test
    from tests.support.flows import artifacts

    monkeypatch.setenv("DATABASE_URL", source.url(DB))
    monkeypatch.setenv("STAGING_DATABASE_URL", staging.url("postgres"))
    monkeypatch.setenv("BACKUP_RESTORE_TEST_ON_SOURCE", "false")
    monkeypatch.setenv("BACKUP_NOTIFY_URLS", webhook_receiver.url())
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    settings = load_settings(_env_file=None)
    made = run_backup(settings, BackupOptions(name="rt"))

    state = restore_test(return_state=True)

    assert state.is_completed(), state.message
    report = artifacts(state)["restore-test-report"].data
    assert "PASSED" in report and "ownership and grants not tested" in report and ADVICE in report
    assert "| ownership and grants | not tested |" in report
    assert not stored(settings, made.id).verification_failed
    with pytest.raises(TimeoutError):  # nothing arrives: no alert
        webhook_receiver.wait_for(lambda hook: True, 3)


# --- pgkeeper restore ----------------------------------------------------------------------------


def test_restore_keeps_owners_by_default_and_leaves_them_out_when_told(
    source: PgCluster, staging: PgCluster, settings: Settings, tmp_path: Path
) -> None:
    """A restore onto a server without the roles fails with a hint naming the globals restore
    and --no-owner --no-privileges (the target untouched: not created); with both options it
    restores, objects owned by the restoring user and no grants."""
    made = run_backup(settings, BackupOptions(name="rt"))
    target = staging.url("copy")

    with pytest.raises(MissingRoleError) as info:
        restore_backup(settings, made.id, target)

    assert "--no-owner --no-privileges" in str(info.value)
    assert "pgkeeper restore latest --database '*'" in str(info.value)
    assert staging.query("SELECT 1 FROM pg_database WHERE datname = 'copy'") == []

    result = restore_backup(settings, made.id, target,
                            leave_out=LeaveOut(owner=True, privileges=True))  # fmt: skip

    assert result.database == "copy"
    assert staging.query("SELECT count(*) FROM shop.orders", dbname="copy") == [(ORDERS,)]
    assert staging.query(OWNED_BY_RESTORER, dbname="copy") == [(True,)]
    assert staging.query(NO_GRANTS, dbname="copy") == [(True,)]


def test_cli_restore_with_no_owner_and_no_privileges(
    source: PgCluster, staging: PgCluster, tmp_path: Path
) -> None:
    """`pgkeeper restore` without the options fails in one line with the hint; with
    --no-owner --no-privileges it restores; on a plain backup the options are a usage error."""
    backups = tmp_path / "backups"
    env = cli_env(source.url(DB), backups)
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    backup_id = json.loads(made.stdout)["id"]
    target = staging.url("cli_copy")

    refused = run_cli("restore", backup_id, "--target-url", target, env=env, cwd=tmp_path)

    line = one_line_error(refused, 1)
    assert f'role "{OWNER}" does not exist' in line or f'role "{APP}" does not exist' in line
    assert "--no-owner --no-privileges" in line and staging.password not in line

    done = run_cli("restore", backup_id, "--target-url", target, "--no-owner",
                   "--no-privileges", env=env, cwd=tmp_path)  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert staging.query("SELECT count(*) FROM shop.items", dbname="cli_copy") == [(ITEMS,)]

    plain = run_cli("backup", "--format", "plain", "--json", env=env, cwd=tmp_path)
    plain_id = json.loads(plain.stdout)["id"]
    wrong = run_cli("restore", plain_id, "--target-url", staging.url("x"), "--no-owner",
                    env=env, cwd=tmp_path)  # fmt: skip
    assert "is a plain SQL dump" in one_line_error(wrong, 2)


def test_the_restore_flow_takes_no_owner_and_no_privileges(
    source: PgCluster, staging: PgCluster, flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore flow's form has no_owner and no_privileges, passed through to the restore."""
    from flows.restore import restore

    monkeypatch.setenv("DATABASE_URL", source.url(DB))
    made = run_backup(load_settings(_env_file=None), BackupOptions(name="rt"))
    target = staging.url("flow_copy", password="")  # flow parameters never carry a password
    monkeypatch.setenv("PGPASSWORD", staging.password)

    refused = restore(backup_id=made.id, target=target, return_state=True)
    assert refused.is_failed() and "--no-owner --no-privileges" in (refused.message or "")

    state = restore(backup_id=made.id, target=target, no_owner=True, no_privileges=True,
                    return_state=True)  # fmt: skip

    assert state.is_completed(), state.message
    assert staging.query(OWNED_BY_RESTORER, dbname="flow_copy") == [(True,)]


def test_api_restore_takes_no_owner_and_no_privileges(
    source: PgCluster, staging: PgCluster, tmp_path: Path
) -> None:
    """POST /api/backups/restore: without the fields a server lacking the roles answers the
    error in the API's words ("noOwner"); with noOwner and noPrivileges it restores; on a
    plain dump the fields are a 400."""
    settings = settings_for(source.url(DB), tmp_path / "backups")
    made = run_backup(settings, BackupOptions(name="rt"))
    body = {"backupId": made.id, "target": staging.url("api_copy")}
    with TestClient(create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))) as api:
        refused = api.post("/api/backups/restore", json=body, headers=AUTH)
        text = assert_error(refused, 500, "does not exist")
        assert '"noOwner": true, "noPrivileges": true' in text and "--no-owner" not in text

        done = api.post("/api/backups/restore", headers=AUTH,
                        json={**body, "noOwner": True, "noPrivileges": True})  # fmt: skip
        plain = run_backup(settings, BackupOptions(name="rt", format="plain"))
        wrong = api.post("/api/backups/restore", headers=AUTH, json={
            "backupId": plain.id, "target": staging.url("api_plain"), "noPrivileges": True,
        })  # fmt: skip
        assert_error(wrong, 400, "is a plain SQL dump")

    assert done.status_code == 200, done.text
    assert staging.query(OWNED_BY_RESTORER, dbname="api_copy") == [(True,)]
    assert staging.query(NO_GRANTS, dbname="api_copy") == [(True,)]


def test_leaving_out_is_refused_for_a_globals_backup(
    source: PgCluster, staging: PgCluster, settings: Settings
) -> None:
    """--no-owner/--no-privileges apply to a database's backup, not a server's roles."""
    from pgkeeper.server_globals import backup_globals

    made = backup_globals(settings)
    with pytest.raises(UsageError, match="apply to a database's backup"):
        restore_backup(settings, made.id, staging.url("postgres"),
                       leave_out=LeaveOut(owner=True))  # fmt: skip
