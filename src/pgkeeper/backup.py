"""Make one backup of one database onto the primary storage target.

The procedure, in order (each step's safety reason beside it):
  1. take the database's backup lock           -> two backups of one database never overlap
  2. check pg_dump is not older than the server -> a clear error instead of pg_dump's refusal
  3. remove this database's incomplete backups  -> the lock proves no run of ours is writing them
  4. write ``pending.json``                     -> an abandoned folder says whose it is
  5. export a snapshot; count rows in it while pg_dump streams the same snapshot
  6. stream pg_dump -> compress -> (age encrypt) -> sha256 -> storage (temp name, then atomic
     commit); with BACKUP_ENCRYPTION_RECIPIENTS nothing unencrypted reaches the target
  7. write the manifest                         -> the commit marker: only now is it listed
On any failure or interruption the partial objects are removed before the error propagates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from pgkeeper import __version__, catalog, crypto, dumpfilter, naming, postgres
from pgkeeper.errors import DumpError, PgkeeperError, StorageFullError, UsageError
from pgkeeper.manifest import Manifest, StoredObject, utcnow
from pgkeeper.pipeline import ClientProcess, Progress, compress_stream
from pgkeeper.postgres import ConnInfo
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK
from pgkeeper.storage.local import DIR_MODE, FILE_MODE

log = logging.getLogger(__name__)


@dataclass
class BackupOptions:
    """What to dump and how; ``None`` fields take the settings' defaults."""

    name: str | None = None
    database_url: str | None = None
    format: str | None = None
    compression: str | None = None
    compression_level: int | None = None
    schema_only: bool = False
    data_only: bool = False
    tables: Sequence[str] = field(default_factory=tuple)
    exclude_tables: Sequence[str] = field(default_factory=tuple)
    jobs: int | None = None
    trigger: str = "manual"
    flow_run_id: str | None = None  # the Prefect run doing this backup, recorded for the API
    keep_until: datetime | None = None  # rotation keeps it until then (safety backups)


def _resolve(settings: Settings, options: BackupOptions) -> tuple[str, str, str, str, int]:
    name = naming.validate_name(options.name or settings.backup_name)
    url = options.database_url or settings.require_database_url()
    fmt = options.format or settings.backup_format
    compression = options.compression or settings.backup_compression
    if fmt not in naming.FORMATS:
        raise UsageError(f"format {fmt!r} is unknown (use custom, plain or directory)")
    if compression not in naming.COMPRESSIONS:
        raise UsageError(f"compression {compression!r} is unknown (use zstd, gzip or none)")
    if options.schema_only and options.data_only:
        raise UsageError("--schema-only and --data-only exclude each other (choose one)")
    for pattern in [*options.tables, *options.exclude_tables]:
        if not pattern.strip() or any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) < 0xE000
                                      for c in pattern):  # fmt: skip
            shown = pattern.encode("unicode_escape").decode()[:60]
            raise UsageError(
                f"table pattern '{shown}' is empty or holds a control character (use names "
                "like 'public.orders' or 'shop.*')"
            )
    jobs = options.jobs or settings.backup_jobs
    return name, url, fmt, compression, jobs


def _dump_argv(
    pg_dump: postgres.Client, fmt: str, snapshot: str | None, options: BackupOptions
) -> list[str]:
    argv = [pg_dump.argv0, "--no-password", "--verbose" if log.isEnabledFor(logging.DEBUG) else ""]
    argv = [a for a in argv if a]
    if snapshot:
        argv.append(f"--snapshot={snapshot}")
    if options.schema_only:
        argv.append("--schema-only")
    if options.data_only:
        argv.append("--data-only")
    argv += _filter_argv(options)
    if fmt == "custom":
        argv += ["--format=custom", "--compress=0"]  # we compress the whole stream ourselves
    elif fmt == "plain":
        argv += ["--format=plain"]
    return argv


def _filter_argv(options: BackupOptions) -> list[str]:
    """The -t/-T switches; --strict-names makes a -t pattern that matches nothing an error."""
    argv = [f"--table={t}" for t in options.tables]
    argv += [f"--exclude-table={t}" for t in options.exclude_tables]
    if options.tables:
        argv.append("--strict-names")
    return argv


