"""Secrets from files and restore tests kept off production (issue 14), through the real doors.

- Every secret setting also reads ``NAME_FILE``; a URL without password uses libpq's
  ``.pgpass`` / ``PGPASSFILE`` (pg_dump and psycopg read it; pgkeeper passes it on).
- Without STAGING_DATABASE_URL, restore-test refuses the source server (CLI and flow) unless
  BACKUP_RESTORE_TEST_ON_SOURCE=true says it may; nothing is restored or recorded.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pgkeeper import catalog
from pgkeeper.storage import targets
from tests.servers.postgres import PgCluster
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration


def _restore_test_databases(pg_cluster: PgCluster) -> list[str]:
    rows = pg_cluster.query("SELECT datname FROM pg_database WHERE datname LIKE 'pgk_%'")
    return [r[0] for r in rows]


def test_restore_test_refuses_the_source_server_unless_allowed(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """No STAGING_DATABASE_URL: one line naming it and the opt-in, exit 2, nothing restored or
    recorded. BACKUP_RESTORE_TEST_ON_SOURCE=true, or a staging URL, and it runs."""
    backups = tmp_path / "backups"
    env = cli_env(sample_db, backups)
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    before = _restore_test_databases(pg_cluster)
    refused = run_cli("restore-test", backup_id, env=env, cwd=tmp_path)
    line = one_line_error(refused, 2)
    assert "STAGING_DATABASE_URL is not set" in line
    assert "BACKUP_RESTORE_TEST_ON_SOURCE=true" in line
    assert _restore_test_databases(pg_cluster) == before
    shown = json.loads(run_cli("show", backup_id, "--json", env=env, cwd=tmp_path).stdout)
    assert shown["restore_tests"] == []

    allowed_env = {**env, "BACKUP_RESTORE_TEST_ON_SOURCE": "true"}
    allowed = run_cli("restore-test", backup_id, env=allowed_env, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    staging = pg_cluster.url("postgres")
    on_staging = run_cli("restore-test", backup_id, env={**env, "STAGING_DATABASE_URL": staging},
                         cwd=tmp_path)  # fmt: skip
    assert on_staging.returncode == 0, on_staging.stderr


def test_the_restore_test_flow_refuses_the_source_server(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow fails with the same one-line reason and records nothing."""
    from flows.backup import backup
    from flows.restore_test import restore_test

    backup_id = backup()
    monkeypatch.delenv("BACKUP_RESTORE_TEST_ON_SOURCE")
    state = restore_test(return_state=True)
    assert state.is_failed()
    assert "STAGING_DATABASE_URL is not set" in (state.message or "")
    from pgkeeper.settings import load_settings

    manifest, _ = catalog.find(targets(load_settings(_env_file=None)), backup_id)
    assert manifest.restore_tests == []


def test_secrets_from_files_and_pgpass_reach_every_client(
    sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """DATABASE_URL_FILE holds the URL (Docker/Kubernetes secret); then a URL without any
    password and a .pgpass named by PGPASSFILE: backup (pg_dump, psycopg), verify and restore
    (pg_restore, psql) all connect. Both DATABASE_URL and DATABASE_URL_FILE: one-line error."""
    backups = tmp_path / "backups"
    secret = tmp_path / "database_url"
    secret.write_text(sample_db + "\n")
    env = cli_env(None, backups, DATABASE_URL_FILE=str(secret))
    made = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    both = run_cli("list", env={**env, "DATABASE_URL": sample_db}, cwd=tmp_path)
    assert "DATABASE_URL and DATABASE_URL_FILE are both set" in one_line_error(both, 2)

    parts = urlsplit(sample_db)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"{parts.hostname}:{parts.port}:*:{parts.username}:{pg_cluster.password}\n")
    pgpass.chmod(0o600)
    no_password = sample_db.replace(f":{pg_cluster.password}@", "@")
    assert pg_cluster.password not in no_password
    env = cli_env(no_password, backups, PGPASSFILE=str(pgpass))
    made = run_cli("backup", "-F", "plain", "--json", env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    target = "pgpass_restored"
    try:
        target_url = no_password.rsplit("/", 1)[0] + f"/{target}"
        backup_id = json.loads(made.stdout)["id"]
        restored = run_cli("restore", backup_id, "--target-url", target_url, env=env, cwd=tmp_path)
        assert restored.returncode == 0, restored.stderr
    finally:
        pg_cluster.drop_database(target)
