"""Restore a backup into a database, leaving the target as it was if anything fails.

The procedure, in order:
  1. pick the first target holding a copy (primary first); a copy failing verification is
     skipped for the next one
  2. refuse a target that has data unless ``confirm`` names it
  3. restore into a new scratch database ``pgk_restore_<random>`` on the target's server;
     the stored bytes are hashed while they are read, and the restore is abandoned
     (scratch dropped) if the sha256 differs from the manifest
  4. give the scratch database the backup's own properties (owner when the target is new,
     access privileges, settings, comment: database_properties.py)
  5. take a safety backup of the existing target (when it has data)
  6. swap names in one transaction: target -> pgk_old_<random>, scratch -> target; drop the old
The target is untouched until step 6, and step 6 is one transaction: a failed restore leaves it
exactly as it was.
An encrypted backup needs the identity (BACKUP_ENCRYPTION_IDENTITY_FILE): it
is proven to open the backup before anything is created, and decrypted files staged for
pg_restore (directory format, the archive's table of contents) go to a private temporary folder,
never beside the backups.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgkeeper import catalog, crypto, database_properties, loader, naming, plainsql, postgres
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.errors import (
    BackupNotFoundError,
    ClientVersionError,
    ConfigError,
    ConfirmationRequiredError,
    DatabaseMissingError,
    PgkeeperError,
    RestoreError,
    UsageError,
    VerificationError,
)
from pgkeeper.manifest import Manifest, StoredObject, utcnow
from pgkeeper.pipeline import ClientProcess, HashingReader, Progress, decode_verified, pid_alive
from pgkeeper.postgres import ConnInfo
from pgkeeper.retention import parse_duration
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.verify import damaged, verify_copy

log = logging.getLogger(__name__)


@dataclass
class RestoreResult:
    backup_id: str
    target: str  # display URL, no password
    database: str
    duration_seconds: float
    safety_backup_id: str | None
    replaced: bool
    source: str  # the storage target the backup was read from


# --- choosing what to restore -----------------------------------------------------------------


def copies(storages: list[Storage], backup_id: str) -> list[tuple[Manifest, Storage]]:
    """Every target holding a complete copy of the backup, in target order."""
    naming.validate_id(backup_id)
    found = []
    for storage in storages:
        manifest = catalog.read_manifest(storage, backup_id)
        if manifest is not None:
            found.append((manifest, storage))
    if not found:
        where = ", ".join(s.url for s in storages)
        raise BackupNotFoundError(
            f"backup {backup_id!r} not found in {where} (run 'pgkeeper list')"
        )
    return found


# --- reading a stored copy --------------------------------------------------------------------


def _damaged(manifest: Manifest, storage: Storage, exc: VerificationError) -> VerificationError:
    return damaged(manifest, storage, exc, "nothing was restored")


def _stream_object(
    storage: Storage,
    manifest: Manifest,
    obj: StoredObject,
    sink: Callable[[bytes], None],
    progress: Progress | None,
    identity: crypto.Identity | None = None,
) -> None:
    """Decode (decrypt) one object into ``sink``; raise VerificationError if its bytes are not
    the manifest's (judged at the end: callers must not commit anything before this returns)."""
    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        try:
            reader = HashingReader.of(src, obj, progress)
            decode_verified(reader, manifest.compression, sink, identity)
        except VerificationError as exc:
            raise _damaged(manifest, storage, exc) from None


def _stage_object(
    storage: Storage,
    manifest: Manifest,
    obj: StoredObject,
    dest: Path,
    progress: Progress | None,
    identity: crypto.Identity | None = None,
) -> None:
    """Copy one object as stored (decrypted, with ``identity``) to a local file, verifying its
    checksum."""
    with (
        storage.open_read(naming.object_key(manifest.id, obj.name)) as src,
        open(dest, "wb") as out,
    ):
        try:
            decode_verified(HashingReader.of(src, obj, progress), "none", out.write, identity)
        except VerificationError as exc:
            raise _damaged(manifest, storage, exc) from None


def _check_whole_object(
    storage: Storage, manifest: Manifest, obj: StoredObject, progress: Progress | None = None
) -> None:
    """Read one stored object whole; raise the damaged-copy error if it is not the manifest's."""
    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        reader = HashingReader.of(src, obj, progress)
        reader.drain()
        try:
            reader.check()
        except VerificationError as exc:
            raise _damaged(manifest, storage, exc) from None


