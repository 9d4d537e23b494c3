"""A database's own properties, brought back by a restore: its owner, access privileges
(``GRANT ... ON DATABASE``), settings (``ALTER DATABASE ... SET``), the roles' settings in it
(``ALTER ROLE ... IN DATABASE ... SET``) and its comment.

They are not objects inside the database, so restoring its contents into a new database
loses them: a rebuilt server would have every database owned by the restoring user, open to
PUBLIC and without its settings. pg_dump keeps them in an archive's DATABASE, DATABASE
PROPERTIES, COMMENT and ACL entries, which pg_restore writes out only with ``--create`` and
under the original name. So, for custom and directory backups:

  1. ``read_properties``: read the archive's table of contents (its head; the data pass has
     already checked every stored byte), select just those entries
     (``pg_restore --create --list``, then ``-L``), have pg_restore write them as SQL, and
     keep only the statement forms above (sqltext; pg_restore's own ``\\connect`` and
     ``\\restrict`` lines dropped; CREATE DATABASE and session SETs ignored)
  2. ``apply_properties``: name the restored (scratch) database in each statement instead
     of the original, and run them one per call (extended protocol) on the maintenance
     connection before the restore swaps it in; the owner only when the target is new (a
     replaced database keeps its owner, as before). A statement naming a role the server
     lacks is skipped with a warning (restore the server's globals first), and so is one the
     server refuses: the restored data stays.

Plain dumps (pg_dump without ``--create``) hold none of this, and tar archives (imports only)
are not read here: both restore as before, owned by the restoring user.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgkeeper import loader, naming, postgres, sqltext
from pgkeeper.errors import PgkeeperError
from pgkeeper.manifest import Manifest
from pgkeeper.pipeline import ClientProcess
from pgkeeper.settings import Settings
from pgkeeper.sqltext import Statement
from pgkeeper.storage import Storage

log = logging.getLogger(__name__)

# pg_restore --list lines of the database-level entries: "3344; 1262 16386 DATABASE - crm app",
# "3345; 0 0 COMMENT - DATABASE crm app", "3346; 0 0 ACL - DATABASE crm app",
# "3347; 0 0 DATABASE PROPERTIES - crm app".
_ENTRY = re.compile(r"^\d+; \d+ \d+ (?:DATABASE|DATABASE PROPERTIES|COMMENT|ACL) - ", re.M)
_OWN_LINES = re.compile(rb"^\\(?:connect|restrict|unrestrict)\b[^\n]*$", re.M)


@dataclass(frozen=True)
class Property:
    """One statement about the database: ``what`` is owner, access, setting, role setting or
    comment; ``db`` the index of the database's name among its tokens; ``roles`` the roles
    it names, which must exist."""

    what: str
    statement: Statement
    db: int
    roles: tuple[str, ...] = ()


@dataclass
class Properties:
    """The database-level statements of one backup, in pg_restore's order."""

    database: str = ""  # the name the archive gives the database
    codec: str = "utf-8"
    items: list[Property] = field(default_factory=list)


def _classify(stmt: Statement, database: str) -> Property | None:
    w = stmt.words
    found: Property | None = None
    if stmt.is_(0, "ALTER") and stmt.is_(1, "DATABASE") and len(w) > 4:
        if stmt.is_(3, "OWNER") and stmt.is_(4, "TO") and len(w) > 5:
            found = Property("owner", stmt, 2, (stmt.name(5),))
        elif stmt.is_(3, "SET", "RESET"):
            found = Property("setting", stmt, 2)
    elif (
        stmt.is_(0, "ALTER") and stmt.is_(1, "ROLE") and stmt.is_(3, "IN")
        and stmt.is_(4, "DATABASE") and stmt.is_(6, "SET", "RESET")
    ):  # fmt: skip
        found = Property("role setting", stmt, 5, (stmt.name(2),))
    elif stmt.is_(0, "COMMENT") and stmt.is_(1, "ON") and stmt.is_(2, "DATABASE"):
        found = Property("comment", stmt, 3)
    elif stmt.is_(0, "GRANT", "REVOKE"):
        on = next((i for i in range(len(w) - 1) if stmt.is_(i, "ON")), None)
        if on is not None and stmt.is_(on + 1, "DATABASE") and on + 2 < len(w):
            to = "TO" if stmt.is_(0, "GRANT") else "FROM"
            at = next((i for i in range(on + 3, len(w)) if stmt.is_(i, to)), None)
            if at is not None:
                grantees, _ = stmt.names(at + 1, ("WITH", "GRANTED", "CASCADE", "RESTRICT"))
                found = Property("access", stmt, on + 2, tuple(grantees))
    if found is None or stmt.name(found.db) != database:
        return None
    return found


