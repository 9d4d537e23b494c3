"""What a killed restore leaves behind is cleaned by the next restore, and nothing in use is."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest

from pgkeeper import restore
from pgkeeper.backup import run_backup
from pgkeeper.settings import load_settings
from tests.servers.postgres import PgCluster

pytestmark = pytest.mark.integration


def _dead_pid() -> int:
    """A pid that certainly belongs to no running process (a child that has exited)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_staging_folders_of_dead_restores_are_swept(tmp_path: Path) -> None:
    """A staging folder whose restore process is gone is removed; a live one is kept."""
    dead = tmp_path / f"{restore.SCRATCH_PREFIX}{_dead_pid()}-abc"
    live = tmp_path / f"{restore.SCRATCH_PREFIX}{os.getpid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "archive.dump").write_bytes(b"x" * 10)
    removed = restore.sweep_scratch(tmp_path)
    assert removed == [dead]
    assert not dead.exists()
    assert live.exists()


def test_abandoned_scratch_databases_are_dropped_but_not_ones_in_use(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """A restore drops scratch databases nobody holds, and leaves one another restore holds;
    the same for a replaced target a killed restore had not dropped yet (pgk_old_*)."""
    source = f"leftover_src_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(source)
    pg_cluster.execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)", dbname=source)
    settings = load_settings(database_url=pg_cluster.url(source), backup_dir=str(tmp_path))
    manifest = run_backup(settings)

    abandoned = f"pgk_restore_{uuid.uuid4().hex[:8]}"
    replaced = f"pgk_old_{uuid.uuid4().hex[:8]}"
    in_use = f"pgk_restoretest_{uuid.uuid4().hex[:8]}"
    old_in_use = f"pgk_old_{uuid.uuid4().hex[:8]}"
    for name in (abandoned, replaced, in_use, old_in_use):
        pg_cluster.create_database(name)
    holder = psycopg.connect(pg_cluster.url("postgres"), autocommit=True)
    try:
        # Another restore's session holds the scratch lock on its database's name.
        for name in (in_use, old_in_use):
            holder.execute(
                "SELECT pg_advisory_lock(%s, hashtext(%s))", (restore.SCRATCH_LOCK_CLASS, name)
            )
        target = f"leftover_dst_{uuid.uuid4().hex[:8]}"
        restore.restore_backup(settings, manifest.id, pg_cluster.url(target))
        assert not pg_cluster.database_exists(abandoned)
        assert not pg_cluster.database_exists(replaced)
        assert pg_cluster.database_exists(in_use)
        assert pg_cluster.database_exists(old_in_use)
        assert pg_cluster.query("SELECT count(*) FROM t", dbname=target) == [(1,)]
    finally:
        holder.close()
        for name in (in_use, old_in_use, source):
            pg_cluster.drop_database(name)