SCRATCH_PREFIX = ".pgkeeper-restore-"


def sweep_scratch(parent: Path) -> list[Path]:
    """Remove staging folders left by restores whose process is gone (e.g. SIGKILLed).

    A folder is named ``.pgkeeper-restore-<pid>-<random>``; it is only removed when no process
    with that pid runs on this machine, so a concurrent restore's folder is never touched.
    """
    removed = []
    for path in parent.glob(f"{SCRATCH_PREFIX}*"):
        pid_text = path.name[len(SCRATCH_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed the staging folder of an interrupted restore: %s", path)
        removed.append(path)
    return removed


@contextmanager
def _scratch_dir(storage: Storage, private: bool = False) -> Iterator[Path]:
    """Where decoded files are staged: beside a local backup folder, else (and always for an
    encrypted backup's decrypted files: ``private``) the temp folder."""
    base = None if private else storage.local_path("")
    parent = base if base is not None and base.is_dir() else Path(tempfile.gettempdir())
    sweep_scratch(parent)
    path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- running pg_restore / psql ----------------------------------------------------------------


_MISSING_ROLE = re.compile(r'role "(.*)" does not exist')
LEAVE_OUT_OPTIONS = "--no-owner --no-privileges"


class MissingRoleError(RestoreError):
    """A restore stopped at a role the target server lacks (an owner, a grantee, a policy's
    role): the server is missing its globals, the backup is not at fault. ``options`` are the
    front door's words for restoring without ownership and grants (None: they would not help,
    or were given)."""

    def __init__(self, failure: str, role: str, options: str | None = LEAVE_OUT_OPTIONS) -> None:
        self.failure = failure
        self.role = role
        self.options = options
        without = (
            f", or restore without the backup's ownership and grants: {options}"
            if options
            else ""
        )
        super().__init__(
            f"{failure} (restore the server's globals first, e.g. pgkeeper restore latest "
            f"--database '*'; see 'Whole-server disaster' in docs/disaster-recovery.md{without})"
        )

    def with_options(self, options: str | None) -> MissingRoleError:
        """The same error, naming ``options`` as the way to restore without the roles."""
        return MissingRoleError(self.failure, self.role, options)


def _restore_failed(proc: ClientProcess) -> RestoreError:
    error = proc.last_error()
    missing = _MISSING_ROLE.search(error)
    if missing:  # owners and grants name roles: a new server lacks them
        # psql replays a plain dump as written: it has no way to leave them out
        options = None if proc.name == "psql" else LEAVE_OUT_OPTIONS
        return MissingRoleError(f"{proc.name} failed: {error}", missing.group(1), options)
    return RestoreError(f"{proc.name} failed: {error}")


@dataclass(frozen=True)
class LeaveOut:
    """What a restore leaves out of the backup, as pg_restore's options of the same names."""

    owner: bool = False  # --no-owner: objects are owned by the restoring user
    privileges: bool = False  # --no-privileges: no GRANT/REVOKE (ACL, DEFAULT ACL entries)

    @property
    def options(self) -> list[str]:
        return [flag for flag, on in (("--no-owner", self.owner),
                                      ("--no-privileges", self.privileges)) if on]  # fmt: skip

    def __bool__(self) -> bool:
        return self.owner or self.privileges


def _refuse_leave_out(manifest: Manifest, leave_out: LeaveOut) -> None:
    """Only pg_restore can leave owners and grants out: a plain dump is replayed by psql."""
    if leave_out and manifest.format == "plain":
        raise UsageError(
            f"backup {manifest.id!r} is a plain SQL dump, which is replayed as written: "
            f"{' '.join(leave_out.options)} need a custom or directory backup (create the "
            "roles it names on the target server, or restore the server's globals first)"
        )


def _load(
    settings: Settings,
    manifest: Manifest,
    storage: Storage,
    conn: ConnInfo,
    dbname: str,
    jobs: int,
    progress: Progress | None,
    leave_out: LeaveOut = LeaveOut(),
) -> None:
    """Load a stored backup into the (new, empty) database ``dbname``, without what
    ``leave_out`` says (custom, directory and tar backups).

    Raises VerificationError when the stored bytes do not match the manifest (the database may
    then hold a partial load: callers drop it), RestoreError when pg_restore/psql fail
    (MissingRoleError when the server lacks a role the backup names), IdentityError when an
    encrypted backup has no identity that opens it, UsageError for ``leave_out`` on a plain
    dump.
    """
    _refuse_leave_out(manifest, leave_out)
    try:
        _load_as_is(settings, manifest, storage, conn, dbname, jobs, progress, leave_out)
    except MissingRoleError as exc:
        if leave_out.owner and leave_out.privileges and exc.options:
            raise exc.with_options(None) from None  # they were given: something else names it
        raise


def _load_as_is(
    settings: Settings,
    manifest: Manifest,
    storage: Storage,
    conn: ConnInfo,
    dbname: str,
    jobs: int,
    progress: Progress | None,
    leave_out: LeaveOut,
) -> None:
    identity = crypto.identity_for(settings, manifest, "restoring it")
    encrypted = identity is not None
    env = conn.with_dbname(dbname).env()
    if manifest.format == "plain":
        # psql runs any backslash command of its input: a plain dump is replayed in psql's
        # restricted mode under a key of ours (plainsql.py), whoever made the dump.
        psql = postgres.find_client("psql", settings.pg_bin_dir)
        if not plainsql.psql_can_restrict(psql.version):
            raise ClientVersionError(
                f"psql {psql.version} cannot refuse the psql meta-commands a plain dump may hold "
                "(\\restrict came in 13.22, 14.19, 15.14, 16.10, 17.6 and 18): install a newer "
                "postgresql-client and set PG_BIN_DIR"
            )
        argv = [
            psql.argv0,
            "--no-password",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "--single-transaction",
            f"--dbname={dbname}",
            "--file=-",  # errors then name the input line: psql:<stdin>:N
        ]
        _pipe_into(argv, env, settings, manifest, storage, progress, plainsql.Replay(), identity)
        return
    pg_restore = postgres.find_client("pg_restore", settings.pg_bin_dir)
    _check_archive_version(pg_restore, manifest)
    base = [pg_restore.argv0, "--no-password", "--exit-on-error", f"--dbname={dbname}",
            *leave_out.options]  # fmt: skip
    if manifest.format == "directory":
        folder = naming.data_name(manifest.id, manifest.format, manifest.compression)
        local = storage.local_path(naming.object_key(manifest.id, folder))
        with _scratch_dir(storage, private=encrypted) as tmp:
            if local is not None and local.is_dir() and not encrypted:
                for obj in manifest.objects:
                    _check_whole_object(storage, manifest, obj, progress)
                source = local
            else:
                source = tmp / "dump"
                for obj in manifest.objects:
                    inner = obj.name[len(folder) + 1 :]
                    if encrypted:
                        inner = inner.removesuffix(crypto.SUFFIX)
                    dest = tmp / "dump" / inner
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    _stage_object(storage, manifest, obj, dest, progress, identity)
            _run([*base, f"--jobs={jobs}", str(source)], env)
        return
    obj = manifest.objects[0]
    if manifest.format == "custom" and jobs > 1:
        # An uncompressed local file is seekable: pg_restore -j reads it as it is (after its
        # checksum); anything else loads from the stream (loader.py).
        local = storage.local_path(naming.object_key(manifest.id, obj.name))
        plain_file = manifest.compression == "none" and not encrypted
        if plain_file and local is not None and local.is_file():
            _check_whole_object(storage, manifest, obj, progress)
            _run([*base, f"--jobs={jobs}", str(local)], env)
            return
        with _scratch_dir(storage, private=encrypted) as tmp:
            _ParallelLoad(
                manifest, storage, conn, dbname, jobs, pg_restore, tmp, progress, identity,
                leave_out,
            ).run()  # fmt: skip
        return
    _pipe_into(base, env, settings, manifest, storage, progress, None, identity)


@dataclass
class _ParallelLoad:
    """A custom-format archive loaded ``jobs`` wide straight from its stored stream: the four
    steps of loader.py, against the new database ``dbname``."""

    manifest: Manifest
    storage: Storage
    conn: ConnInfo
    dbname: str
    jobs: int
    pg_restore: postgres.Client
    tmp: Path
    progress: Progress | None
    identity: crypto.Identity | None = None
    leave_out: LeaveOut = LeaveOut()

    @property
    def env(self) -> dict[str, str]:
        return self.conn.with_dbname(self.dbname).env()

    @property
    def base(self) -> list[str]:
        """pg_restore into the new database."""
        return [self.pg_restore.argv0, "--no-password", "--exit-on-error",
                f"--dbname={self.dbname}", *self.leave_out.options]  # fmt: skip

    def run(self) -> None:
        manifest, storage, obj = self.manifest, self.storage, self.manifest.objects[0]
        head = self.tmp / "head.dump"
        with ExitStack() as stack:
            src = stack.enter_context(storage.open_read(naming.object_key(manifest.id, obj.name)))
            head_src: loader.Readable = src
            if self.identity is not None:  # the head is read decrypted (checked by the data pass)
                head_src = stack.enter_context(crypto.DecryptingReader(src.read, self.identity))
            try:
                listing = loader.capture_head(
                    head_src, manifest.compression, head, self.pg_restore.argv0, self.env
                )
            except VerificationError as exc:
                raise _damaged(manifest, storage, exc) from None
            except RestoreError:
                # Not an archive pg_restore can read: damaged bytes if the checksum says so.
                _check_whole_object(storage, manifest, obj)
                raise
        data_listing = _output(
            [self.pg_restore.argv0, "--list", "--section=data", str(head)], self.env
        )
        plan = loader.plan(listing, data_listing)
        lists = {}
        for name, lines in (
            ("tables", plan.table_data), ("streamed", plan.streamed), ("rest", plan.rest)
        ):  # fmt: skip
            lists[name] = self.tmp / f"{name}.list"
            lists[name].write_text("".join(f"{line}\n" for line in lines), "utf-8")
        _run([*self.base, "--section=pre-data", str(head)], self.env)
        if plan.table_data or plan.streamed:
            self._data(plan, lists)
        else:  # nothing in the data section needs the stream; still verify every stored byte
            _stream_object(
                storage, manifest, obj, lambda data: None, self.progress, self.identity
            )
        _run(
            [*self.base, f"--jobs={self.jobs}", "--section=data", "--section=post-data",
             f"--use-list={lists['rest']}", str(head)],
            self.env,
        )  # fmt: skip

    def _data(self, plan: loader.Plan, lists: dict[str, Path]) -> None:
        """Step 3: one verified pass over the stream feeds the table rows to the dealer
        (through ``pg_restore -f -``) and other data (large objects) to a pg_restore."""
        env = self.env
        dumper_argv = [self.pg_restore.argv0, "--section=data",
                       f"--use-list={lists['tables']}", "--file=-"]  # fmt: skip
        dealer = loader.TableDealer(self.conn, self.dbname, self.jobs)
        failure: list[BaseException] = []
        ok = False
        with ExitStack() as stack:
            procs = []
            if plan.table_data:
                dumper = stack.enter_context(
                    ClientProcess(dumper_argv, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                )
                procs.append(dumper)

                def deal() -> None:
                    assert dumper.proc.stdout is not None  # noqa: S101 - stdout=PIPE
                    try:
                        dealer.run(dumper.proc.stdout.read)
                    except BaseException as exc:  # raised by the streaming thread
                        failure.append(exc)
                        dumper.kill()  # unblocks the stream writing into it

                dealing = threading.Thread(target=deal, daemon=True, name="pgkeeper-dealer")
                dealing.start()
            if plan.streamed:
                streamer = ClientProcess(
                    [*self.base, "--section=data", f"--use-list={lists['streamed']}"],
                    env,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )
                procs.append(stack.enter_context(streamer))

            def failed(proc: ClientProcess) -> BaseException:
                return failure[0] if failure else _restore_failed(proc)

            feeding = list(procs)

            def sink(data: bytes) -> None:
                for proc in list(feeding):
                    try:
                        proc.proc.stdin.write(data)  # type: ignore[union-attr]
                    except BrokenPipeError:
                        # A pg_restore given a list stops reading once its last entry is done
                        # (the archive's tail may hold only other entries' blocks): exit code 0
                        # means it has all it needed; anything else is its failure.
                        if proc.wait() != 0:
                            raise failed(proc) from None
                        feeding.remove(proc)

            try:
                _stream_object(
                    self.storage, self.manifest, self.manifest.objects[0], sink, self.progress,
                    self.identity,
                )  # fmt: skip
                for proc in procs:
                    with suppress(BrokenPipeError):
                        proc.proc.stdin.close()  # type: ignore[union-attr]
                if plan.table_data:
                    dealing.join()
                for proc in procs:
                    if proc.wait() != 0:
                        raise failed(proc)
                if failure:
                    raise failure[0]
                ok = True
            finally:
                dealer.finish(ok)
        log.info("loaded %d tables over %d connections", dealer.tables, len(dealer.connections))


def _output(argv: list[str], env: dict[str, str]) -> str:
    with tempfile.TemporaryFile() as out:
        with ClientProcess(argv, env, stdout=out) as proc:
            if proc.wait() != 0:
                raise _restore_failed(proc)
        out.seek(0)
        return out.read().decode("utf-8", "replace")


def _check_archive_version(pg_restore: postgres.Client, manifest: Manifest) -> None:
    try:
        dumped_by = int(manifest.pg_dump_version.split(".")[0])
    except ValueError:
        return
    if pg_restore.major < dumped_by:
        raise UsageError(
            f"pg_restore {pg_restore.version} cannot read a dump made by pg_dump "
            f"{manifest.pg_dump_version}: install postgresql-client-{dumped_by} and set PG_BIN_DIR"
        )


def _run(argv: list[str], env: dict[str, str]) -> None:
    with ClientProcess(argv, env, stdout=subprocess.DEVNULL) as proc:
        if proc.wait() != 0:
            raise _restore_failed(proc)


# psql's words for a meta-command refused in restricted mode (N counts our \restrict line).
_REFUSED = re.compile(
    r"psql:<stdin>:(\d+): error: (?:backslash commands are restricted|\\unrestrict)"
)


def _pipe_into(
    argv: list[str],
    env: dict[str, str],
    settings: Settings,
    manifest: Manifest,
    storage: Storage,
    progress: Progress | None,
    replay: plainsql.Replay | None = None,
    identity: crypto.Identity | None = None,
) -> None:
    """Stream the stored dump into the stdin of ``argv`` (pg_restore, or psql for a plain dump,
    which goes through ``replay``: the first foreign meta-command ends the restore)."""
    with ClientProcess(argv, env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL) as proc:
        stdin = proc.proc.stdin
        assert stdin is not None  # noqa: S101 - stdin=PIPE

        def failed() -> RestoreError:
            if replay is None:
                return _restore_failed(proc)
            proc.wait()  # psql is gone or going: let its last words arrive
            refused = _REFUSED.match(proc.last_error())
            if refused is None:
                return _restore_failed(proc)
            return RestoreError(
                f"backup {manifest.id!r} was not restored (the target is as it was): its plain "
                f"dump holds a psql meta-command at line {int(refused.group(1)) - 1}, which "
                "pgkeeper never runs: a plain dump must hold SQL only"
            )

        def write(data: bytes) -> None:
            try:
                stdin.write(data)
            except BrokenPipeError:
                raise failed() from None

        def refuse_what_replay_found() -> None:
            if replay is not None and replay.found is not None:
                raise RestoreError(
                    f"backup {manifest.id!r} was not restored (the target is as it was): its "
                    f"plain dump holds {replay.found}"
                )

        def sink(data: bytes) -> None:
            write(data if replay is None else replay.feed(data))
            refuse_what_replay_found()

        _stream_object(storage, manifest, manifest.objects[0], sink, progress, identity)
        if replay is not None:
            write(replay.finish())
            refuse_what_replay_found()
        with suppress(BrokenPipeError):
            stdin.close()
        if proc.wait() != 0:
            raise failed()


# --- databases --------------------------------------------------------------------------------


def _admin(conn: ConnInfo) -> psycopg.Connection[Any]:
    """A connection to the target server's maintenance database (postgres, else template1)."""
    try:
        return postgres.connect(conn, dbname="postgres")
    except DatabaseMissingError:
        return postgres.connect(conn, dbname="template1")


def server_roles(server_url: str) -> set[str]:
    """The names of every role of the server at ``server_url`` (pg_roles: readable by any
    user). Raises the connection errors of ``postgres.connect``."""
    with _admin(ConnInfo.parse(server_url)) as admin:
        return {str(row[0]) for row in admin.execute("SELECT rolname FROM pg_roles")}


def _create_database(
    admin: psycopg.Connection[Any], dbname: str, owner: str | None, encoding: str | None
) -> None:
    query = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(dbname))
    if owner:
        query += sql.SQL(" OWNER {}").format(sql.Identifier(owner))
    if encoding:
        try:
            admin.execute(query + sql.SQL(" ENCODING {}").format(sql.Literal(encoding)))
            return
        except psycopg.errors.InvalidParameterValue:
            log.warning(
                "encoding %s is not usable with the server's locale; using default", encoding
            )
    try:
        admin.execute(query)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise RestoreError(
            f"cannot create database {dbname!r}: permission denied "
            "(the restore user needs CREATEDB, or restore as a superuser)"
        ) from exc


def _owner_of(admin: psycopg.Connection[Any], dbname: str) -> str | None:
    row = admin.execute(
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (dbname,)
    ).fetchone()
    return str(row[0]) if row else None


SCRATCH_DATABASES = ("pgk_restore_", "pgk_restoretest_")
SCRATCH_LOCK_CLASS = postgres.LOCK_CLASS + 1  # a second lock space: scratch databases in use


def _hold_scratch(admin: psycopg.Connection[Any], dbname: str) -> None:
    """Mark a scratch database as in use for the life of this session (see sweep)."""
    admin.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (SCRATCH_LOCK_CLASS, dbname))


def sweep_scratch_databases(admin: psycopg.Connection[Any]) -> list[str]:
    """Drop scratch databases that a killed restore or restore test left on this server, and
    ``pgk_old_*`` databases: a target a restore had already replaced (the user confirmed it,
    and its safety backup was taken) when it was killed before dropping it.

    A scratch database is in use while its restore holds an advisory lock on its name and has a
    connection to it; only databases with neither are dropped.
    """
    rows = admin.execute(
        "SELECT d.datname FROM pg_database d WHERE (d.datname LIKE 'pgk\\_restore\\_%%'"
        " OR d.datname LIKE 'pgk\\_restoretest\\_%%' OR d.datname LIKE 'pgk\\_old\\_%%')"
        " AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)"
    ).fetchall()
    dropped = []
    for (name,) in rows:
        got = admin.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (SCRATCH_LOCK_CLASS, name)
        ).fetchone()
        if not (got and got[0]):
            continue
        try:
            postgres.drop_database(admin, str(name))
            dropped.append(str(name))
            log.info("dropped %s, left by an interrupted restore", name)
        except psycopg.Error as exc:
            log.warning("could not drop the leftover scratch database %s: %s", name, exc)
        finally:
            admin.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (SCRATCH_LOCK_CLASS, name))
    return dropped


