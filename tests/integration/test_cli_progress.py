"""Long CLI work shows a progress bar (bytes and rate) on a terminal and nothing when piped."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.postgres import PgCluster

pytestmark = pytest.mark.integration
PGKEEPER = Path(sys.executable).parent / "pgkeeper"


@pytest.fixture
def database(pg_cluster: PgCluster) -> Iterator[str]:
    name = f"progress_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        "CREATE TABLE t AS SELECT g, md5(g::text) AS v FROM generate_series(1, 200000) g",
        dbname=name,
    )
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


def _env(url: str, backup_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUP_", "DATABASE_"))}
    return {**env, "DATABASE_URL": url, "BACKUP_DIR": str(backup_dir), "COLUMNS": "120"}


def test_backup_on_a_terminal_draws_a_progress_bar(database: str, tmp_path: Path) -> None:
    """With stderr on a terminal, `pgkeeper backup` draws bytes done and a transfer rate."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(PGKEEPER), "backup", "--no-verify"],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=_env(database, tmp_path),
        cwd=tmp_path,
    )
    os.close(slave)
    screen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the process exited
            break
        if not data:
            break
        screen += data
    os.close(master)
    assert proc.stdout is not None
    stdout = proc.stdout.read().decode()
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0, screen.decode(errors="replace")
    text = screen.decode(errors="replace")
    assert "backup" in text, text
    assert any(unit in text for unit in ("bytes", "kB", "MB")), text  # bytes done
    assert "/s" in text, text  # the transfer rate
    assert "0:00:0" in text, text  # elapsed time
    assert "id" in stdout  # the record still goes to stdout


def test_backup_piped_prints_no_progress(database: str, tmp_path: Path) -> None:
    """With stderr piped (scripts, cron, CI), nothing but the record is printed."""
    proc = subprocess.run(
        [str(PGKEEPER), "backup", "--json"],
        capture_output=True,
        text=True,
        env=_env(database, tmp_path),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.lstrip().startswith("{")
