"""Point-in-time recovery tests: a pgkeeper the `postgres` user can run, an archiving cluster,
and the few steps every PITR test repeats (switch and wait for the archive, connect to a
restored server, craft a WAL segment).

What the server runs (`archive_command`, `restore_command`) runs as the server's user. When the
tests run as root that is the `postgres` system user, who cannot execute this checkout's
`.venv` (its interpreter lives in root's home), so `build_server_venv` makes a venv from
Debian's `/usr/bin/python3` that anyone can run (about 40 s; once per session).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.servers.postgres import PgCluster, stop_data_dir
from tests.support.cli import PGKEEPER, cli_env

ROOT = Path(__file__).resolve().parents[2]
SERVER_PYTHON = "/usr/bin/python3"
AS_ROOT = os.geteuid() == 0


def build_server_venv(dest: Path) -> Path:
    """A venv with this checkout installed that the server's user can run; its pgkeeper."""
    python = SERVER_PYTHON if Path(SERVER_PYTHON).exists() else sys.executable
    subprocess.run([python, "-m", "venv", str(dest)], check=True, capture_output=True)
    done = subprocess.run(
        [str(dest / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip install of the server venv failed:\n{done.stderr[-3000:]}")
    subprocess.run(["chmod", "-R", "a+rX", str(dest)], check=True)
    return dest / "bin" / "pgkeeper"


def give_to_server(path: Path) -> Path:
    """Hand a folder or file to the server's user (when the tests run as root)."""
    if AS_ROOT:
        shutil.chown(path, "postgres", "postgres")
    return path


def shared_dir(prefix: str) -> Path:
    """A temp folder everyone may traverse (pytest's own tmp is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


@dataclass
class Archiving:
    """An archiving cluster and where its archive and settings are."""

    cluster: PgCluster
    root: Path  # shared temp folder
    backups: str  # BACKUP_DIR (a folder or a cloud URL)
    env_file: Path  # what archive_command and restore_command read
    server_pgkeeper: Path
    env: dict[str, str]  # the environment for the tests' own pgkeeper runs

    def cli(
        self, *args: str, timeout: float = 300, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """Run this checkout's `pgkeeper --env-file ENV ARGS` (as the test user)."""
        env = {**self.env, **extra}
        return subprocess.run(
            [str(PGKEEPER), "--env-file", str(self.env_file), *args],
            env=env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def switch_and_wait(self, timeout: float = 60.0) -> str:
        """Close the current WAL segment and wait until it is archived; returns its name."""
        row = self.cluster.query("SELECT pg_walfile_name(pg_switch_wal())")
        name = str(row[0][0])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.cluster.query("SELECT last_archived_wal FROM pg_stat_archiver")[0][0]
            if last is not None and str(last)[:24] >= name:
                return name
            time.sleep(0.05)
        raise AssertionError(f"{name} was not archived in {timeout}s: {self.archiver()}")

    def archiver(self) -> Any:
        return self.cluster.query("SELECT * FROM pg_stat_archiver")[0]

    def commit(self, value: int, table: str = "pitr_rows") -> Any:
        """Insert one row in its own transaction; returns the server's commit time."""
        with self.cluster.connect() as conn:
            conn.execute(f"INSERT INTO {table} (v) VALUES (%s)", (value,))  # noqa: S608
            return conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]


def make_env_file(folder: Path, lines: dict[str, str]) -> Path:
    path = folder / "pgkeeper.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    path.chmod(0o644)
    return path


@contextlib.contextmanager
def archiving_cluster(
    server_pgkeeper: Path,
    backup_dir: str | None = None,
    extra: dict[str, str] | None = None,
    server_env: dict[str, str] | None = None,
) -> Iterator[Archiving]:
    """A cluster archiving with `pgkeeper wal-push` into `backup_dir` (default: a new folder
    the server's user owns); stopped and removed at the end, with its pusher."""
    root = shared_dir("pgkeeper-pitr-")
    if backup_dir is None:
        folder = root / "backups"
        folder.mkdir(mode=0o700)
        backup_dir = str(give_to_server(folder))
    backups = backup_dir
    settings = {
        "BACKUP_DIR": backups,
        "BACKUP_PITR_PGKEEPER": str(server_pgkeeper),
        "BACKUP_WAL_PUSHER_IDLE": "2",
        **(extra or {}),
    }
    env_file = make_env_file(root, settings)
    command = f"'{server_pgkeeper} --env-file {env_file} wal-push %p'"
    cluster = PgCluster(
        settings={
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": command,
            "max_wal_senders": "4",
        },
        replication=True,
        env=server_env,
    )
    cluster.start()
    env = cli_env(cluster.url(), Path(backups), **(server_env or {}))
    env.pop("BACKUP_DIR")  # the env file says where: the way the server's commands find it
    try:
        yield Archiving(cluster, root, backups, env_file, server_pgkeeper, env)
    finally:
        cluster.stop()
        _wait_for_pushers(root)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_pushers(root: Path, timeout: float = 10.0) -> None:
    """Pushers exit once their pg_wal is gone; give them a moment, so none outlives a test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = subprocess.run(
            ["pgrep", "-f", f"pgkeeper.wal_async --pg-wal {root}"], capture_output=True
        )
        if found.returncode != 0:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def restored(path: Path) -> Iterator[Path]:
    """A restored data folder: stopped and removed at the end."""
    try:
        yield path
    finally:
        stop_data_dir(path)
        shutil.rmtree(path, ignore_errors=True)


def rows(cluster: PgCluster, port: int, table: str = "pitr_rows") -> list[int]:
    """The values of `table` on a restored server (same users and password as `cluster`)."""
    url = f"postgresql://postgres:{cluster.password}@127.0.0.1:{port}/postgres"
    with psycopg.connect(url, connect_timeout=10) as conn:
        return [int(r[0]) for r in conn.execute(f"SELECT v FROM {table} ORDER BY v")]  # noqa: S608


def segment_bytes(system_id: int, timeline: int, segno: int, body: bytes,
                  size: int = 16 * 1024 * 1024) -> bytes:  # fmt: skip
    """A WAL segment whose first page says what its name says (PostgreSQL 15's long page
    header) followed by `body`, padded to `size`."""
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, timeline, segno * size, 0,
                         system_id, size, 8192)  # fmt: skip
    data = header + body
    return data + bytes(size - len(data))


__all__ = ["Archiving", "archiving_cluster", "build_server_venv", "restored", "rows"]
