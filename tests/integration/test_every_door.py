"""Every front door runs the same backup procedure (pgkeeper.procedure): the seed's options over
the API, rotation after every backup whichever door, and unknown request fields refused.

Issue 13: `{"includeData": false}` used to produce a full backup; `pgkeeper backup` and
`POST /api/backups` did not rotate while the flow did.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper import catalog
from pgkeeper.api import PrefectLink, create_app
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.restore import restore_backup
from pgkeeper.settings import Settings
from pgkeeper.storage import LocalStorage, targets
from pgkeeper.verify import verify_backup
from tests.servers.postgres import PgCluster
from tests.support.api import AUTH, TestClient, settings_for
from tests.support.cli import cli_env, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def client(sample_db: str, tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    settings = settings_for(sample_db, tmp_path / "backups")
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield test_client, settings


def _restored_counts(settings: Settings, backup_id: str, cluster: PgCluster) -> dict[str, int]:
    """Restore into a new database and count the rows of each table it holds."""
    name = f"door_{uuid.uuid4().hex[:8]}"
    restore_backup(settings, backup_id, cluster.url(name))
    try:
        rows = cluster.query(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            dbname=name,
        )
        return {
            table: int(cluster.query(f"SELECT count(*) FROM {table}", dbname=name)[0][0])  # noqa: S608 - catalog names
            for (table,) in rows
        }
    finally:
        cluster.drop_database(name)


def test_include_data_false_is_a_schema_only_backup(
    client: tuple[TestClient, Settings], pg_cluster: PgCluster
) -> None:
    """The seed's {"includeData": false}: the backup restores every table, with no rows."""
    test_client, settings = client
    response = test_client.post("/api/backups", json={"includeData": False}, headers=AUTH)
    assert response.status_code == 200, response.text
    backup = response.json()["backup"]
    assert backup["options"]["schema_only"] is True
    counts = _restored_counts(settings, backup["id"], pg_cluster)
    assert "shop.orders" in counts and set(counts.values()) == {0}


def test_include_schema_false_is_data_only_and_both_false_is_refused(
    client: tuple[TestClient, Settings],
) -> None:
    """{"includeSchema": false}: a data-only dump (no CREATE TABLE in it); both false: 400."""
    test_client, _ = client
    response = test_client.post("/api/backups", json={"includeSchema": False}, headers=AUTH)
    assert response.status_code == 200, response.text
    backup = response.json()["backup"]
    assert backup["options"]["data_only"] is True
    both = test_client.post(
        "/api/backups", json={"includeData": False, "includeSchema": False}, headers=AUTH
    )
    assert both.status_code == 400 and "would hold nothing" in both.json()["error"]


def test_compress_false_and_table_patterns_over_the_api(
    client: tuple[TestClient, Settings], pg_cluster: PgCluster
) -> None:
    """{"compress": false, "tables": [...]}: an uncompressed backup of those tables only."""
    test_client, settings = client
    response = test_client.post(
        "/api/backups",
        json={"compress": False, "tables": ["public.audit_log"], "format": "custom"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    backup = response.json()["backup"]
    assert backup["compression"] == "none" and backup["filename"].endswith(".dump")
    assert set(_restored_counts(settings, backup["id"], pg_cluster)) == {"public.audit_log"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/backups", {"includeData": False, "incudeSchema": True}),
        ("/api/backups/restore", {"backupId": "latest", "conform": "shop"}),
    ],
)
def test_an_unknown_field_is_refused_naming_it(
    path: str, body: dict[str, object], client: tuple[TestClient, Settings], tmp_path: Path
) -> None:
    """A misspelt field is 422 naming it, and nothing is done (no backup, no restore)."""
    test_client, _ = client
    response = test_client.post(path, json=body, headers=AUTH)
    assert response.status_code == 422, response.text
    unknown = next(k for k in body if k in ("incudeSchema", "conform"))
    assert repr(unknown) in response.json()["error"]
    assert not (tmp_path / "backups").exists() or not any((tmp_path / "backups").iterdir())


def _older_backups(settings: Settings, count: int) -> list[str]:
    """``count`` verified backups of the sample database, oldest first."""
    made = []
    for _ in range(count):
        manifest = run_backup(settings, BackupOptions())
        made.append(verify_backup(settings, manifest.id).id)
    return made


def test_the_cli_rotates_after_a_backup_unless_told_not_to(
    sample_db: str, tmp_path: Path
) -> None:
    """pgkeeper backup applies retention after the backup (BACKUP_MAX_BACKUPS=1 leaves only
    the new one of this database); --no-rotate leaves the older ones."""
    backups = tmp_path / "backups"
    settings = settings_for(sample_db, backups)
    older = _older_backups(settings, 2)
    env = cli_env(sample_db, backups, BACKUP_MAX_BACKUPS="1")
    kept = run_cli("backup", "--no-rotate", "--json", env=env, cwd=tmp_path)
    assert kept.returncode == 0, kept.stderr
    ids = {m.id for m in catalog.list_backups(LocalStorage(backups))}
    assert set(older) <= ids
    rotated = run_cli("backup", "--json", env=env, cwd=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    newest = json.loads(rotated.stdout)["id"]
    assert {m.id for m in catalog.list_backups(LocalStorage(backups))} == {newest}


def test_the_api_rotates_after_a_backup_unless_told_not_to(
    sample_db: str, tmp_path: Path
) -> None:
    """POST /api/backups rotates (and says what it deleted); "rotate": false does not."""
    backups = tmp_path / "backups"
    settings = settings_for(sample_db, backups, backup_max_backups=1)
    older = _older_backups(settings, 2)
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        kept = test_client.post("/api/backups", json={"rotate": False}, headers=AUTH).json()
        assert "rotation" not in kept or kept["rotation"] is None
        assert set(older) <= {e.id for e in catalog.list_all(targets(settings))}
        rotated = test_client.post("/api/backups", json={}, headers=AUTH).json()
    assert set(rotated["rotation"]["deleted"]) == {*older, kept["backup"]["id"]}
    assert rotated["problems"] == []
    assert [e.id for e in catalog.list_all(targets(settings))] == [rotated["backup"]["id"]]


def test_the_backup_flow_offers_schema_only_and_table_filters(flow_env: Path) -> None:
    """The flow's form (the operator's front door in the UI) has the same options."""
    from flows.backup import backup

    state = backup(schema_only=True, tables=["public.audit_log"], return_state=True)
    assert state.is_completed(), state.message
    manifest = catalog.list_backups(LocalStorage(flow_env))[0]
    assert manifest.id == state.result()
    assert manifest.options["schema_only"] is True
    assert manifest.options["tables"] == ["public.audit_log"]