def run_backup(
    settings: Settings,
    options: BackupOptions | None = None,
    *,
    storage: Storage | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Back up one database to the primary target and return its manifest.

    Raises ConfigError/UsageError for bad options, the connection errors of
    ``postgres.connect``, BackupRunningError when another backup of the database runs,
    ClientVersionError when pg_dump is too old, DumpError when pg_dump fails, StorageError
    (incl. StorageFullError) when the target fails. Nothing partial is left listed.
    """
    options = options or BackupOptions()
    name, url, fmt, compression, jobs = _resolve(settings, options)
    conn = ConnInfo.parse(url)
    recipients = crypto.recipients_of(settings)  # a bad key list fails before anything runs
    primary = storage if storage is not None else targets(settings)[0]
    pg_dump = postgres.find_client("pg_dump", settings.pg_bin_dir)
    if fmt == "directory" and compression == "zstd" and pg_dump.major < 16:
        # pg_dump -Fd compresses each file itself, and only pg_dump 16+ knows zstd: the default
        # becomes gzip there; zstd asked for by name is a clear error instead.
        named = "backup_compression" in settings.model_fields_set
        if options.compression is not None or named:
            raise UsageError(
                f"the directory format with zstd compression needs pg_dump 16 or newer (this is "
                f"{pg_dump.version}): choose gzip compression or the custom format"
            )
        compression = "gzip"

    with postgres.backup_lock(conn, settings.backup_lock_timeout) as lock_conn:
        server = postgres.server_info(lock_conn)
        postgres.check_client(pg_dump, server.major, server.version)
        catalog.clean_incomplete(primary, conn.dbname, conn.server)
        with catalog.new_backup(primary, name, conn.dbname, conn.server) as reservation:
            backup_id, started = reservation.backup_id, reservation.started
            log.info("backup %s of %s to %s started", backup_id, conn.display(), primary.url)
            snapshot = postgres.begin_snapshot(lock_conn)
            counts: dict[str, int] | None = None
            counter: threading.Thread | None = None
            count_error: list[BaseException] = []
            want_counts = settings.backup_row_counts and not (
                options.schema_only or options.tables or options.exclude_tables
            )
            if want_counts:
                result_box: dict[str, dict[str, int]] = {}

                def count() -> None:
                    try:
                        result_box["counts"] = postgres.table_counts(lock_conn)
                    except BaseException as exc:  # reported after the dump, never lost
                        count_error.append(exc)

                # Counting runs in the exported snapshot's own transaction, alongside pg_dump,
                # so the counts describe exactly the rows the dump holds.
                counter = threading.Thread(target=count, name="pgkeeper-row-counts", daemon=True)
                counter.start()
            argv = _dump_argv(pg_dump, fmt, snapshot, options)
            env = conn.env()
            added: tuple[str, ...] = ()
            if options.tables or options.exclude_tables:
                # A filtered dump must still restore into a new database (dumpfilter.py).
                pg_restore = postgres.find_client("pg_restore", settings.pg_bin_dir)
                planning = [pg_dump.argv0, "--no-password", f"--snapshot={snapshot}",
                            *_filter_argv(options)]  # fmt: skip
                filters = dumpfilter.plan_filters(
                    lock_conn, pg_dump, pg_restore, planning, env, can_add=bool(options.tables)
                )
                argv += [f"--table={pattern}" for pattern in filters.added_tables]
                added = filters.added_names
            level = options.compression_level
            if level is None:
                level = settings.backup_compression_level
            if fmt == "directory":
                objects, size, raw = _dump_directory(
                    primary, backup_id, argv, env, compression, level, jobs, recipients
                )
            else:
                objects, size, raw = _dump_stream(
                    primary, backup_id, fmt, compression, level, settings, argv, env, progress,
                    recipients,
                )  # fmt: skip
            if counter is not None:
                counter.join()
                if count_error:
                    log.warning("row counts skipped: %s", count_error[0])
                else:
                    counts = result_box.get("counts")
            postgres.end_snapshot(lock_conn)
            manifest = Manifest(
                id=backup_id,
                name=name,
                database=conn.dbname,
                server=conn.server,
                server_version=server.version,
                pg_dump_version=pg_dump.version,
                format=fmt,  # type: ignore[arg-type]
                compression=compression,  # type: ignore[arg-type]
                compression_level=level,
                encryption=crypto.encryption_record(recipients),
                objects=objects,
                size=size,
                raw_size=raw,
                started_at=started,
                finished_at=utcnow(),
                trigger=options.trigger,
                flow_run_id=options.flow_run_id,
                options={
                    "schema_only": options.schema_only,
                    "data_only": options.data_only,
                    "tables": list(options.tables),
                    "exclude_tables": list(options.exclude_tables),
                    "added_sequences": list(added),
                    "encoding": server.encoding,
                    "jobs": jobs if fmt == "directory" else 1,
                },
                table_counts=counts,
                keep_until=options.keep_until,
                pgkeeper_version=__version__,
            )
            reservation.commit(manifest)
    log.info("backup %s finished: %d bytes", backup_id, manifest.size)
    return manifest


def _dump_failed(proc: ClientProcess) -> PgkeeperError:
    no_match = dumpfilter.no_match_error(proc.stderr_lines)
    if no_match is not None:
        return no_match
    # pg_dump -Fd writes the files itself: a full disk is its error, and with -j the last
    # line is only "a worker process died unexpectedly", so look through what it said.
    for line in proc.stderr_lines:
        if "no space left on device" in line.lower():
            return StorageFullError(
                f"no space left writing the backup ({line}) (free disk space or move BACKUP_DIR)"
            )
    code = proc.proc.returncode
    if code is not None and code < 0:  # killed: pg_dump had no chance to say anything
        return DumpError(
            f"pg_dump was killed by {signal.Signals(-code).name} (the partial backup was "
            "removed; check the system log, e.g. for the OOM killer, and run the backup again)"
        )
    return DumpError(f"pg_dump failed: {proc.last_error()}")


def _dump_stream(
    storage: Storage,
    backup_id: str,
    fmt: str,
    compression: str,
    level: int | None,
    settings: Settings,
    argv: list[str],
    env: dict[str, str],
    progress: Progress | None,
    recipients: crypto.Recipients | None = None,
) -> tuple[list[StoredObject], int, int]:
    relative = naming.data_name(backup_id, fmt, compression, encrypted=recipients is not None)
    key = naming.object_key(backup_id, relative)
    with ClientProcess(argv, env) as proc, storage.open_write(key) as out:
        stdout = proc.proc.stdout
        assert stdout is not None  # noqa: S101 - ClientProcess pipes stdout by default
        result = compress_stream(
            stdout.read, out, compression, level, settings.backup_compression_threads, progress,
            recipients,
        )  # fmt: skip
        if proc.wait() != 0:
            raise _dump_failed(proc)  # raised inside open_write: the object is never committed
    return (
        [StoredObject(name=relative, size=result.size, sha256=result.sha256)],
        result.size,
        (result.raw_size),
    )


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _dump_directory(
    storage: Storage,
    backup_id: str,
    argv: list[str],
    env: dict[str, str],
    compression: str,
    level: int | None,
    jobs: int,
    recipients: crypto.Recipients | None = None,
) -> tuple[list[StoredObject], int, int]:
    """Directory format: ``pg_dump -Fd -j`` writes pg_dump-compressed files, which we store.

    On a local target pg_dump writes straight into the backup folder under a temporary name
    that is renamed once complete; elsewhere it writes to a temporary folder that is uploaded
    file by file and removed. Encrypted, pg_dump always writes to a private temporary folder
    (0700, in TMPDIR, never on the target), whose files are encrypted one by one into the
    target (``<file>.age``) and then removed: pg_dump -Fd writes files, not a stream, so this is
    the one format whose (compressed) dump is on the backup host's disk while it runs.
    """
    relative = naming.data_name(backup_id, "directory", compression)
    if compression == "zstd":
        compress_arg = f"--compress=zstd:{level}" if level is not None else "--compress=zstd"
    elif compression == "gzip":
        compress_arg = f"--compress={6 if level is None else level}"
    else:
        compress_arg = "--compress=0"
    local_root = storage.local_path(naming.backup_prefix(backup_id))
    if recipients is not None:
        local_root = None  # stage outside the target; only ciphertext goes there
    if local_root is not None:
        local_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{relative}.tmp-", dir=local_root))
    else:
        staging = Path(tempfile.mkdtemp(prefix="pgkeeper-dir-"))
    out_dir = staging / "dump"
    full = [*argv, "--format=directory", f"--jobs={jobs}", compress_arg, f"--file={out_dir}"]
    try:
        with ClientProcess(full, env, stdout=subprocess.DEVNULL) as proc:
            if proc.wait() != 0:
                raise _dump_failed(proc)
        objects: list[StoredObject] = []
        raw = 0
        for path in sorted(out_dir.rglob("*")):
            # pg_dump creates its files under the umask: a backup is private to its owner.
            path.chmod(DIR_MODE if path.is_dir() else FILE_MODE)
            if not path.is_file():
                continue
            inner = path.relative_to(out_dir).as_posix()
            path_size = path.stat().st_size
            name = f"{relative}/{inner}"
            if recipients is not None:
                name += crypto.SUFFIX
                sha, size = _encrypt_file(
                    storage, naming.object_key(backup_id, name), path, recipients
                )
                path.unlink()  # the plaintext file goes as soon as its ciphertext is stored
            elif local_root is not None:
                sha, size = _hash_file(path)
            else:
                sha, size = _upload_file(storage, naming.object_key(backup_id, name), path)
            objects.append(StoredObject(name=name, size=size, sha256=sha))
            raw += path_size
        if local_root is not None:
            out_dir.chmod(DIR_MODE)
            final = local_root / relative
            os.replace(out_dir, final)
            fd = os.open(local_root, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return objects, sum(o.size for o in objects), raw


def _upload_file(storage: Storage, key: str, path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle, storage.open_write(key, size_hint=path.stat().st_size) as out:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _encrypt_file(
    storage: Storage, key: str, path: Path, recipients: crypto.Recipients
) -> tuple[str, int]:
    """Store ``path`` encrypted to ``recipients`` under ``key``; its sha256 and stored size."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle, storage.open_write(key) as out:

        def emit(block: bytes) -> None:
            nonlocal size
            digest.update(block)
            out.write(block)
            size += len(block)

        crypto.encrypt_stream(handle.read, emit, recipients)
    return digest.hexdigest(), size
