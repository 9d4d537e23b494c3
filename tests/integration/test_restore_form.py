"""The restore form's backup_id field lists the newest verified backups (pgkeeper.restore_form):
refreshed when serve starts and after a backup run; the box still takes any id."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.restore_form import BASE, describe
from pgkeeper.settings import load_settings
from pgkeeper.verify import verify_backup
from tests.support.schedules import clear_pgkeeper, serve_once

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def backup_id_field(link: PrefectLink, deployment: str = "restore/restore") -> dict[str, Any]:
    found = link.request("GET", f"/deployments/name/{deployment}")
    assert isinstance(found, dict), deployment
    field: dict[str, Any] = found["parameter_openapi_schema"]["properties"]["backup_id"]
    return field


def test_the_description_lists_verified_backups_newest_first(
    sample_db: str, tmp_path: Path
) -> None:
    """Only verified backups are offered, newest first, with database, age and size."""
    settings = load_settings(_env_file=None, database_url=sample_db,
                             backup_dir=str(tmp_path / "b"))  # fmt: skip
    old = run_backup(settings, BackupOptions(name="older"))
    verify_backup(settings, old.id)
    unverified = run_backup(settings, BackupOptions(name="unverified"))
    from pgkeeper import catalog
    from pgkeeper.storage import targets

    text = describe(catalog.list_all(targets(settings)))
    assert text.startswith(BASE + " Newest verified backups (as of ")
    assert f"- {old.id} ({old.database}, " in text
    assert unverified.id not in text
    assert describe([]).startswith(BASE + " No verified backup yet")


@pytest.mark.slow
def test_serve_start_offers_the_newest_verified_backups_in_the_restore_form(
    prefect_server_process: str, sample_db: str, tmp_path: Path
) -> None:
    """A verified and an unverified backup in BACKUP_DIR; serve starts: the restore form's
    backup_id description names the verified one only; the field stays free text."""
    settings = load_settings(_env_file=None, database_url=sample_db,
                             backup_dir=str(tmp_path / "backups"))  # fmt: skip
    good = run_backup(settings, BackupOptions(name="offered"))
    verify_backup(settings, good.id)
    pending = run_backup(settings, BackupOptions(name="pending"))
    link = PrefectLink(api_url=prefect_server_process, ui_url=None, timeout=30)
    clear_pgkeeper(link)
    try:
        serve_once(link, tmp_path, DATABASE_URL=sample_db)
        field = backup_id_field(link)
    finally:
        clear_pgkeeper(link)
    assert f"- {good.id} (" in field["description"]
    assert pending.id not in field["description"]
    assert {"type": "string"} in field["anyOf"] and "enum" not in str(field)


@pytest.fixture
def restore_deployment(prefect_server: str) -> Iterator[PrefectLink]:
    """The restore deployment on the session's Prefect server, removed afterwards."""
    from deployments.serve import build_deployments

    link = PrefectLink(api_url=prefect_server, ui_url=None, timeout=30)
    (restore,) = [d for d in build_deployments(load_settings(_env_file=None))
                  if d.name == "restore"]  # fmt: skip
    deployment_id = restore.apply()
    yield link
    link.request("DELETE", f"/deployments/{deployment_id}")


def test_a_backup_run_refreshes_the_restore_form(
    restore_deployment: PrefectLink, flow_env: Path
) -> None:
    """After a backup flow run (verified, inventory published) the restore form offers it."""
    from flows.backup import backup

    name = f"form_{uuid.uuid4().hex[:6]}"
    state = backup(name=name, return_state=True)
    assert state.is_completed(), state
    backup_id = state.result()
    description = backup_id_field(restore_deployment)["description"]
    assert f"- {backup_id} (" in description
