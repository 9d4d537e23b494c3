"""A throwaway PostgreSQL cluster started from the OS binaries: the demo's sample server
and staging server, and every test's PostgreSQL.

`PgCluster().start()` runs `initdb` into a fresh temp folder and starts `postgres` on a free
TCP port of 127.0.0.1, with its unix socket in the same temp folder. TCP connections need a
scram-sha-256 password (a random one unless given); the unix socket trusts everyone
and is only used for administration. Durability is off (`fsync`, `synchronous_commit`,
`full_page_writes`) because the cluster is thrown away.

`initdb` and `postgres` refuse to run as root; when we run as root (as the CI machine does)
every server binary runs as the `postgres` system user through `runuser`, and the temp folder
is handed to that user. Clients (`psql`, `pg_dump`, psycopg) may run as anyone: they connect
over TCP with the password.

Cleanup: `stop()` does a fast shutdown and removes the temp folder; it is registered with
`atexit` so an interrupted session (Ctrl-C) still cleans up. A process killed outright
(SIGKILL, SIGTERM) runs no atexit: a small reaper child then stops the cluster, and
`start()` also sweeps away clusters whose owning process no longer exists.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import sql

from pgkeeper.pipeline import pid_alive

SUPERUSER = "postgres"
_FALLBACK_BINDIR = "/usr/lib/postgresql/15/bin"
_TEMP_PREFIX = "pgkeeper-pg-"
_OWNER_FILE = "owner.pid"
# Variables that would redirect initdb/pg_ctl or libpq away from this cluster.
_LEAKY_ENV_PREFIXES = ("PG",)
# pg_ctl daemonises the server, so it outlives a killed owner. This reaper, a child of the
# owning process, waits for its parent to disappear and then sweeps clusters whose owner is
# gone. It ignores SIGINT: on Ctrl-C the owner's atexit handler does the work.
_REAPER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent = os.getppid()
while os.getppid() == parent:
    time.sleep(0.5)
from pgkeeper.sandbox import sweep_stale_clusters
sweep_stale_clusters()
"""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def pg_bindir() -> Path:
    """Directory of the server binaries: `pg_config --bindir`, else the Debian PG 15 path."""
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    for candidate in (out, _FALLBACK_BINDIR):
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise RuntimeError(
        f"initdb not found via 'pg_config --bindir' nor in {_FALLBACK_BINDIR} "
        "(install postgresql-15)"
    )


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_ENV_PREFIXES)}
    env.setdefault("LC_ALL", "C.UTF-8")
    return env