def _swap(admin: psycopg.Connection[Any], target: str, scratch: str, exists: bool) -> None:
    """Make ``scratch`` the ``target`` in one transaction; drop the old target afterwards."""
    old = f"pgk_old_{secrets.token_hex(4)}"
    _hold_scratch(admin, old)  # until it is dropped; if we die first, the next restore drops it
    for attempt in range(5):
        try:
            if exists:
                postgres.terminate_connections(admin, target)
            with admin.transaction():
                if exists:
                    admin.execute(
                        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                            sql.Identifier(target), sql.Identifier(old)
                        )
                    )
                admin.execute(
                    sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                        sql.Identifier(scratch), sql.Identifier(target)
                    )
                )
            break
        except psycopg.errors.ObjectInUse:
            if attempt == 4:
                raise RestoreError(
                    f"database {target!r} keeps getting new connections; stop the applications "
                    "using it and retry (it was left as it was)"
                ) from None
            time.sleep(0.5)
    if exists:
        try:
            postgres.drop_database(admin, old)
        except psycopg.Error as exc:
            log.warning("restored, but could not drop the replaced database %s: %s", old, exc)


def default_target_name(database: str) -> str:
    """A new database name ``<db>_restored_<UTC time>_<random>`` within PostgreSQL's 63 bytes.

    The random part keeps two restores started in the same second apart (the second one would
    otherwise find the first's database and ask for --confirm).
    """
    suffix = f"_restored_{utcnow():%Y%m%d_%H%M%S}_{secrets.token_hex(2)}"
    head = database.encode()[: 63 - len(suffix)].decode("utf-8", "ignore")
    return head + suffix


