"""PostgreSQL side: connection URLs, client binaries and versions, the backup lock, snapshots.

Credentials reach ``pg_dump``/``pg_restore``/``psql`` only through their environment
(``PGPASSWORD`` and friends, built by ``ConnInfo.env``), never through argv; everything shown to
a person goes through ``redact_url`` or ``ConnInfo.server``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgkeeper.errors import (
    AuthenticationError,
    BackupRunningError,
    ClientVersionError,
    ConfigError,
    DatabaseError,
    DatabaseMissingError,
    DatabaseUnavailableError,
)

log = logging.getLogger(__name__)

# libpq connection parameters and the environment variable each one maps to (libpq docs, 34.15).
_ENV_OF = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "sslcompression": "PGSSLCOMPRESSION",
    "requiressl": "PGREQUIRESSL",
    "channel_binding": "PGCHANNELBINDING",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
    "sslnegotiation": "PGSSLNEGOTIATION",
    "client_encoding": "PGCLIENTENCODING",
}

LOCK_CLASS = 0x70676B70  # 'pgkp': first key of the advisory lock, so ours never collide with apps'


# A URI of any scheme (``mysql://``, ``postgresql+psycopg2://``, a typo): anything between the
# scheme and the last '@' may hold a password, whatever characters it contains.
_ANY_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(.*)$", re.DOTALL)
_URI_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)
# A conninfo value is a bare word or a single-quoted string with backslash escapes.
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE)
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def redact_url(url: str) -> str:
    """A connection URL or conninfo safe to show, whatever its shape: the password is ``***``.

    For a URI of any scheme, everything between ``user:`` and the *last* '@' is hidden. libpq
    reads a URI's userinfo only up to the first '/', so a password holding '/' or '@' would
    otherwise leak into what looks like the host, port or database; erring towards hiding too
    much is the point.
    """
    match = _ANY_URI.match(url)
    if match is not None:
        scheme, rest = match.groups()
        at = rest.rfind("@")
        if at >= 0:
            userinfo, after = rest[:at], rest[at + 1 :]
            if ":" in userinfo or "/" in userinfo:
                user = re.split(r"[:/]", userinfo, maxsplit=1)[0]
                rest = f"{user}:***@{after}"
        return scheme + _URI_QUERY_PASSWORD.sub(r"\1***", rest)
    return _KV_PASSWORD.sub(r"\1***", url)


# Values libpq accepts for the enumerated parameters (libpq docs, 34.1.2): anything else fails
# only at connect time, where it would read like an unreachable server.
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby"
    ),
    "load_balance_hosts": ("disable", "random"),
}  # fmt: skip
_PERCENT_HINT = "percent-encode it in the url: '/' as %2F, '@' as %40"


def _validate(url: str, params: dict[str, str]) -> None:
    """Refuse values libpq would only reject when connecting, and URIs whose password holds an
    unencoded '/' or '@' (libpq then reads part of the password as host, port or database).

    Messages never echo the host, port or database of such a URI: they may hold the password.
    """
    is_uri = url.lower().startswith(_POSTGRES_SCHEMES)
    if is_uri:
        rest = url.split("://", 1)[1]
        if "@" in params.get("host", ""):
            raise ConfigError(
                f"the password in the database url contains '@' ({_PERCENT_HINT})"
            )
        authority = rest.split("/", 1)[0]
        if "@" not in authority and "@" in rest.split("?", 1)[0]:
            raise ConfigError(
                "the password in the database url seems to contain '/': libpq would read part "
                f"of it as the host or database ({_PERCENT_HINT})"
            )
    for port in params.get("port", "").split(",") if params.get("port") else ():
        if not port.strip().isdigit() or not 0 < int(port) < 65536:
            hint = f"; if the password contains '/', {_PERCENT_HINT}" if is_uri else ""
            raise ConfigError(
                f"the port in the database url is not a number from 1 to 65535 (fix it{hint})"
            )
    timeout = params.get("connect_timeout")
    if timeout is not None and not timeout.strip().lstrip("-").isdigit():
        raise ConfigError(
            f"connect_timeout={timeout[:20]!r} in the database url is not a number of seconds"
        )
    for name, allowed in _CHOICES.items():
        value = params.get(name)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"{name}={value[:30]!r} in the database url is not valid "
                f"(use one of {', '.join(allowed)})"
            )


@dataclass(frozen=True)
class ConnInfo:
    """A parsed connection URL. ``repr`` hides the password."""

    params: dict[str, str] = field(repr=False)

    @classmethod
    def parse(cls, url: str) -> ConnInfo:
        """Parse a libpq URL or key=value string; raise ConfigError when it is malformed.

        Error messages show the url redacted (``redact_url``), never its password.
        """
        scheme = _ANY_URI.match(url)
        if scheme is not None and not url.lower().startswith(_POSTGRES_SCHEMES):
            raise ConfigError(
                f"database url {redact_url(url)[:120]!r} is not a PostgreSQL url "
                "(it must start with postgresql://, e.g. postgresql://user:password@host:5432/db)"
            )
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"database url {redact_url(url)[:120]!r} is malformed "
                "(use postgresql://user:password@host:5432/dbname)"
            ) from exc
        unknown = sorted(set(params) - set(_ENV_OF))
        if unknown:
            raise ConfigError(
                f"database url has unsupported parameter(s) {', '.join(unknown)[:120]} "
                "(remove them from the url)"
            )
        found = {k: str(v) for k, v in params.items() if v is not None}
        _validate(url, found)
        return cls(found)

    @property
    def dbname(self) -> str:
        return (
            self.params.get("dbname")
            or self.params.get("user")
            or os.environ.get("PGDATABASE", os.environ.get("PGUSER", "postgres"))
        )

    @property
    def server(self) -> str:
        """``host:port`` for display and manifests (never credentials)."""
        host = self.params.get("host") or os.environ.get("PGHOST") or "localhost"
        port = self.params.get("port") or os.environ.get("PGPORT") or "5432"
        return f"{host}:{port}"

    def with_dbname(self, dbname: str) -> ConnInfo:
        return ConnInfo({**self.params, "dbname": dbname})

    def conninfo(self) -> str:
        return make_conninfo(**self.params)

    def display(self) -> str:
        user = self.params.get("user", "")
        return f"postgresql://{user + '@' if user else ''}{self.server}/{self.dbname}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for a client process: connection settings as PG* variables."""
        env = dict(os.environ if base is None else base)
        for key, value in self.params.items():
            env[_ENV_OF[key]] = value
        env["PGDATABASE"] = self.dbname
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        env["PGAPPNAME"] = self.params.get("application_name", "pgkeeper")
        return env


