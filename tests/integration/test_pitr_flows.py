"""Point-in-time recovery under Prefect and in the housekeeping: the base-backup and
pitr-restore-test flows with their artifacts, WAL retention in rotation, and the monitor's
archive checks (a gap, a failing archive_command, lag) on a real archiving cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from pgkeeper import catalog, wal
from pgkeeper.pitr_status import archive_checks, archive_status
from pgkeeper.rotate import policies_from_settings, rotate
from pgkeeper.settings import load_settings
from pgkeeper.storage import LocalStorage, targets
from tests.support.flows import artifacts, task_runs
from tests.support.pitr import Archiving, archiving_cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def arch(server_pgkeeper: Path) -> Iterator[Archiving]:
    with archiving_cluster(server_pgkeeper) as archiving:
        archiving.cluster.execute("CREATE TABLE pitr_rows (v int PRIMARY KEY)")
        archiving.commit(1)
        yield archiving


@pytest.fixture
def pitr_env(arch: Archiving, prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> Archiving:
    """Tasks read settings from the environment: the archiving cluster and its archive."""
    monkeypatch.setenv("DATABASE_URL", arch.cluster.url())
    monkeypatch.setenv("BACKUP_DIR", arch.backups)
    monkeypatch.setenv("BACKUP_PITR_PGKEEPER", str(arch.server_pgkeeper))
    return arch


def checks_by_name(arch: Archiving, **overrides: object) -> dict[str, tuple[str, str]]:
    settings = load_settings(_env_file=None, database_url=arch.cluster.url(),
                             backup_dir=arch.backups, **overrides)  # fmt: skip
    return {c.name: (c.status, c.detail) for c in archive_checks(settings, targets(settings))}


def test_base_backup_flow_then_pitr_restore_test_flow(pitr_env: Archiving) -> None:
    """base-backup: backup, verify, upload, WAL upload, rotate, archive status, inventory; then
    pitr-restore-test restores base + WAL on a scratch server, reads every table, records the
    RTO on the base backup and publishes its report."""
    from flows.base_backup import base_backup
    from flows.pitr_restore_test import pitr_restore_test_flow

    state = base_backup(return_state=True)
    assert state.is_completed(), state.message
    base_id = state.result()
    runs = task_runs(state)
    assert {"base-backup", "verify", "upload", "upload-wal", "rotate", "archive-status",
            "inventory"} <= set(runs)  # fmt: skip
    published = artifacts(state)
    assert "pitr-archive" in published and base_id in str(published["backup-inventory"].data)
    pitr_env.commit(2)
    pitr_env.switch_and_wait()

    tested = pitr_restore_test_flow(return_state=True)
    assert tested.is_completed(), tested.message
    result = tested.result()
    assert result.ok and result.tables_compared == 1 and result.duration_seconds > 0
    assert "PASSED" in artifacts(tested)["pitr-restore-test-report"].data
    manifest, _ = catalog.find(targets(load_settings()), base_id)
    assert manifest.last_restore_test is not None and manifest.last_restore_test.ok
    assert not list(Path("/tmp").glob("pgkeeper-pitr-test-*/data/postmaster.pid"))


def test_rotation_removes_wal_only_the_deleted_base_backup_needed(pitr_env: Archiving) -> None:
    """Keeping one base backup: the older one goes, then every segment before the kept one's
    start; history files and what the kept one needs stay, and the archive has no gap."""
    settings = load_settings(_env_file=None, database_url=pitr_env.cluster.url(),
                             backup_dir=pitr_env.backups)  # fmt: skip
    made = pitr_env.cli("base-backup")
    assert made.returncode == 0, made.stderr
    pitr_env.commit(3)
    pitr_env.switch_and_wait()
    storage = LocalStorage(pitr_env.backups)
    bases = [m for m in catalog.list_backups(storage) if m.kind == "base"]
    assert len(bases) >= 2
    keep = bases[0]
    assert keep.base is not None
    system = keep.base.system_identifier
    before = wal.list_archive(storage, system).segments()
    kept_settings = settings.model_copy(update={"backup_max_backups": 1, "backup_min_backups": 1})
    report = rotate([storage], policies_from_settings(kept_settings, [storage]))
    assert report.ok, report.to_json()
    assert [m.id for m in catalog.list_backups(storage) if m.kind == "base"] == [keep.id]
    after = wal.list_archive(storage, system).segments()
    floor = wal.segment_of(wal.parse_lsn(keep.base.start_lsn))
    assert after and all(wal.segment_number(n) >= floor for n in after)
    assert set(before) - set(after) == {n for n in before if wal.segment_number(n) < floor}
    removed = report.targets[0].wal_removed  # segments, and the .backup files before the floor
    assert {n for n in removed if wal.kind_of(n) == "segment"} == set(before) - set(after)
    status = archive_status(settings, [storage])
    assert status.ok, status.problems


def test_monitor_archive_checks_see_a_failing_archive_command_and_lag(arch: Archiving) -> None:
    """Healthy: archive, archive-command and archive-lag pass. archive_command failing: the
    archive-command check names the failing WAL file, and with segments waiting longer than
    BACKUP_ARCHIVE_MAX_LAG the lag check fails too."""
    healthy = checks_by_name(arch)
    assert {k: v[0] for k, v in healthy.items()} == {
        "archive": "ok", "archive-command": "ok", "archive-lag": "ok"
    }  # fmt: skip
    cluster = arch.cluster
    command = cluster.query("SHOW archive_command")[0][0]
    cluster.execute("ALTER SYSTEM SET archive_command = 'false'")
    cluster.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(0.5)
        arch.commit(50)  # a switch with nothing written since the last one closes nothing
        name = cluster.query("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        deadline = time.monotonic() + 30
        while not cluster.query("SELECT failed_count FROM pg_stat_archiver")[0][0]:
            assert time.monotonic() < deadline, "archive_command did not fail"
            time.sleep(0.1)
        failing = checks_by_name(arch, backup_archive_max_lag="0s")
        assert failing["archive-command"][0] == "failed" and name in failing["archive-command"][1]
        assert failing["archive-lag"][0] == "failed"
    finally:
        cluster.execute(
            sql.SQL("ALTER SYSTEM SET archive_command = {}").format(sql.Literal(command))
        )
        cluster.execute("SELECT pg_reload_conf()")
    assert "wal-push" in command
    arch.switch_and_wait()
    assert checks_by_name(arch)["archive-command"][0] == "ok"