def _default_target(settings: Settings, manifest: Manifest) -> str:
    """A new database on the source server (see ``default_target_name``)."""
    source = ConnInfo.parse(settings.require_database_url())
    return source.with_dbname(default_target_name(manifest.database)).conninfo()


def restore_into_new_database(
    settings: Settings,
    manifest: Manifest,
    storage: Storage,
    server_url: str,
    dbname: str,
    jobs: int | None = None,
    progress: Progress | None = None,
    leave_out: LeaveOut = LeaveOut(),
) -> float:
    """Restore a copy into a new database ``dbname`` on ``server_url`` (without what
    ``leave_out`` says); return the seconds taken.

    The database must not exist. On failure it is dropped and the error propagates.
    """
    _refuse_leave_out(manifest, leave_out)
    conn = ConnInfo.parse(server_url)
    identity = crypto.identity_for(settings, manifest, "restoring it")
    if identity is not None:  # before anything is created: the key opens this backup
        crypto.check_identity(storage, manifest, identity)
    started = time.monotonic()
    with _admin(conn) as admin:
        sweep_scratch_databases(admin)
        if postgres.database_exists(admin, dbname):
            raise UsageError(
                f"database {dbname!r} already exists on {conn.server} (pick a new name)"
            )
        _hold_scratch(admin, dbname)
        _create_database(admin, dbname, None, manifest.options.get("encoding"))
        try:
            _load(
                settings,
                manifest,
                storage,
                conn,
                dbname,
                jobs or settings.backup_restore_jobs,
                progress,
                leave_out,
            )
        except BaseException:
            postgres.drop_database(admin, dbname)
            raise
    return time.monotonic() - started