def translate_connect_error(exc: Exception, conn: ConnInfo) -> Exception:
    """Turn a psycopg connection failure into the project's error with what to do."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = conn.display()
    lowered = str(exc).lower()
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return AuthenticationError(
            f"{where}: authentication failed (check the user and password in the database url)"
        )
    if "authentication failed" in lowered or "no pg_hba.conf entry" in lowered:
        return AuthenticationError(
            f"{where}: the server refused this user ({text}; check pg_hba.conf and the url)"
        )
    if re.search(r'database ".*" does not exist', lowered):
        return DatabaseMissingError(
            f"{where}: database {conn.dbname!r} does not exist (create it or fix the url)"
        )
    if isinstance(exc, psycopg.OperationalError):
        return DatabaseUnavailableError(
            f"{where}: cannot connect ({text}; is the server running and reachable?)"
        )
    return DatabaseError(f"{where}: {text}")


def connect(
    conn: ConnInfo, autocommit: bool = True, dbname: str | None = None
) -> psycopg.Connection[Any]:
    """Open a psycopg connection; raise the project's connection errors."""
    target = conn.with_dbname(dbname) if dbname else conn
    params: dict[str, Any] = dict(target.params)
    params.setdefault("connect_timeout", "10")
    params.setdefault("application_name", "pgkeeper")
    try:
        return psycopg.connect(autocommit=autocommit, **params)
    except psycopg.Error as exc:
        raise translate_connect_error(exc, target) from None


# --- client binaries ------------------------------------------------------------------------


def _major_of(version_text: str) -> int:
    match = re.search(r"(\d+)(?:\.(\d+))?", version_text)
    if not match:
        raise ClientVersionError(f"cannot read a version from {version_text!r}")
    return int(match.group(1))


def candidate_bin_dirs(pg_bin_dir: Path | None) -> list[Path]:
    """Where to look for client binaries, best first."""
    if pg_bin_dir is not None:
        return [Path(pg_bin_dir)]
    dirs: list[Path] = []
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
            reverse=True,
        )
        dirs.extend(v / "bin" for v in versions)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            dirs.append(Path(out))
        except (subprocess.SubprocessError, OSError):
            pass
    for name in ("pg_dump",):
        found = shutil.which(name)
        if found:
            dirs.append(Path(found).parent)
    return list(dict.fromkeys(dirs))


@dataclass(frozen=True)
class Client:
    """One PostgreSQL client binary and its version."""

    path: Path
    version: str
    major: int

    @property
    def argv0(self) -> str:
        return str(self.path)


