"""A server's globals: back up its roles, memberships, role settings and tablespaces, and
restore them into a server, creating what is missing and keeping what is there.

A database dump (pg_dump) holds one database's objects and their owners and grants by role
name, but not the roles themselves: rebuilding a lost server needs its globals first. They are
a backup of their own (manifest ``kind="globals"``, database ``*``, plain format), listed,
verified, uploaded and rotated like any other (retention keeps them per server).

``backup_globals``, in order:
  1. connect to the server's maintenance database (postgres, else template1) and take the
     server's globals lock                        -> two globals backups of one server never overlap
  2. check pg_dumpall is not older than the server, and whether this user may read role
     passwords (pg_authid): when not, ``--no-role-passwords`` (recorded in the manifest's
     ``options["role_passwords"]``)                -> a non-superuser still gets the roles
  3. stream ``pg_dumpall --globals-only`` -> compress -> sha256 -> the primary target, through
     ``catalog.new_backup`` (manifest last, everything removed on failure)
Credentials reach pg_dumpall through its environment only (``ConnInfo.env``), never argv.

``restore_globals``, in order:
  1. read the whole stored file (at most ``MAX_GLOBALS_BYTES`` decoded: globals are small) and
     check its sha256                             -> a damaged copy executes nothing
  2. refuse any psql meta-command but pg_dumpall's own ``\\restrict`` lines (plainsql.Scanner),
     then split the SQL into statements (quotes, dollar quotes, comments) and sort each into a
     kind; anything that is not a globals statement is skipped with its reason
  3. on the target server, in one transaction with a savepoint per statement: create missing
     roles with their attributes, settings and comments; keep existing roles as they are (their
     CREATE/ALTER/COMMENT skipped, reported as kept); apply memberships and parameter grants
     whose roles all exist; never alter the restoring user
  4. then, outside a transaction (PostgreSQL requires it), create missing tablespaces whose
     location exists on the server; skip the others with the reason
Statements run through psycopg one at a time in the extended protocol, which refuses a second
statement in one call: no psql is involved, so no meta-command can run, and a statement the
splitter got wrong cannot carry another one with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from pgkeeper import (
    __version__,
    alerts,
    catalog,
    crypto,
    naming,
    plainsql,
    postgres,
    procedure,
    sqltext,
)
from pgkeeper.errors import (
    BackupRunningError,
    DatabaseError,
    DatabaseMissingError,
    DumpError,
    PgkeeperError,
    RestoreError,
    UsageError,
    VerificationError,
)
from pgkeeper.manifest import Manifest, StoredObject, utcnow
from pgkeeper.pipeline import (
    ClientProcess,
    HashingReader,
    Progress,
    compress_stream,
    decode_verified,
)
from pgkeeper.postgres import ConnInfo
from pgkeeper.restore import RestoreResult
from pgkeeper.settings import Settings
from pgkeeper.sqltext import SqlTextError, Statement
from pgkeeper.storage import Storage, targets
from pgkeeper.verify import damaged

log = logging.getLogger(__name__)

GLOBALS_DATABASE = "*"  # the manifest's database: the whole server
DEFAULT_NAME = "globals"  # ids read globals_2026-01-02T03-04-05Z
# A server's globals are a few hundred bytes per role: 64 MiB is ~100,000 roles. The file is
# read whole and checked before anything executes, so it must fit in memory.
MAX_GLOBALS_BYTES = 64 * 1024 * 1024
# A lock space of its own (backup locks are LOCK_CLASS, restore scratch databases + 1), taken
# in the maintenance database, so it never meets a database's backup lock.
GLOBALS_LOCK_CLASS = postgres.LOCK_CLASS + 2
_MAINTENANCE = ("postgres", "template1")


# --- taking a globals backup ---------------------------------------------------------------------


def connect_maintenance(conn: ConnInfo) -> psycopg.Connection[Any]:
    """A connection to the server's maintenance database: postgres, else template1 (the URL's
    own database may be ``*`` or long gone: globals belong to the server)."""
    try:
        return postgres.connect(conn, dbname=_MAINTENANCE[0])
    except DatabaseMissingError:
        return postgres.connect(conn, dbname=_MAINTENANCE[1])


@contextmanager
def globals_lock(
    conn: ConnInfo, timeout: float = 0.0, poll: float = 0.5
) -> Iterator[psycopg.Connection[Any]]:
    """Hold the server's globals lock for the block; yield the (maintenance) connection.

    Raises BackupRunningError when another globals backup of the server holds it for longer
    than ``timeout`` seconds. A session lock: the server releases it if this process dies.
    """
    connection = connect_maintenance(conn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            row = connection.execute(
                "SELECT pg_try_advisory_lock(%s, 0)", (GLOBALS_LOCK_CLASS,)
            ).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                raise BackupRunningError(
                    f"another backup of the globals of {conn.server} is running "
                    "(wait for it to finish, or set BACKUP_LOCK_TIMEOUT to wait)"
                )
            time.sleep(poll)
        try:
            yield connection
        finally:
            if not connection.closed:
                connection.execute("SELECT pg_advisory_unlock(%s, 0)", (GLOBALS_LOCK_CLASS,))
    finally:
        connection.close()


def may_read_passwords(connection: psycopg.Connection[Any]) -> bool:
    """Whether the connected user may read pg_authid, where role passwords are (superusers)."""
    row = connection.execute(
        "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT')"
    ).fetchone()
    return bool(row and row[0])


def backup_globals(
    settings: Settings,
    server_url: str | None = None,
    *,
    storage: Storage | None = None,
    name: str | None = None,
    trigger: str = "manual",
    progress: Progress | None = None,
    flow_run_id: str | None = None,
) -> Manifest:
    """Back up the globals of the server of ``server_url`` (default: DATABASE_URL's) to the
    primary target; return the committed manifest (kind ``globals``, database ``*``).

    Raises ConfigError/UsageError for bad settings, the connection errors of
    ``postgres.connect``, BackupRunningError when another globals backup of the server runs,
    ClientVersionError when pg_dumpall is too old, DumpError when it fails, StorageError when
    the target fails. Nothing partial is left listed.
    """
    name = naming.validate_name(name or DEFAULT_NAME)
    conn = ConnInfo.parse(server_url or settings.require_database_url())
    compression = settings.backup_compression
    level = settings.backup_compression_level
    primary = storage if storage is not None else targets(settings)[0]
    pg_dumpall = postgres.find_client("pg_dumpall", settings.pg_bin_dir)

    with globals_lock(conn, settings.backup_lock_timeout) as lock_conn:
        server = postgres.server_info(lock_conn)
        postgres.check_client(pg_dumpall, server.major, server.version)
        recipients = crypto.recipients_of(settings)
        passwords = may_read_passwords(lock_conn)
        maintenance = server.database  # where pg_dumpall reads the globals from, as we did
        catalog.clean_incomplete(primary, GLOBALS_DATABASE, conn.server)
        argv = [pg_dumpall.argv0, "--globals-only", "--no-password", f"--database={maintenance}"]
        if not passwords:
            argv.append("--no-role-passwords")
            log.warning(
                "%s may not read role passwords (not a superuser): the globals of %s are "
                "backed up without them", conn.params.get("user", "this user"), conn.server,
            )  # fmt: skip
        env = conn.with_dbname(maintenance).env()
        with catalog.new_backup(primary, name, GLOBALS_DATABASE, conn.server) as reservation:
            backup_id, started = reservation.backup_id, reservation.started
            log.info("backup %s of the globals of %s started", backup_id, conn.server)
            relative = naming.data_name(
                backup_id, "plain", compression, "globals", encrypted=recipients is not None
            )
            key = naming.object_key(backup_id, relative)
            with ClientProcess(argv, env) as proc, primary.open_write(key) as out:
                stdout = proc.proc.stdout
                assert stdout is not None  # noqa: S101 - ClientProcess pipes stdout by default
                # Encrypted like a database's dump: globals hold role password hashes.
                result = compress_stream(
                    stdout.read, out, compression, level, settings.backup_compression_threads,
                    progress, recipients,
                )  # fmt: skip
                if proc.wait() != 0:  # raised inside open_write: the object is never committed
                    raise DumpError(f"pg_dumpall failed: {proc.last_error()}")
            manifest = Manifest(
                id=backup_id,
                name=name,
                kind="globals",
                database=GLOBALS_DATABASE,
                server=conn.server,
                server_version=server.version,
                pg_dump_version=pg_dumpall.version,
                format="plain",
                compression=compression,
                compression_level=level,
                objects=[StoredObject(name=relative, size=result.size, sha256=result.sha256)],
                size=result.size,
                raw_size=result.raw_size,
                started_at=started,
                finished_at=utcnow(),
                trigger=trigger,
                flow_run_id=flow_run_id,
                options={"globals_only": True, "role_passwords": passwords},
                encryption=crypto.encryption_record(recipients),
                pgkeeper_version=__version__,
            )
            reservation.commit(manifest)
    log.info("backup %s finished: %d bytes", backup_id, manifest.size)
    return manifest


def take_globals(
    settings: Settings,
    server_url: str | None = None,
    *,
    storages: list[Storage] | None = None,
    name: str | None = None,
    trigger: str = "manual",
    verify_level: str | None = None,
    upload_offsite: bool = True,
    rotate_after: bool = True,
    progress_for: procedure.ProgressFor = procedure.no_progress,
) -> procedure.BackupRun:
    """Back up a server's globals the way ``procedure.take_backup`` backs up a database: dump,
    verify (BACKUP_VERIFY, or ``verify_level``), upload, rotate, each outcome told for
    ``* on host:port``. Raises what the dump and verification raise; upload and rotation
    failures are in ``BackupRun.problems``."""
    storages = storages if storages is not None else targets(settings)
    primary = storages[0]
    source = ConnInfo.parse(server_url or settings.require_database_url())
    with alerts.watch(settings, primary, "backup", GLOBALS_DATABASE, source.server) as outcome:
        with progress_for("backup", None) as progress:
            manifest = backup_globals(
                settings, server_url, storage=primary, name=name, trigger=trigger,
                progress=progress,
            )  # fmt: skip
        with progress_for("verify", manifest.size) as progress:
            manifest = procedure.verify(settings, manifest, primary, verify_level, progress)
        outcome.manifest = manifest
    run = procedure.BackupRun(manifest=manifest, locations=[primary.url])
    if upload_offsite and len(storages) > 1:
        with progress_for("upload", manifest.size) as progress:
            run.upload = procedure.upload(settings, manifest, storages, progress)
        assert run.upload is not None  # noqa: S101 - there is an offsite target
        run.locations += run.upload.copied_to + run.upload.already_there
        _tell(settings, primary, source, "upload", procedure.upload_problem(run.upload), run)
    if rotate_after:  # this server's globals only, by the policy of the settings
        run.rotation = procedure.rotate_database(settings, storages, manifest)
        _tell(settings, primary, source, "rotate", procedure.rotation_problem(run.rotation), run)
    return run


def _tell(
    settings: Settings,
    primary: Storage,
    source: ConnInfo,
    operation: str,
    problem: str | None,
    run: procedure.BackupRun,
) -> None:
    if problem is not None:
        run.problems.append(problem)
        log.warning("backup %s: %s", run.manifest.id, problem)
    procedure.tell_step(settings, primary, GLOBALS_DATABASE, source.server, operation, problem)


# --- reading a globals file into statements ----------------------------------------------------


def read_statements(data: bytes) -> tuple[list[Statement], str]:
    """The statements of a globals file and its codec; raises SqlTextError when it holds
    a psql meta-command other than pg_dumpall's own ``\\restrict`` key lines."""
    scanner = plainsql.Scanner()
    cleaned = scanner.feed(data) + scanner.finish()
    if scanner.found is not None:
        raise SqlTextError(f"it holds {scanner.found}")
    text, codec = sqltext.decode(cleaned)
    return sqltext.split_statements(text), codec


# --- what each statement is --------------------------------------------------------------------

_ROLE_WORDS = ("ROLE", "USER", "GROUP")
_SAFE_SETTINGS = ("default_transaction_read_only", "client_encoding", "standard_conforming_strings")


@dataclass(frozen=True)
class Kind:
    """What a statement does, as far as the restore rules care."""

    what: str  # set, create_role, role_attributes, role_setting, role_comment, membership,
    #            parameter_grant, create_tablespace, tablespace, unsupported
    subject: str = ""  # the role or tablespace it is about (set: the setting's name)
    roles: tuple[str, ...] = ()  # every other role it names that must exist
    grantees: tuple[str, ...] = ()  # the roles a grant changes
    detail: str = ""  # a setting's name, or why a statement is unsupported
    cut: int | None = None  # membership: offset of GRANTED BY, dropped when its role is missing
    grantor: str | None = None


def _unsupported(why: str) -> Kind:
    return Kind("unsupported", detail=why)


NOT_GLOBALS = "not a statement about roles or tablespaces: pgkeeper restores only those"


def classify(stmt: Statement) -> Kind:
    """Sort one statement into the kinds the restore rules know (see ``Kind.what``)."""
    w = stmt.words
    if not w or stmt.quoted[0]:
        return _unsupported(NOT_GLOBALS)
    head = w[0]
    if head == "SET" and len(w) > 1:
        setting = stmt.name(2 if stmt.is_(1, "SESSION") else 1)
        if setting in _SAFE_SETTINGS:
            return Kind("set", setting)
        return _unsupported(f"SET {setting} is not one of pg_dumpall's session settings")
    if head == "CREATE" and stmt.is_(1, *_ROLE_WORDS) and len(w) > 2:
        if len(w) > 3:
            # pg_dumpall writes CREATE ROLE name; then ALTER ROLE name WITH ... : options here
            # (IN ROLE, ROLE, ADMIN) could make other roles, the restoring user's, members.
            return _unsupported("CREATE ROLE with options is not how pg_dumpall writes it")
        return Kind("create_role", stmt.name(2))
    if head == "CREATE" and stmt.is_(1, "TABLESPACE") and len(w) > 2:
        owner = [stmt.name(i + 1) for i in range(3, len(w) - 1) if stmt.is_(i, "OWNER")]
        return Kind("create_tablespace", stmt.name(2), roles=tuple(owner))
    if head == "ALTER" and stmt.is_(1, *_ROLE_WORDS) and len(w) > 3:
        if stmt.is_(2, "ALL") and not stmt.quoted[2]:
            return _unsupported("ALTER ROLE ALL changes every role, kept ones included")
        role = stmt.name(2)
        if stmt.is_(3, "SET", "RESET"):
            return Kind("role_setting", role, detail=stmt.name(4) if len(w) > 4 else "")
        if stmt.is_(3, "IN") and stmt.is_(4, "DATABASE"):
            at = next((i for i in range(6, len(w)) if stmt.is_(i, "SET", "RESET")), None)
            setting = stmt.name(at + 1) if at is not None and at + 1 < len(w) else ""
            return Kind("role_setting", role, detail=f"{setting} in database {stmt.name(5)}")
        if stmt.is_(3, "RENAME", "ADD", "DROP"):
            return _unsupported(f"ALTER ROLE ... {w[3]} is not part of a globals backup")
        return Kind("role_attributes", role)
    if head == "ALTER" and stmt.is_(1, "TABLESPACE") and len(w) > 2:
        owner = [stmt.name(i + 2) for i in range(3, len(w) - 2)
                 if stmt.is_(i, "OWNER") and stmt.is_(i + 1, "TO")]  # fmt: skip
        return Kind("tablespace", stmt.name(2), roles=tuple(owner))
    if head in ("COMMENT", "SECURITY") and (on := _on_index(stmt)) is not None:
        if stmt.is_(on + 1, *_ROLE_WORDS) and on + 2 < len(w):
            return Kind("role_comment", stmt.name(on + 2))
        if stmt.is_(on + 1, "TABLESPACE") and on + 2 < len(w):
            return Kind("tablespace", stmt.name(on + 2))
        return _unsupported(NOT_GLOBALS)
    if head in ("GRANT", "REVOKE"):
        return _classify_grant(stmt)
    return _unsupported(NOT_GLOBALS)


def _on_index(stmt: Statement) -> int | None:
    """Where COMMENT ON / SECURITY LABEL [FOR p] ON puts its ON."""
    for i in range(1, min(len(stmt.words), 5)):
        if stmt.is_(i, "ON"):
            return i
    return None


def _classify_grant(stmt: Statement) -> Kind:
    w = stmt.words
    grant = w[0] == "GRANT"
    to = "TO" if grant else "FROM"
    on = next((i for i, _ in enumerate(w) if stmt.is_(i, "ON")), None)
    target = next((i for i, _ in enumerate(w) if stmt.is_(i, to)), None)
    if target is None:
        return _unsupported(f"{w[0]} without {to}")
    stops = ("WITH", "GRANTED", "CASCADE", "RESTRICT")
    grantees, after = stmt.names(target + 1, stops)
    grantor = None
    cut = None
    for i in range(after, len(w) - 2):
        if stmt.is_(i, "GRANTED") and stmt.is_(i + 1, "BY"):
            grantor, cut = stmt.name(i + 2), stmt.starts[i]
    if on is not None and on < target:
        if stmt.is_(on + 1, "TABLESPACE") and on + 2 < len(w):
            return Kind("tablespace", stmt.name(on + 2), grantees=tuple(grantees))
        if stmt.is_(on + 1, "PARAMETER"):
            return Kind("parameter_grant", grantees=tuple(grantees), grantor=grantor, cut=cut)
        return _unsupported(NOT_GLOBALS)
    if not grant:
        return _unsupported("REVOKE of a membership is not part of a globals backup")
    granted, _ = stmt.names(1, ("TO",))
    return Kind("membership", roles=tuple(granted), grantees=tuple(grantees), grantor=grantor,
                cut=cut)  # fmt: skip


# --- restoring ---------------------------------------------------------------------------------


@dataclass
class SkippedStatement:
    """A statement of the globals file that was not applied, and why (one line)."""

    line: int
    statement: str  # its first words (``summary``), never a string's contents
    reason: str
    failed: bool = False  # the server refused it (as opposed to a rule skipping it)


@dataclass
class GlobalsRestore(RestoreResult):
    """What restoring a server's globals did: a ``RestoreResult`` (``restore.restore_backup``
    returns it for a globals backup; ``target`` is the server's host:port, ``database`` ``*``)
    and the report."""

    role_passwords: bool = True  # the backup holds role passwords (taken by a superuser)
    created_roles: list[str] = field(default_factory=list)
    kept_roles: list[str] = field(default_factory=list)  # existed already: left as they are
    memberships: list[str] = field(default_factory=list)  # "team to alice"
    settings: list[str] = field(default_factory=list)  # "alice: work_mem"
    created_tablespaces: list[str] = field(default_factory=list)
    kept_tablespaces: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # comments, tablespace/parameter grants
    skipped: list[SkippedStatement] = field(default_factory=list)

    @property
    def failed(self) -> list[SkippedStatement]:
        return [s for s in self.skipped if s.failed]

    @property
    def ok(self) -> bool:
        """No statement the rules meant to apply was refused by the server."""
        return not self.failed

    def lines(self) -> list[str]:
        """The report, one line per role, membership, setting, tablespace and skip."""
        out = [f"created role {r}" for r in self.created_roles]
        out += [f"kept role {r} (it exists: left as it is)" for r in self.kept_roles]
        out += [f"applied membership {m}" for m in self.memberships]
        out += [f"applied setting {s}" for s in self.settings]
        out += [f"applied {a}" for a in self.applied]
        out += [f"created tablespace {t}" for t in self.created_tablespaces]
        out += [f"kept tablespace {t} (it exists: left as it is)" for t in self.kept_tablespaces]
        out += [
            f"{'FAILED' if s.failed else 'skipped'} line {s.line}: {s.statement}: {s.reason}"
            for s in self.skipped
        ]
        if not self.role_passwords and self.created_roles:
            out.append(
                "note: this backup holds no role passwords (taken without superuser): set "
                "them with ALTER ROLE ... PASSWORD"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


class _Target:
    """The target server as the rules see it: which roles and tablespaces exist, who we are."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection
        row = connection.execute(
            "SELECT current_user, rolsuper, rolcreaterole FROM pg_roles"
            " WHERE rolname = current_user"
        ).fetchone()
        if row is None:
            raise DatabaseError("cannot read the restoring user's role")
        self.me, self.superuser, self.createrole = str(row[0]), bool(row[1]), bool(row[2])
        self.roles = {str(r[0]) for r in connection.execute("SELECT rolname FROM pg_roles")}
        self.tablespaces = {
            str(r[0]) for r in connection.execute("SELECT spcname FROM pg_tablespace")
        }
        self.existing_roles = set(self.roles)
        self.existing_tablespaces = set(self.tablespaces)


def _server_message(exc: psycopg.Error) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("ERROR:").strip()


class _Restorer:
    """Applies a globals file's statements to one server by the rules of the module docstring."""

    def __init__(self, target: _Target, codec: str, report: GlobalsRestore) -> None:
        self.t = target
        self.codec = codec
        self.report = report
        self.not_created: dict[str, str] = {}  # tablespace -> why it was not created

    def skip(self, stmt: Statement, reason: str, failed: bool = False) -> None:
        self.report.skipped.append(SkippedStatement(stmt.line, stmt.summary(), reason, failed))

    def keep_role(self, role: str) -> None:
        if role not in self.report.kept_roles:
            self.report.kept_roles.append(role)

    def run(self, stmt: Statement, text: str | None = None) -> str | None:
        """Execute one statement; the server's one-line refusal, or None when it was applied.
        The extended protocol (``binary=True``) refuses a second statement in one call."""
        query = (stmt.text if text is None else text).encode(self.codec, "surrogateescape")
        try:
            if self.t.connection.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                with self.t.connection.transaction():  # a savepoint: a refusal undoes only this
                    self.t.connection.execute(query, binary=True)
            else:
                self.t.connection.execute(query, binary=True)
        except psycopg.Error as exc:
            if self.t.connection.broken:  # the server or the network is gone: not a refusal
                raise
            return _server_message(exc)
        return None

    def apply(self, stmt: Statement, kind: Kind, on_success: list[str] | None, item: str) -> bool:
        refused = self.run(stmt)
        if refused is not None:
            self.skip(stmt, f"the server refused it: {refused}", failed=True)
            return False
        if on_success is not None:
            on_success.append(item)
        return True

    def missing(self, roles: tuple[str, ...]) -> str | None:
        gone = [r for r in roles if r not in self.t.roles]
        if not gone:
            return None
        shown = ", ".join(gone[:3]) + (" …" if len(gone) > 3 else "")
        return f"role {shown} does not exist on the server (and the backup does not create it)"

    # -- the roles phase (one transaction) --
    def role_statement(self, stmt: Statement, kind: Kind) -> None:
        what, role = kind.what, kind.subject
        if what == "set":
            refused = self.run(stmt)
            if refused is not None:
                self.skip(stmt, f"the server refused it: {refused}", failed=True)
            return
        if what == "create_role":
            if role in self.t.existing_roles:
                self.keep_role(role)
            elif role in self.t.roles:
                self.skip(stmt, f"role {role} was created earlier in this file")
            elif self.apply(stmt, kind, self.report.created_roles, role):
                self.t.roles.add(role)
            return
        if what in ("role_attributes", "role_setting", "role_comment"):
            if role == self.t.me or role in self.t.existing_roles:
                self.keep_role(role)  # its CREATE, ALTER and COMMENT are all skipped
            elif role not in self.t.roles:
                self.skip(stmt, self.missing((role,)) or "")
            elif what == "role_setting":
                self.apply(stmt, kind, self.report.settings, f"{role}: {kind.detail}")
            elif what == "role_comment":
                self.apply(stmt, kind, self.report.applied, f"comment on role {role}")
            else:
                self.apply(stmt, kind, None, role)
            return
        if what in ("membership", "parameter_grant"):
            self.grant(stmt, kind)
            return
        self.skip(stmt, kind.detail or NOT_GLOBALS)

    def grant(self, stmt: Statement, kind: Kind) -> None:
        if self.t.me in kind.grantees:
            self.skip(
                stmt, f"it would change the restoring user {self.t.me}, which is never altered"
            )
            return
        problem = self.missing(kind.roles + kind.grantees)
        if problem is not None:
            self.skip(stmt, problem)
            return
        text = None
        if kind.grantor is not None and kind.grantor not in self.t.roles and kind.cut is not None:
            text = stmt.text[: kind.cut].rstrip() + ";"  # the grantor is gone: grant as us
        refused = self.run(stmt, text)
        if refused is not None:
            self.skip(stmt, f"the server refused it: {refused}", failed=True)
            return
        if kind.what == "membership":
            self.report.memberships.append(f"{', '.join(kind.roles)} to {', '.join(kind.grantees)}")
        else:
            self.report.applied.append(f"parameter grant to {', '.join(kind.grantees)}")

    # -- the tablespaces phase (autocommit: CREATE TABLESPACE refuses a transaction) --
    def tablespace_statement(self, stmt: Statement, kind: Kind) -> None:
        name = kind.subject
        if kind.what == "create_tablespace":
            if name in self.t.existing_tablespaces:
                if name not in self.report.kept_tablespaces:
                    self.report.kept_tablespaces.append(name)
                return
            problem = self.missing(kind.roles)
            if problem is not None:
                self.not_created[name] = "its owner is missing"
                self.skip(stmt, f"tablespace {name} not created: {problem}")
                return
            refused = self.run(stmt)
            if refused is not None:
                self.not_created[name] = "it could not be created"
                self.skip(
                    stmt,
                    f"tablespace {name} not created: {refused} (its location must exist on the "
                    "server, empty and owned by the server's user; then restore again)",
                )
                return
            self.t.tablespaces.add(name)
            self.report.created_tablespaces.append(name)
            return
        if name in self.t.existing_tablespaces:
            return  # kept as it is, like an existing role
        if name not in self.t.tablespaces:
            why = self.not_created.get(name, "it does not exist on the server")
            self.skip(stmt, f"tablespace {name} was not created ({why})")
            return
        if self.t.me in kind.grantees:
            self.skip(
                stmt, f"it would change the restoring user {self.t.me}, which is never altered"
            )
            return
        problem = self.missing(kind.roles + kind.grantees)
        if problem is not None:
            self.skip(stmt, problem)
            return
        self.apply(stmt, kind, self.report.applied, f"{stmt.summary(4)} (tablespace {name})")


def _read_whole(
    storage: Storage,
    manifest: Manifest,
    progress: Progress | None,
    identity: crypto.Identity | None = None,
) -> bytes:
    """The decoded (and, with ``identity``, decrypted) bytes of a stored globals file, its
    sha256 checked before they are returned; raises VerificationError (damaged) or UsageError
    (over MAX_GLOBALS_BYTES)."""
    obj = manifest.objects[0]
    if obj.size > MAX_GLOBALS_BYTES:
        raise UsageError(_too_large(manifest, obj.size))
    buffer = bytearray()

    def sink(data: bytes) -> None:
        buffer.extend(data)
        if len(buffer) > MAX_GLOBALS_BYTES:
            raise UsageError(_too_large(manifest, len(buffer)))

    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        try:
            decode_verified(
                HashingReader.of(src, obj, progress), manifest.compression, sink, identity
            )
        except VerificationError as exc:
            raise damaged(manifest, storage, exc, "nothing was restored") from None
    return bytes(buffer)


def _too_large(manifest: Manifest, size: int) -> str:
    return (
        f"the globals of backup {manifest.id!r} are larger than {MAX_GLOBALS_BYTES >> 20} MiB "
        f"({size} bytes or more): pgkeeper reads globals whole before executing them; restore "
        "it by hand (see 'Whole-server disaster' in docs/disaster-recovery.md)"
    )


def restore_globals(
    settings: Settings,
    manifest: Manifest,
    storage: Storage,
    target_url: str,
    progress: Progress | None = None,
) -> GlobalsRestore:
    """Restore a globals backup (one stored copy) into the server of ``target_url`` by the
    rules of the module docstring, and report what it did.

    Raises UsageError for a backup that is not a globals backup or is too large, or a user who
    may not create roles; VerificationError (nothing executed) for a damaged copy or a file
    holding a psql meta-command; the connection errors of ``postgres.connect``; RestoreError
    when the server fails mid-way (the roles' transaction is then rolled back).
    """
    if manifest.kind != "globals":
        raise UsageError(f"backup {manifest.id!r} is not a globals backup")
    started = time.monotonic()
    conn = ConnInfo.parse(target_url)
    identity = crypto.identity_for(settings, manifest, "restoring it")
    data = _read_whole(storage, manifest, progress, identity)  # 1. whole, checked, before any run
    try:
        statements, codec = read_statements(data)  # 2. SQL only, split
    except SqlTextError as exc:
        raise VerificationError(
            f"backup {manifest.id!r} was not restored (nothing was executed): {exc}",
            check="structure",
        ) from None
    kinds = [(stmt, classify(stmt)) for stmt in statements]
    report = GlobalsRestore(
        backup_id=manifest.id,
        target=conn.server,
        database=GLOBALS_DATABASE,
        duration_seconds=0.0,
        safety_backup_id=None,
        replaced=False,
        source=storage.url,
        role_passwords=bool(manifest.options.get("role_passwords", True)),
    )
    with connect_maintenance(conn) as connection:
        target = _Target(connection)
        if not (target.superuser or target.createrole):
            raise UsageError(
                f"user {target.me} may not create roles on {conn.server} (restore the globals "
                "as a superuser, or a user with CREATEROLE)"
            )
        restorer = _Restorer(target, codec, report)
        tablespace_kinds = ("create_tablespace", "tablespace")
        try:
            with connection.transaction():  # 3. roles, memberships, settings: all or nothing
                for stmt, kind in kinds:
                    if kind.what not in tablespace_kinds:
                        restorer.role_statement(stmt, kind)
        except psycopg.Error as exc:
            raise RestoreError(
                f"restoring the globals of {manifest.id!r} into {conn.server} failed "
                f"({_server_message(exc)}); no role was created (retry)"
            ) from None
        try:
            for stmt, kind in kinds:  # 4. tablespaces, each in its own transaction
                if kind.what in tablespace_kinds:
                    restorer.tablespace_statement(stmt, kind)
        except psycopg.Error as exc:
            raise RestoreError(
                f"restoring the tablespaces of {manifest.id!r} into {conn.server} failed "
                f"({_server_message(exc)}); the roles were restored (restore again: existing "
                "roles and tablespaces are kept)"
            ) from None
    report.duration_seconds = time.monotonic() - started
    log.info(
        "globals of %s restored into %s: %d roles created, %d kept, %d skipped",
        manifest.id, conn.server, len(report.created_roles), len(report.kept_roles),
        len(report.skipped),
    )  # fmt: skip
    return report


def restore_globals_copies(
    settings: Settings,
    found: list[tuple[Manifest, Storage]],
    target_url: str,
    progress: Progress | None = None,
) -> GlobalsRestore:
    """Restore from the first good copy (``restore.copies`` order, primary first): a damaged
    copy is skipped for the next one, as for a database's restore."""
    last_error: PgkeeperError | None = None
    for manifest, storage in found:
        try:
            return restore_globals(settings, manifest, storage, target_url, progress)
        except VerificationError as exc:
            if exc.check == "structure":
                raise  # every copy holds the same bytes: another one says the same
            last_error = exc
            if storage is not found[-1][1]:
                log.warning("copy of %s in %s is bad: %s", manifest.id, storage.url, exc)
    assert last_error is not None  # noqa: S101 - found is never empty
    raise last_error