def take_safety_backup(
    settings: Settings, target_url: str, backup_id: str, primary: Storage
) -> Manifest:
    """Back up the database a restore is about to replace, prove it and keep it.

    The safety backup (``pre_restore_<time>``) is verified in full whatever BACKUP_VERIFY says,
    since it is the only way back from a wrong restore, and rotation keeps it for
    BACKUP_SAFETY_KEEP (default 7 days) whatever the policy says. Raises RestoreError when it
    fails verification: the restore then stops with the target untouched.
    """
    keep = parse_duration(settings.backup_safety_keep, "BACKUP_SAFETY_KEEP")
    options = BackupOptions(
        name="pre_restore",
        database_url=target_url,
        trigger=f"safety before restoring {backup_id}",
        keep_until=utcnow() + keep,
    )
    safety = run_backup(settings, options, storage=primary)
    try:
        safety = verify_copy(settings, primary, safety, level="full")
    except VerificationError as exc:
        raise RestoreError(
            f"the safety backup {safety.id} of {safety.database!r} failed verification ({exc}); "
            "nothing was restored (fix the storage target and retry)"
        ) from None
    log.info(
        "safety backup of %s taken and verified: %s (kept until %s)",
        safety.database, safety.id, options.keep_until,
    )  # fmt: skip
    return safety