def _toc_path(
    settings: Settings, manifest: Manifest, storage: Storage, tmp: Path, pg_restore: str
) -> Path | None:
    """A local archive pg_restore can read the table of contents of: the stored file or
    folder when it is local and readable as is, else its head (custom) or ``toc.dat``
    (directory) copied into ``tmp``."""
    if manifest.format == "custom":
        obj = manifest.objects[0]
        local = storage.local_path(naming.object_key(manifest.id, obj.name))
        if manifest.compression == "none" and local is not None and local.is_file():
            return local
        head = tmp / "head.dump"
        with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
            loader.capture_head(src, manifest.compression, head, pg_restore, dict(os.environ))
        return head
    if manifest.format == "directory":
        folder = naming.data_name(manifest.id, manifest.format, manifest.compression)
        local = storage.local_path(naming.object_key(manifest.id, folder))
        if local is not None and local.is_dir():
            return local
        (tmp / "dir").mkdir()
        with storage.open_read(naming.object_key(manifest.id, f"{folder}/toc.dat")) as src:
            (tmp / "dir" / "toc.dat").write_bytes(src.read())
        return tmp / "dir"
    return None


def _pg_restore_output(argv: list[str]) -> bytes:
    with tempfile.TemporaryFile() as out:
        with ClientProcess(argv, dict(os.environ), stdout=out) as proc:
            if proc.wait() != 0:
                raise PgkeeperError(f"pg_restore failed: {proc.last_error()}")
        out.seek(0)
        return out.read()


def read_properties(settings: Settings, manifest: Manifest, storage: Storage) -> Properties:
    """The database-level statements of a backup (empty for plain and tar backups, or when
    the archive cannot be read: logged, since the restored data does not depend on them)."""
    if manifest.format not in ("custom", "directory"):
        return Properties()
    pg_restore = postgres.find_client("pg_restore", settings.pg_bin_dir).argv0
    try:
        with tempfile.TemporaryDirectory(prefix="pgkeeper-dbprops-") as tmp:
            path = _toc_path(settings, manifest, storage, Path(tmp), pg_restore)
            if path is None:
                return Properties()
            listing = _pg_restore_output([pg_restore, "--create", "--list", str(path)])
            chosen = [
                line for line in listing.decode("utf-8", "replace").splitlines()
                if _ENTRY.match(line)
            ]  # fmt: skip
            if not chosen:
                return Properties()
            selection = Path(tmp) / "database.list"
            selection.write_text("".join(f"{line}\n" for line in chosen), "utf-8")
            output = _pg_restore_output(
                [pg_restore, "--create", f"--use-list={selection}", "--file=-", str(path)]
            )
        text, codec = sqltext.decode(_OWN_LINES.sub(b"", output))
        statements = sqltext.split_statements(text)
    except (PgkeeperError, OSError) as exc:
        log.warning(
            "the database-level properties of backup %s (owner, access, settings) could not "
            "be read, so they are not restored: %s", manifest.id, exc,
        )  # fmt: skip
        return Properties()
    database = _archive_database(statements, manifest)
    items = [p for s in statements if (p := _classify(s, database)) is not None]
    return Properties(database, codec, items)


def _archive_database(statements: list[Statement], manifest: Manifest) -> str:
    """The database's name as the archive's CREATE DATABASE gives it (else the manifest's)."""
    for stmt in statements:
        if stmt.is_(0, "CREATE") and stmt.is_(1, "DATABASE") and len(stmt.words) > 2:
            return stmt.name(2)
    return manifest.database


def apply_properties(
    admin: psycopg.Connection[Any], props: Properties, dbname: str, *, with_owner: bool
) -> list[str]:
    """Apply the properties to database ``dbname`` in the archive's order (the owner first,
    as pg_restore does, so access privileges are granted by it), the owner only when
    ``with_owner``. Returns what was applied, one short line each; skips (missing roles,
    server refusals) are logged as warnings and never raise."""
    done: list[str] = []
    if not props.items:
        return done
    existing = {str(r[0]) for r in admin.execute("SELECT rolname FROM pg_roles")}
    name = sql.Identifier(dbname).as_string(admin)
    for item in props.items:
        if item.what == "owner" and not with_owner:
            continue
        missing = [r for r in item.roles if r not in existing]
        if missing:
            log.warning(
                "database %s: %s skipped: role %s does not exist on this server (restore the "
                "server's globals first, see 'Whole-server disaster' in docs/disaster-recovery.md)",
                dbname, item.statement.summary(4), ", ".join(missing),
            )  # fmt: skip
            continue
        text = item.statement.replace_token(item.db, name)
        try:
            admin.execute(text.encode(props.codec, "surrogateescape"), binary=True)
        except psycopg.Error as exc:
            if admin.broken:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning(
                "database %s: %s refused by the server: %s",
                dbname, item.statement.summary(4), first,
            )  # fmt: skip
            continue
        done.append(f"{item.what}: {item.statement.summary(4)}")
    return done
