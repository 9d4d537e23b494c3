"""Prometheus metrics: `GET /metrics` on the API (read-token rule) and `pgkeeper metrics
--textfile`, parsed by prometheus-client's own parser, each value equal to the catalog's."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgkeeper.api import create_app
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.catalog import list_all
from pgkeeper.manifest import RestoreTest
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.rotate import usage_report
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import targets
from pgkeeper.verify import verify_backup
from tests.support.cli import cli_env, run_cli

with warnings.catch_warnings():  # as in test_api.py: Starlette's TestClient asks for httpx2
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient`",
        category=StarletteDeprecationWarning,
    )  # fmt: skip
    from starlette.testclient import TestClient

pytestmark = pytest.mark.integration

READ = "read-token-metrics-0123456789"
ADMIN = "admin-token-metrics-0123456789"


@pytest.fixture
def settings(sample_db: str, tmp_path: Path) -> Settings:
    return load_settings(
        _env_file=None,
        database_url=sample_db,
        backup_dir=str(tmp_path / "backups"),
        backup_api_token=ADMIN,
        backup_api_read_token=READ,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, prefect=PrefectLink(None, None))) as test_client:
        yield test_client


def two_backups_one_tested(settings: Settings) -> None:
    """Two verified backups; the newest gets a (recorded) failed restore test."""
    storage = targets(settings)[0]
    for _ in range(2):
        manifest = run_backup(settings, BackupOptions(name="m"), storage=storage)
        verify_backup(settings, manifest.id, storages=[storage], level="quick")
    from pgkeeper.catalog import write_manifest

    newest = list_all([storage])[0].manifest
    newest.restore_tests.append(
        RestoreTest(ok=False, at=newest.finished_at, duration_seconds=4.5, server="db:5432")
    )
    write_manifest(storage, newest)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_match_the_catalog(settings: Settings, client: TestClient) -> None:
    """Every metric of the issue, labelled by database and server (target for storage), holds
    the catalog's value; the read-only token may read it, no token may not."""
    two_backups_one_tested(settings)
    storages = targets(settings)
    entries = list_all(storages)
    newest = entries[0].manifest

    assert client.get("/metrics").status_code == 401
    response = client.get("/metrics", headers={"Authorization": f"Bearer {READ}"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(response.text)
    db = (("database", newest.database), ("server", newest.server))
    assert got[("pgkeeper_backups", db)] == 2
    assert got[("pgkeeper_last_backup_timestamp_seconds", db)] == newest.finished_at.timestamp()
    assert got[("pgkeeper_last_backup_size_bytes", db)] == newest.size
    took = (newest.finished_at - newest.started_at).total_seconds()
    assert got[("pgkeeper_last_backup_duration_seconds", db)] == pytest.approx(took)
    # The newest failed its restore test: the newest *verified* backup is the other one.
    assert got[("pgkeeper_last_verified_backup_timestamp_seconds", db)] == (
        entries[1].manifest.finished_at.timestamp()
    )
    assert got[("pgkeeper_last_restore_test_success", db)] == 0
    assert got[("pgkeeper_restore_test_rto_seconds", db)] == 4.5
    assert got[("pgkeeper_last_restore_test_timestamp_seconds", db)] == (
        newest.finished_at.timestamp()
    )
    target = (("target", storages[0].url),)
    assert got[("pgkeeper_storage_used_bytes", target)] == usage_report(storages).total
    assert got[("pgkeeper_storage_up", target)] == 1
    assert settings.database_url is not None
    password = settings.database_url.get_secret_value().split(":")[2].split("@")[0]
    assert password not in response.text and READ not in response.text


def test_metrics_textfile_for_node_exporter(settings: Settings, tmp_path: Path) -> None:
    """`pgkeeper metrics --textfile DIR` writes DIR/pgkeeper.prom, parsable, same values."""
    two_backups_one_tested(settings)
    out = tmp_path / "textfile"
    out.mkdir()
    env = cli_env(settings.require_database_url(), Path(settings.backup_dir))

    done = run_cli("metrics", "--textfile", str(out), env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    got = samples((out / "pgkeeper.prom").read_text())
    assert sum(v for (name, _), v in got.items() if name == "pgkeeper_backups") == 2
    assert not list(out.glob("*.tmp*"))