def restore_backup(
    settings: Settings,
    backup_id: str | None,
    target_url: str | None,
    *,
    confirm: str | None = None,
    jobs: int | None = None,
    safety_backup: bool = True,
    storages: list[Storage] | None = None,
    progress: Progress | None = None,
    leave_out: LeaveOut = LeaveOut(),
) -> RestoreResult:
    """Restore a backup (default: the newest verified) into ``target_url`` (default: a new
    database on the source server). See the module docstring for the procedure. A globals
    backup goes into the server of ``target_url`` (default: DATABASE_URL's) instead, and the
    result is a ``server_globals.GlobalsRestore`` (see ``server_globals.restore_globals``).
    ``leave_out`` restores a database's backup without its owners and/or grants (the
    database's own owner and access privileges included), as pg_restore's ``--no-owner`` and
    ``--no-privileges``: for a server that lacks the roles the backup names.

    Raises BackupNotFoundError/InvalidBackupIdError, ConfirmationRequiredError, connection
    errors, VerificationError (every copy is bad), RestoreError (MissingRoleError: the server
    lacks a role the backup names), UsageError for ``leave_out`` on a plain dump, a globals
    or a base backup. The target is unchanged on any error.
    """
    storages = storages if storages is not None else targets(settings)
    if backup_id is None:
        backup_id = catalog.latest_backup(settings, storages).id
    found = copies(storages, backup_id)
    manifest = found[0][0]
    if manifest.kind == "base":  # a whole cluster's files, not a dump: pitr restore builds it
        raise UsageError(
            f"backup {backup_id!r} is a base backup of a whole cluster, not a dump: restore it "
            f"with 'pgkeeper pitr restore --base {backup_id} --to DIR (--latest|--time T)'"
        )
    if manifest.kind == "globals":  # a server's roles and tablespaces: restored into a server
        from pgkeeper.server_globals import restore_globals_copies

        if leave_out:
            raise UsageError(
                f"backup {backup_id!r} holds a server's globals (its roles): "
                f"{' '.join(leave_out.options)} apply to a database's backup"
            )

        server_url = target_url or settings.require_database_url()
        return restore_globals_copies(settings, found, server_url, progress)
    _refuse_leave_out(manifest, leave_out)
    target_url = target_url or _default_target(settings, manifest)
    conn = ConnInfo.parse(target_url)
    target = conn.dbname
    jobs = jobs or settings.backup_restore_jobs
    identity = crypto.identity_for(settings, manifest, "restoring it")  # none: stop at once
    started = time.monotonic()

    with _admin(conn) as admin:
        sweep_scratch_databases(admin)
        exists = postgres.database_exists(admin, target)
        has_data = exists and postgres.database_has_data(conn, target)
        if has_data and confirm != target:
            raise ConfirmationRequiredError(
                f"database {target!r} on {conn.server} already has data; restoring replaces it "
                f"(pass --confirm {target} to proceed; a safety backup is taken first)"
            )
        # The safety backup is a new backup: encrypted only if recipients are set here.
        encrypted = manifest.encryption is not None
        if has_data and safety_backup and encrypted and crypto.recipients_of(settings) is None:
            raise ConfigError(
                f"backup {backup_id!r} is encrypted but BACKUP_ENCRYPTION_RECIPIENTS is not "
                f"set here, so the safety backup of {target!r} would be stored unencrypted "
                "(set the same recipients where restores run, or pass --no-safety-backup)"
            )
        owner = _owner_of(admin, target) if exists else None
        last_error: PgkeeperError | None = None
        for copy_manifest, storage in found:
            if identity is not None and copy_manifest.encryption is not None:
                try:  # the key opens this copy, before a scratch database is created
                    crypto.check_identity(storage, copy_manifest, identity)
                except VerificationError as exc:
                    last_error = _damaged(copy_manifest, storage, exc)
                    log.warning("copy of %s in %s is bad: %s", backup_id, storage.url, exc)
                    continue
            scratch = f"pgk_restore_{secrets.token_hex(4)}"
            _hold_scratch(admin, scratch)
            _create_database(admin, scratch, owner, copy_manifest.options.get("encoding"))
            try:
                log.info("restoring %s from %s into %s", backup_id, storage.url, conn.display())
                _load(settings, copy_manifest, storage, conn, scratch, jobs, progress, leave_out)
            except VerificationError as exc:
                postgres.drop_database(admin, scratch)
                last_error = exc
                if storage is not found[-1][1]:  # the last copy's error is raised, not logged
                    log.warning("copy of %s in %s is bad: %s", backup_id, storage.url, exc)
                continue
            except BaseException:
                postgres.drop_database(admin, scratch)
                raise
            try:
                # The database's own owner, access, settings and comment (not in its contents),
                # before the swap: it is never live without its REVOKE CONNECT.
                props = database_properties.read_properties(settings, copy_manifest, storage)
                if leave_out.privileges:  # GRANT/REVOKE ... ON DATABASE are grants too
                    props.items = [item for item in props.items if item.what != "access"]
                database_properties.apply_properties(
                    admin, props, scratch, with_owner=not exists and not leave_out.owner
                )
                safety_id = None
                if has_data and safety_backup:
                    safety_id = take_safety_backup(settings, target_url, backup_id, storages[0]).id
                _swap(admin, target, scratch, exists)
            except BaseException:
                postgres.drop_database(admin, scratch)
                raise
            return RestoreResult(
                backup_id=backup_id,
                target=conn.display(),
                database=target,
                duration_seconds=time.monotonic() - started,
                safety_backup_id=safety_id,
                replaced=exists,
                source=storage.url,
            )
    assert last_error is not None  # noqa: S101 - the loop ran at least once
    raise last_error
