"""The restore-test core against a real PostgreSQL: restore into a scratch database, compare the
snapshot row counts, run the SQL checks, always drop the scratch database, record the result."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgkeeper import catalog
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.errors import DatabaseUnavailableError, VerificationError
from pgkeeper.manifest import Manifest
from pgkeeper.restore_test import SCRATCH_PREFIX, raise_for_failure, run_restore_test
from pgkeeper.settings import Settings
from pgkeeper.storage import targets
from tests.integration.conftest import SHOP_TABLES
from tests.servers.postgres import PgCluster

pytestmark = pytest.mark.integration


def _scratch_databases(pg_cluster: PgCluster) -> list[str]:
    rows = pg_cluster.query(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", [SCRATCH_PREFIX + "%"]
    )
    return [r[0] for r in rows]


def _stored(settings: Settings, backup_id: str) -> Manifest:
    manifest, _ = catalog.find(targets(settings), backup_id)
    return manifest


def test_a_good_backup_passes_and_the_result_is_recorded(
    pgk_settings: Settings, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """A fresh backup restores, every table's rows match the snapshot, checks pass in name
    order, the duration is measured, the result lands in the manifest and no scratch db is left."""
    checks = tmp_path / "checks"
    checks.mkdir()
    (checks / "10_customers.sql").write_text("SELECT count(*) = 300 FROM shop.customers;\n")
    (checks / "20_orders.sql").write_text(
        "-- every order line points at an order\n"
        "SELECT NOT EXISTS (SELECT 1 FROM shop.order_lines l\n"
        "  LEFT JOIN shop.orders o ON o.id = l.order_id WHERE o.id IS NULL)"
    )
    (checks / "README.txt").write_text("not a check")
    manifest = run_backup(pgk_settings, BackupOptions(name="rt"))

    result = run_restore_test(pgk_settings, checks_dir=checks)

    assert result.ok, result
    assert result.tables_compared == len(SHOP_TABLES)
    assert result.mismatches == []
    assert [c.name for c in result.checks] == [
        "restore", "ownership and grants", "row counts", "10_customers.sql", "20_orders.sql",
    ]  # fmt: skip
    assert result.duration_seconds > 0
    assert result.server == f"127.0.0.1:{pg_cluster.port}"
    assert _stored(pgk_settings, manifest.id).restore_tests == [result]
    assert _scratch_databases(pg_cluster) == []
    raise_for_failure(result, manifest.id)  # passes silently


def test_tampered_snapshot_counts_fail_and_are_recorded(
    pgk_settings: Settings, pg_cluster: PgCluster
) -> None:
    """When the restored rows differ from the snapshot counts the test fails, names the table,
    is recorded as failed, and the flow-facing check raises VerificationError."""
    manifest = run_backup(pgk_settings, BackupOptions(name="rt"))
    assert manifest.table_counts is not None
    storage = targets(pgk_settings)[0]
    tampered = dict(manifest.table_counts, **{"shop.orders": 1199})
    catalog.write_manifest(storage, manifest.model_copy(update={"table_counts": tampered}))

    result = run_restore_test(pgk_settings, backup_id=manifest.id)

    assert not result.ok
    assert result.mismatches == [
        "shop.orders: 1200 rows restored, the backup's snapshot had 1199"
    ]
    recorded = _stored(pgk_settings, manifest.id).restore_tests
    assert [r.ok for r in recorded] == [False]
    assert _scratch_databases(pg_cluster) == []
    with pytest.raises(VerificationError, match=r"shop\.orders: 1200 rows restored") as info:
        raise_for_failure(result, manifest.id)
    assert info.value.check == "restore-test"


def test_a_check_that_is_not_true_fails_the_test(
    pgk_settings: Settings, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """A check returning false, several rows, or an error fails the test; each is reported."""
    checks = tmp_path / "checks"
    checks.mkdir()
    (checks / "a_false.sql").write_text("SELECT count(*) = 0 FROM shop.orders")
    (checks / "b_rows.sql").write_text("SELECT true FROM generate_series(1, 2)")
    (checks / "c_error.sql").write_text("SELECT missing_column FROM shop.orders")
    (checks / "d_ok.sql").write_text("SELECT true")
    run_backup(pgk_settings, BackupOptions(name="rt"))

    result = run_restore_test(pgk_settings, checks_dir=checks)

    assert not result.ok
    verdicts = {c.name: c.ok for c in result.checks}
    assert verdicts == {
        "restore": True, "ownership and grants": True, "row counts": True,
        "a_false.sql": False, "b_rows.sql": False, "c_error.sql": False, "d_ok.sql": True,
    }  # fmt: skip
    assert "does not exist" in next(c.detail for c in result.checks if c.name == "c_error.sql")
    assert _scratch_databases(pg_cluster) == []


def test_a_corrupt_backup_is_a_failed_restore_test_not_a_crash(
    pgk_settings: Settings, pg_cluster: PgCluster
) -> None:
    """Stored bytes that do not match the manifest make the restore fail: recorded as a failed
    test (the backup is at fault), scratch database dropped."""
    manifest = run_backup(pgk_settings, BackupOptions(name="rt"))
    data = Path(pgk_settings.backup_dir) / manifest.id / manifest.objects[0].name
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))

    result = run_restore_test(pgk_settings, backup_id=manifest.id)

    assert not result.ok
    assert result.mismatches[0].startswith("restore failed:")
    assert _stored(pgk_settings, manifest.id).restore_tests[-1].ok is False
    assert _scratch_databases(pg_cluster) == []


def test_an_unreachable_staging_server_raises_and_records_nothing(
    pgk_settings: Settings, tmp_path: Path
) -> None:
    """Staging being down says nothing about the backup: a transient error, nothing recorded."""
    manifest = run_backup(pgk_settings, BackupOptions(name="rt"))
    from tests.servers import free_port

    down = f"postgresql://postgres:pw@127.0.0.1:{free_port()}/postgres?connect_timeout=2"

    with pytest.raises(DatabaseUnavailableError):
        run_restore_test(pgk_settings, staging_url=down)

    assert _stored(pgk_settings, manifest.id).restore_tests == []
