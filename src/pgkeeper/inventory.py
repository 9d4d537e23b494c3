"""The fleet: every database pgkeeper protects, where it is, and how (the inventory).

Three ways to say it, one at a time:

  BACKUP_INVENTORY=FILE   a YAML file: servers, their databases, per-database overrides
  BACKUP_DATABASES=URLS   libpq URLs, comma separated; a database ``*`` means every database
                          of that server that accepts connections (templates excluded), found
                          again at each run, so a new database is protected without a change
  DATABASE_URL            alone: a fleet of one, exactly as before

The file::

    defaults:                        # overrides for every database (optional)
      schedule: daily
      keep_daily: 7
    servers:
      - url: postgresql://backup@db1.internal:5432/*
        password_env: DB1_PASSWORD   # or password_file: /run/secrets/db1, or ~/.pgpass
        globals: true                # the server's roles etc. (default: true for '*')
        include: ["app_*"]           # databases of '*' to take (default: all), patterns
        exclude: [scratch]           # databases of '*' to leave out
        schedule: hourly             # an override for every database of this server
        databases:                   # overrides per database (with '*': only to tune them)
          shop: {keep_hourly: 48}
          legacy: {enabled: false}
      - url: postgresql://backup@db2.internal:5432/app

Overrides are the settings' names without ``BACKUP_`` (``schedule``, ``timezone``,
``format``, ``compression``, ``compression_level``, ``max_backups``, ``keep_hourly`` …
``keep_yearly``, ``keep_within``, ``max_total_size``, ``min_backups``, ``failed_grace``,
``row_counts``, ``verify``, ``name``, ``max_age``), plus ``targets`` (storage URLs, the first
is the primary), ``staging_url`` and ``enabled``. Each database gets its own ``Settings``:
the process's settings with its URL as DATABASE_URL and its overrides applied, so every core
procedure (backup, verify, rotate, restore-test, alerts) works on it unchanged.

The file never needs a password: a URL may hold one, or name an environment variable
(``password_env``) or a file (``password_file``, e.g. a Docker/Kubernetes secret), or libpq
finds it in ``.pgpass`` / ``PGPASSFILE``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import SecretStr, TypeAdapter, ValidationError

from pgkeeper import postgres
from pgkeeper.errors import ConfigError, PgkeeperError, UsageError
from pgkeeper.postgres import ConnInfo
from pgkeeper.settings import Settings

log = logging.getLogger(__name__)

ALL = "*"  # a URL's database '*': every database of that server
# Override keys -> the Settings field each one sets (the setting's name without BACKUP_).
_OVERRIDES = {
    "schedule": "backup_schedule",
    "timezone": "backup_timezone",
    "format": "backup_format",
    "compression": "backup_compression",
    "compression_level": "backup_compression_level",
    "max_backups": "backup_max_backups",
    "keep_hourly": "backup_keep_hourly",
    "keep_daily": "backup_keep_daily",
    "keep_weekly": "backup_keep_weekly",
    "keep_monthly": "backup_keep_monthly",
    "keep_yearly": "backup_keep_yearly",
    "keep_within": "backup_keep_within",
    "max_total_size": "backup_max_total_size",
    "min_backups": "backup_min_backups",
    "failed_grace": "backup_failed_grace",
    "row_counts": "backup_row_counts",
    "verify": "backup_verify",
    "name": "backup_name",
    "max_age": "backup_max_age",
    "staging_url": "staging_database_url",
}
_SPECIAL = {"targets", "enabled"}
_SERVER_KEYS = {
    "url", "password_env", "password_file", "globals", "include", "exclude", "databases"
}


@dataclass(frozen=True)
class Database:
    """One database of the fleet: its name, server and the settings to back it up with."""

    name: str
    server: str  # host:port, as manifests record it
    settings: Settings = field(repr=False)
    enabled: bool = True

    @property
    def key(self) -> str:
        """``name@host:port``: how alerts, metrics and listings name it."""
        return f"{self.name}@{self.server}"

    @property
    def url(self) -> str:
        """The connection URL (with its password: never show it; ``display`` is for people)."""
        return self.settings.require_database_url()

    @property
    def display(self) -> str:
        return ConnInfo.parse(self.url).display()


@dataclass(frozen=True)
class Server:
    """A server whose globals (roles, memberships, role settings, tablespaces) are backed up."""

    server: str
    url: str = field(repr=False)  # its maintenance database, with the password if any
    settings: Settings = field(repr=False)


@dataclass
class Inventory:
    """Every database of the fleet (disabled ones included), the servers whose globals are
    backed up, and the servers that could not be asked for their databases."""

    databases: list[Database] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # server -> one-line reason
    source: str = "DATABASE_URL"
    # '*' servers: the settings every database found there gets (defaults + server overrides)
    templates: dict[str, Settings] = field(default_factory=dict, repr=False)

    def settings_for(self, group: str) -> Settings | None:
        """The settings of a ``database@server`` group as the inventory says (a listed database,
        or any database of a '*' server), or None when the inventory does not cover it."""
        name, _, server = group.rpartition("@")
        for database in self.databases:
            if database.name == name and database.server == server:
                return database.settings
        return self.templates.get(server)

    @property
    def enabled(self) -> list[Database]:
        return [d for d in self.databases if d.enabled]

    def find(self, name: str, server: str | None = None) -> Database:
        """The database called ``name`` (on ``server`` when several servers have one).

        Raises UsageError naming the choices when it is unknown or ambiguous.
        """
        found = [d for d in self.databases if d.name == name and server in (None, d.server)]
        if len(found) == 1:
            return found[0]
        servers = [s for s in self.templates if server in (None, s)]
        if not found and len(servers) == 1:
            # A database of a '*' server not asked for yet: its settings are the server's.
            template = self.templates[servers[0]]
            conn = ConnInfo.parse(template.require_database_url())
            url = ConnInfo({**conn.params, "dbname": name}).conninfo()
            return Database(name, servers[0], template.model_copy(
                update={"database_url": SecretStr(url)}
            ))  # fmt: skip
        if not found:
            known = ", ".join(sorted({d.name for d in self.databases})[:10]) or "none"
            raise UsageError(
                f"database {name!r} is not in the inventory ({self.source}; it has: {known}); "
                "check the name or the inventory"
            )
        where = ", ".join(d.key for d in found)
        raise UsageError(
            f"database {name!r} is on several servers ({where}): name one as db@host:port"
        )

    def lookup(self, spec: str) -> Database:
        """``name`` or ``name@host:port`` (as ``--database`` takes it)."""
        name, _, server = spec.rpartition("@") if "@" in spec else (spec, "", "")
        return self.find(name, server or None)


# --- reading it ---------------------------------------------------------------------------------


def _fields(overrides: Mapping[str, Any], where: str) -> tuple[dict[str, Any], bool]:
    """Validated Settings updates and the ``enabled`` flag from an overrides mapping."""
    updates: dict[str, Any] = {}
    enabled = True
    for key, value in overrides.items():
        if key == "enabled":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: enabled must be true or false")
            enabled = value
            continue
        if key == "targets":
            urls = [value] if isinstance(value, str) else value
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise ConfigError(f"{where}: targets must be a list of storage URLs")
            updates["backup_dir"], updates["backup_targets"] = urls[0], list(urls[1:])
            continue
        name = _OVERRIDES.get(key)
        if name is None:
            known = ", ".join(sorted([*_OVERRIDES, *_SPECIAL]))
            raise ConfigError(f"{where}: unknown setting {key!r} (use one of: {known})")
        info = Settings.model_fields[name]
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(Annotated[info.annotation, info])  # type: ignore[arg-type]
            updates[name] = adapter.validate_python(value)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].lower()
            raise ConfigError(f"{where}: {key}={str(value)[:40]!r} is invalid: {reason}") from None
    return updates, enabled


def _with_password(url: str, entry: Mapping[str, Any], where: str) -> str:
    """``url`` with the password ``password_env`` / ``password_file`` points at (if any)."""
    env_name = entry.get("password_env")
    file_name = entry.get("password_file")
    if env_name and file_name:
        raise ConfigError(f"{where}: give password_env or password_file, not both")
    password = None
    if env_name:
        password = os.environ.get(str(env_name))
        if password is None:
            raise ConfigError(f"{where}: password_env names {env_name}, which is not set")
    elif file_name:
        try:
            password = Path(str(file_name)).read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot read password_file {file_name}: {exc.strerror}"
            ) from None
    conn = ConnInfo.parse(url)
    if password is None:
        return url
    return ConnInfo({**conn.params, "password": password}).conninfo()


def _databases_on(url: str, include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """Every database of the server that accepts connections (templates excluded) matching an
    ``include`` pattern (none: all) and no ``exclude`` pattern (shell-style: ``app_*``).
    Raises the connection errors of ``postgres.connect``."""
    conn = ConnInfo.parse(url)
    try:
        admin = postgres.connect(conn, dbname="postgres")
    except PgkeeperError:
        admin = postgres.connect(conn, dbname="template1")
    with admin:
        rows = admin.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate"
            " ORDER BY datname"
        ).fetchall()
    names = [str(r[0]) for r in rows]
    wanted, unwanted = list(include), list(exclude)
    return [
        n for n in names
        if (not wanted or any(fnmatch.fnmatchcase(n, p) for p in wanted))
        and not any(fnmatch.fnmatchcase(n, p) for p in unwanted)
    ]  # fmt: skip


def _entry(
    base: Settings, url: str, updates: dict[str, Any], enabled: bool
) -> Database:
    conn = ConnInfo.parse(url)
    settings = base.model_copy(update={"database_url": SecretStr(url), **updates})
    return Database(conn.dbname, conn.server, settings, enabled)


def _add_server(
    inventory: Inventory,
    base: Settings,
    url: str,
    entry: Mapping[str, Any],
    defaults: dict[str, Any],
    where: str,
    expand: bool,
) -> None:
    conn = ConnInfo.parse(url)
    server_updates, server_enabled = _fields(
        {k: v for k, v in entry.items() if k not in _SERVER_KEYS}, where
    )
    per_db = entry.get("databases") or {}
    if not isinstance(per_db, Mapping):
        raise ConfigError(f"{where}: databases must map database names to their settings")
    include = entry.get("include") or []
    exclude = entry.get("exclude") or []
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise ConfigError(f"{where}: include and exclude are lists of database names or patterns")
    wants_globals = entry.get("globals", conn.params.get("dbname") == ALL)
    if wants_globals:
        admin_url = ConnInfo({**conn.params, "dbname": "postgres"}).conninfo()
        settings = base.model_copy(update={"database_url": SecretStr(admin_url), **defaults})
        inventory.servers.append(Server(conn.server, admin_url, settings))
    if conn.params.get("dbname") == ALL:
        inventory.templates[conn.server] = base.model_copy(
            update={"database_url": SecretStr(url), **defaults, **server_updates}
        )
        names: list[str] = []
        if expand:
            try:
                names = _databases_on(url, include, exclude)
            except PgkeeperError as exc:
                inventory.errors[conn.server] = exc.message
                log.warning("cannot list the databases of %s: %s", conn.server, exc.message)
        names += [n for n in per_db if n not in names]
    else:
        names = [conn.dbname, *[n for n in per_db if n != conn.dbname]]
    for name in names:
        own = per_db.get(name) or {}
        if not isinstance(own, Mapping):
            raise ConfigError(f"{where}, database {name!r}: its settings must be a mapping")
        updates, enabled = _fields(own, f"{where}, database {name!r}")
        db_url = ConnInfo({**conn.params, "dbname": name}).conninfo()
        merged = {**defaults, **server_updates, **updates}
        inventory.databases.append(
            _entry(base, db_url, merged, server_enabled and enabled)
        )


def load_inventory(settings: Settings, *, expand: bool = True) -> Inventory:
    """The fleet as the settings describe it (see the module docstring).

    ``expand``: ask '*' servers for their databases now (a server that cannot be asked is in
    ``errors``, its listed databases kept). Raises ConfigError for a malformed inventory.
    """
    if settings.backup_inventory is not None and settings.backup_databases:
        raise ConfigError(
            "both BACKUP_INVENTORY and BACKUP_DATABASES are set (use one: the file can say "
            "everything the list says)"
        )
    inventory = Inventory()
    if settings.backup_inventory is not None:
        inventory.source = f"BACKUP_INVENTORY={settings.backup_inventory}"
        data = _read_file(settings.backup_inventory)
        defaults_raw = data.get("defaults") or {}
        if not isinstance(defaults_raw, Mapping):
            raise ConfigError(f"{settings.backup_inventory}: defaults must be a mapping")
        defaults, _ = _fields(defaults_raw, f"{settings.backup_inventory}, defaults")
        servers = data.get("servers")
        if not isinstance(servers, list) or not servers:
            raise ConfigError(
                f"{settings.backup_inventory}: 'servers' must list at least one server"
            )
        for index, entry in enumerate(servers, 1):
            where = f"{settings.backup_inventory}, server {index}"
            if not isinstance(entry, Mapping) or not isinstance(entry.get("url"), str):
                raise ConfigError(f"{where}: each server needs a url")
            url = _with_password(str(entry["url"]), entry, where)
            _add_server(inventory, settings, url, entry, defaults, where, expand)
    elif settings.backup_databases:
        inventory.source = "BACKUP_DATABASES"
        for index, secret in enumerate(settings.backup_databases, 1):
            where = f"BACKUP_DATABASES entry {index}"
            _add_server(inventory, settings, secret.get_secret_value(), {}, {}, where, expand)
    elif settings.database_url is not None and settings.database_url.get_secret_value():
        url = settings.database_url.get_secret_value()
        inventory.databases.append(_entry(settings, url, {}, True))
    else:
        raise ConfigError(
            "no database to back up: set DATABASE_URL (one database), BACKUP_DATABASES "
            "(URLs; a database '*' means all of a server) or BACKUP_INVENTORY (a YAML file)"
        )
    _no_duplicates(inventory)
    return inventory


def configured(settings: Settings) -> Inventory | None:
    """The inventory without asking any server (``expand=False``), or None when nothing names
    a database (a target-only installation: listing and rotating still work)."""
    if settings.backup_inventory or settings.backup_databases or (
        settings.database_url is not None and settings.database_url.get_secret_value()
    ):
        return load_inventory(settings, expand=False)
    return None


def _read_file(path: Path) -> dict[str, Any]:
    import yaml  # lazy: only inventories written as a file need it

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read BACKUP_INVENTORY {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"BACKUP_INVENTORY {path} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"BACKUP_INVENTORY {path} must be a mapping with 'servers'")
    unknown = sorted(set(data) - {"defaults", "servers"})
    if unknown:
        raise ConfigError(f"BACKUP_INVENTORY {path}: unknown key(s) {', '.join(unknown)}")
    return data


def _no_duplicates(inventory: Inventory) -> None:
    seen: set[str] = set()
    for database in inventory.databases:
        if database.key in seen:
            raise ConfigError(
                f"database {database.key} is listed twice in {inventory.source} (keep one)"
            )
        seen.add(database.key)