def find_client(name: str, pg_bin_dir: Path | None) -> Client:
    """Locate ``pg_dump``/``pg_restore``/``psql``; raise ConfigError when it is nowhere."""
    for directory in candidate_bin_dirs(pg_bin_dir):
        path = directory / name
        if path.is_file() and os.access(path, os.X_OK):
            try:
                out = subprocess.run(
                    [str(path), "--version"], capture_output=True, text=True, timeout=30
                )
            except (subprocess.SubprocessError, OSError) as exc:
                raise ConfigError(f"cannot run {path}: {exc} (check PG_BIN_DIR)") from exc
            # "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" -> "15.18"
            found = re.search(r"\(PostgreSQL\)\s+(\S+)", out.stdout) or re.search(
                r"(\d+(?:\.\d+)*)", out.stdout
            )
            version = found.group(1) if found else "unknown"
            return Client(path, version, _major_of(version))
    where = f"PG_BIN_DIR={pg_bin_dir}" if pg_bin_dir else "PATH or /usr/lib/postgresql/*/bin"
    raise ConfigError(
        f"{name} not found in {where} (install the postgresql client package or set PG_BIN_DIR)"
    )


def check_client(client: Client, server_major: int, server_version: str) -> None:
    """pg_dump refuses servers newer than itself: say which client to install instead."""
    if client.major < server_major:
        raise ClientVersionError(
            f"{client.path.name} {client.version} is older than the server ({server_version}): "
            f"install postgresql-client-{server_major} and set PG_BIN_DIR to its bin folder "
            f"(e.g. /usr/lib/postgresql/{server_major}/bin)"
        )


@dataclass(frozen=True)
class ServerInfo:
    version: str
    major: int
    encoding: str
    database: str


def server_info(connection: psycopg.Connection[Any]) -> ServerInfo:
    row = connection.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " pg_encoding_to_char(encoding), current_database()"
        " FROM pg_database WHERE datname = current_database()"
    ).fetchone()
    if row is None:
        raise DatabaseError("cannot read the server version")
    return ServerInfo(str(row[0]).split(" ")[0], int(row[1]) // 10000, str(row[2]), str(row[3]))


# --- one backup per database ----------------------------------------------------------------


def _lock_key(dbname: str) -> int:
    # Advisory locks are scoped to the current database already; the second key makes the lock
    # readable in pg_locks and keeps it stable across processes (crc32 fits a signed int4 when
    # shifted into range).
    return zlib.crc32(dbname.encode()) - 2**31


@contextmanager
def backup_lock(
    conn: ConnInfo, timeout: float = 0.0, poll: float = 0.5
) -> Iterator[psycopg.Connection[Any]]:
    """Hold the database's backup lock for the block; yield the connection that holds it.

    Raises BackupRunningError when another backup holds it for longer than ``timeout`` seconds.
    The lock is a session advisory lock, so it is released by the server if this process dies.
    """
    connection = connect(conn)
    try:
        key = _lock_key(conn.dbname)
        deadline = time.monotonic() + timeout
        while True:
            row = connection.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)
            ).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                raise BackupRunningError(
                    f"another backup of database {conn.dbname!r} on {conn.server} is running "
                    "(wait for it to finish, or set BACKUP_LOCK_TIMEOUT to wait)"
                )
            time.sleep(poll)
        try:
            yield connection
        finally:
            if not connection.closed:
                connection.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, key))
    finally:
        connection.close()


# --- snapshots and row counts ---------------------------------------------------------------

_TABLES_SQL = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1
"""


def begin_snapshot(connection: psycopg.Connection[Any]) -> str:
    """Start a repeatable-read transaction and export its snapshot for ``pg_dump --snapshot``."""
    connection.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    row = connection.execute("SELECT pg_export_snapshot()").fetchone()
    if row is None:
        raise DatabaseError("pg_export_snapshot returned nothing")
    return str(row[0])


def end_snapshot(connection: psycopg.Connection[Any]) -> None:
    if not connection.closed:
        connection.execute("COMMIT")


def table_counts(connection: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows of every ordinary table (``ONLY``: inheritance children count separately)."""
    tables = [str(r[0]) for r in connection.execute(_TABLES_SQL).fetchall()]
    counts: dict[str, int] = {}
    for table in tables:
        row = connection.execute(
            sql.SQL("SELECT count(*) FROM ONLY {}").format(sql.SQL(table))
        ).fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


# --- databases ------------------------------------------------------------------------------


def database_exists(admin: psycopg.Connection[Any], dbname: str) -> bool:
    row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
    return row is not None


def database_has_data(conn: ConnInfo, dbname: str) -> bool:
    """True when the database holds any user relation or large object."""
    with connect(conn, dbname=dbname) as connection:
        row = connection.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            "  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
            "  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'"
            "  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f'))"
            " OR EXISTS (SELECT 1 FROM pg_largeobject_metadata)"
        ).fetchone()
        return bool(row and row[0])


def terminate_connections(admin: psycopg.Connection[Any], dbname: str) -> None:
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    )


def drop_database(admin: psycopg.Connection[Any], dbname: str) -> None:
    terminate_connections(admin, dbname)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))