class PgCluster:
    """A PostgreSQL cluster in a temp folder, owned by this process until `stop()`.

    Attributes once started: `host` ("127.0.0.1"), `port`, `socket_dir`, `data_dir`,
    `bindir`, `superuser` ("postgres"), `password`, `version` (server_version_num).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        password: str | None = None,
        bindir: Path | str | None = None,
        settings: dict[str, str] | None = None,
        replication: bool = False,
        env: dict[str, str] | None = None,
    ):
        """`settings`: more postgresql.auto.conf lines (e.g. `archive_mode`); `replication`:
        pg_hba lets replication connections in (pg_basebackup); `env`: variables the server
        (and so its archive_command) gets besides this process's own."""
        self.password = password or secrets.token_urlsafe(18)  # TCP logins need it
        self.extra_settings = dict(settings or {})
        self.replication = replication
        self.server_env = dict(env or {})
        self.superuser = SUPERUSER
        self.bindir = Path(bindir) if bindir is not None else pg_bindir()
        self.port = 0
        self.version = 0
        self._tmp: Path | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._running = False
        self._as_postgres_user = os.geteuid() == 0

    # -- paths -------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("cluster not started (call start())")
        return self._tmp

    @property
    def data_dir(self) -> Path:
        return self.tmp_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.tmp_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.tmp_dir / "postgres.log"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> PgCluster:
        """Create and start the cluster; returns self. Raises RuntimeError with the log tail."""
        if self._running:
            return self
        sweep_stale_clusters(self.bindir)
        self._tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
        # Registered before anything can fail, so a half-started cluster is cleaned up too.
        atexit.register(self.stop)
        (self._tmp / _OWNER_FILE).write_text(str(os.getpid()))
        self._reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.socket_dir.mkdir()
        pwfile = self._tmp / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self._as_postgres_user:
            # mkdtemp makes the folder 0700: give it to the user that runs the server.
            shutil.chown(self._tmp, "postgres", "postgres")
            shutil.chown(self.socket_dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        self._run_server_tool(
            "initdb",
            "-D", str(self.data_dir),
            "-U", self.superuser,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        # Only the exact rules we rely on: no IPv6, no trust over TCP.
        hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        if self.replication:  # pg_basebackup's replication connections: "all" does not match
            hba += "local replication all trust\nhost replication all 127.0.0.1/32 scram-sha-256\n"
        self._write_server_file(self.data_dir / "pg_hba.conf", hba)
        last_error: RuntimeError | None = None
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port(self.host)
            self._write_server_file(self.data_dir / "postgresql.auto.conf", self._settings())
            try:
                self._run_server_tool(
                    "pg_ctl", "start", "-w", "-t", "60",
                    "-D", str(self.data_dir), "-l", str(self.log_file),
                )  # fmt: skip
            except RuntimeError as exc:
                last_error = exc
                if "could not bind" not in self._log_tail():
                    break
                continue
            self._running = True
            self.version = int(self.query("SHOW server_version_num")[0][0])
            return self
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start: {last_error}")

    def stop(self) -> None:
        """Fast shutdown (immediate if that fails), then remove the temp folder. Idempotent."""
        atexit.unregister(self.stop)
        tmp, self._tmp = self._tmp, None
        self._running = False
        if tmp is None:
            return
        _stop_data_dir(self.bindir, tmp / "data", self._as_postgres_user)
        shutil.rmtree(tmp, ignore_errors=True)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.terminate()
            reaper.wait(10)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connection strings ------------------------------------------------------------------
    def url(
        self, dbname: str = "postgres", user: str | None = None, password: str | None = None
    ) -> str:
        """libpq URI over TCP: `postgresql://user:pw@127.0.0.1:PORT/dbname`.

        Defaults to the superuser and its password; pass `password=""` for a URI without one.
        """
        user = self.superuser if user is None else user
        password = self.password if password is None else password
        auth = quote(user, safe="")
        if password:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def libpq_env(self, dbname: str = "postgres") -> dict[str, str]:
        """PG* variables for client tools (password via PGPASSWORD, never argv)."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.superuser,
            "PGPASSWORD": self.password,
            "PGDATABASE": dbname,
        }

    # -- SQL helpers (superuser, autocommit) -------------------------------------------------
    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """A new autocommit psycopg connection as the superuser; the caller closes it."""
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def execute(
        self,
        query: str | sql.SQL | sql.Composed,
        params: Sequence[Any] | dict[str, Any] | None = None,
        dbname: str = "postgres",
    ) -> None:
        """Run one statement (or several, without params) in autocommit mode."""
        with self.connect(dbname) as conn:
            conn.execute(query, params)

    def query(
        self,
        query: str | sql.SQL | sql.Composed,
        params: Sequence[Any] | dict[str, Any] | None = None,
        dbname: str = "postgres",
    ) -> list[tuple[Any, ...]]:
        """Run a query and return all rows as tuples."""
        with self.connect(dbname) as conn:
            return conn.execute(query, params).fetchall()

    def create_database(self, name: str, owner: str | None = None) -> None:
        """CREATE DATABASE name (optionally OWNER owner)."""
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if owner is not None:
            stmt = sql.SQL("{} OWNER {}").format(stmt, sql.Identifier(owner))
        self.execute(stmt)

    def drop_database(self, name: str) -> None:
        """Terminate the database's connections, then DROP DATABASE IF EXISTS."""
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def create_role(self, name: str, password: str | None = None, superuser: bool = False) -> None:
        """CREATE ROLE name LOGIN [PASSWORD ...] [SUPERUSER]."""
        stmt = sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name))
        if password is not None:
            stmt = sql.SQL("{} PASSWORD {}").format(stmt, sql.Literal(password))
        if superuser:
            stmt = sql.SQL("{} SUPERUSER").format(stmt)
        self.execute(stmt)

    def database_exists(self, name: str) -> bool:
        return bool(self.query("SELECT 1 FROM pg_database WHERE datname = %s", [name]))

    # -- internals ---------------------------------------------------------------------------
    def _settings(self) -> str:
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "100",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
            "log_min_messages": "warning",
            **self.extra_settings,
        }
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def _write_server_file(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._as_postgres_user:
            shutil.chown(path, "postgres", "postgres")

    def _run_server_tool(self, tool: str, *args: str) -> None:
        argv = _server_argv(self.bindir / tool, args, self._as_postgres_user)
        env = {**_clean_env(), **self.server_env}
        proc = subprocess.run(
            argv, cwd=self.tmp_dir, env=env, capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
                f"\n--- server log ---\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _server_argv(binary: Path, args: Sequence[str], as_postgres_user: bool) -> list[str]:
    argv = [str(binary), *args]
    return ["runuser", "-u", "postgres", "--", *argv] if as_postgres_user else argv


def _stop_data_dir(bindir: Path, data_dir: Path, as_postgres_user: bool) -> None:
    if not (data_dir / "postmaster.pid").exists():
        return
    for mode, timeout in (("fast", "30"), ("immediate", "10")):
        argv = _server_argv(
            bindir / "pg_ctl",
            ["stop", "-w", "-t", timeout, "-m", mode, "-D", str(data_dir)],
            as_postgres_user,
        )
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            proc = subprocess.run(
                argv, cwd="/", env=_clean_env(), capture_output=True, timeout=int(timeout) + 5
            )
            if proc.returncode == 0 or not (data_dir / "postmaster.pid").exists():
                return
        time.sleep(0.1)


def stop_data_dir(data_dir: Path) -> None:
    """Stop a server running on `data_dir` that was started some other way (a restored
    cluster); a no-op when none runs there."""
    _stop_data_dir(pg_bindir(), data_dir, os.geteuid() == 0)


def sweep_stale_clusters(bindir: Path | None = None) -> None:
    """Stop and delete clusters whose owning process no longer exists (SIGKILLed runs)."""
    base = Path(tempfile.gettempdir())
    for tmp in base.glob(_TEMP_PREFIX + "*"):
        try:
            owner = int((tmp / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        with contextlib.suppress(RuntimeError):
            _stop_data_dir(bindir or pg_bindir(), tmp / "data", os.geteuid() == 0)
        shutil.rmtree(tmp, ignore_errors=True)
