"""Base backups for point-in-time recovery: ``pg_basebackup`` of the whole cluster, streamed.

The procedure, in order (each step's safety reason beside it):
  1. check the server archives WAL (``wal_level``, ``archive_mode``) and has no extra
     tablespaces (pg_basebackup can stream only one tablespace as a single tar)
  2. hold the cluster's base-backup lock           -> two base backups never overlap
  3. remove incomplete base backups of this server, claim an id (``pending.json``)
  4. stream ``pg_basebackup -D - -Ft -X none --manifest-checksums=SHA256`` -> zstd -> (age, to
     BACKUP_ENCRYPTION_RECIPIENTS) -> sha256 -> storage, while a second thread reads the same
     tar (in memory, never on disk) and hashes every file
  5. check the files against the ``backup_manifest`` pg_basebackup appended to the tar (its own
     checksum, then every file's size and SHA-256: pg_verifybackup's checks, in the stream)
  6. wait until every WAL segment from the backup's start to its end is in the archive
     -> a listed base backup is always restorable from the archive beside it
  7. write the manifest (``kind: base``, start/stop LSN, timeline, system identifier)
On any failure the partial objects are removed. WAL is not inside the tar (``-X none``):
it comes from the archive, which step 6 proves holds it.

Verification of a stored base backup (``verify``) re-reads the object and runs the same
tar-against-``backup_manifest`` check, plus the WAL check of step 6. An encrypted one is
decrypted first when an identity is at hand; without one (the backup host) only what needs no
key is checked: sha256, the age header and length, and the WAL (recorded ``decrypted: false``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import re
import tarfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pgkeeper import __version__, catalog, crypto, naming, postgres, wal
from pgkeeper.errors import (
    ArchiveError,
    BackupRunningError,
    ConfigError,
    DumpError,
    IdentityError,
    StorageError,
    VerificationError,
)
from pgkeeper.manifest import (
    BaseBackupInfo,
    CheckResult,
    Manifest,
    StoredObject,
    Verification,
    utcnow,
)
from pgkeeper.pipeline import ClientProcess, Decoder, Progress, compress_stream
from pgkeeper.postgres import ConnInfo
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK

log = logging.getLogger(__name__)

CLUSTER = "*"  # the database of a base backup: all of them
FORMAT: Literal["tar"] = "tar"
COMPRESSION: Literal["zstd"] = "zstd"
LEVEL = 2  # the dumps' default: keeps up with the stream on one core (see the benchmarks)
# Files pg_verifybackup does not expect in the manifest (src/bin/pg_verifybackup).
_NOT_IN_MANIFEST = {"backup_manifest", "recovery.signal", "standby.signal"}
_LABEL_START = re.compile(r"START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)")
_LABEL_CHECKPOINT = re.compile(r"CHECKPOINT LOCATION: ([0-9A-F]+/[0-9A-F]+)")
_LOCK_KEY = zlib.crc32(b"pgkeeper base backup") - 2**31


@dataclass
class TarCheck:
    """Reads a base backup's tar stream (fed chunk by chunk from another thread) and hashes
    every file, keeping ``backup_manifest`` and ``backup_label`` themselves."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    manifest: bytes = b""
    label: bytes = b""
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._buffer = b""
        self._done = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pgkeeper-tar-check", daemon=True)
        self._thread.start()

    # the file object tarfile reads from
    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            chunk = self._queue.get()
            if chunk is None:
                self._done = True
            else:
                self._buffer += chunk
        if size < 0:
            size = len(self._buffer)
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data

    def _run(self) -> None:
        try:
            with tarfile.open(fileobj=self, mode="r|") as archive:  # type: ignore[call-overload]
                for member in archive:
                    if not member.isfile():
                        continue
                    handle = archive.extractfile(member)
                    if handle is None:
                        continue
                    digest = hashlib.sha256()
                    keep = member.name in ("backup_manifest", "backup_label")
                    kept: list[bytes] = []
                    while chunk := handle.read(CHUNK):
                        digest.update(chunk)
                        if keep:
                            kept.append(chunk)
                    self.files[member.name] = (member.size, digest.hexdigest())
                    if member.name == "backup_manifest":
                        self.manifest = b"".join(kept)
                    elif member.name == "backup_label":
                        self.label = b"".join(kept)
        except BaseException as exc:  # reported by result(); the stream goes on being stored
            self.error = exc
        finally:
            while not self._done:  # drain, so the feeding side never blocks on a full queue
                if self._queue.get() is None:
                    self._done = True

    def feed(self, chunk: bytes) -> None:
        if chunk:
            self._queue.put(chunk)

    def finish(self) -> None:
        """End the stream and wait for the reader (idempotent)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()


@dataclass(frozen=True)
class ManifestFacts:
    """What a checked ``backup_manifest`` says of the backup."""

    files: int
    timeline: int
    start_lsn: int
    stop_lsn: int


def check_against_manifest(check: TarCheck) -> ManifestFacts:
    """pg_verifybackup's checks on the hashed tar: the manifest's own checksum, every file
    present at its size and SHA-256, no file it does not list. Raises VerificationError."""
    if check.error is not None:
        raise VerificationError(f"the tar stream is unreadable ({check.error})", check="structure")
    raw = check.manifest
    if not raw:
        raise VerificationError("the backup has no backup_manifest", check="backup_manifest")
    marker = raw.rfind(b'"Manifest-Checksum"')
    try:
        doc: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise VerificationError(
            f"backup_manifest is not JSON ({exc})", check="backup_manifest"
        ) from None
    if marker < 0 or hashlib.sha256(raw[:marker]).hexdigest() != doc.get("Manifest-Checksum"):
        raise VerificationError("backup_manifest fails its own checksum", check="backup_manifest")
    listed: set[str] = set()
    for entry in doc.get("Files", []):
        path = str(entry.get("Path", entry.get("Encoded-Path", "")))
        listed.add(path)
        found = check.files.get(path)
        if found is None:
            raise VerificationError(f"{path} is in backup_manifest but not in the backup",
                                    check="backup_manifest")  # fmt: skip
        if found[0] != int(entry.get("Size", -1)):
            raise VerificationError(
                f"{path} has {found[0]} bytes, backup_manifest says {entry.get('Size')}",
                check="backup_manifest",
            )
        algorithm = str(entry.get("Checksum-Algorithm", "NONE")).upper()
        if algorithm == "SHA256" and found[1] != str(entry.get("Checksum", "")).lower():
            raise VerificationError(f"{path} does not match its SHA-256 in backup_manifest",
                                    check="backup_manifest")  # fmt: skip
    extra = sorted(set(check.files) - listed - _NOT_IN_MANIFEST)
    if extra:
        raise VerificationError(
            f"{len(extra)} file(s) not in backup_manifest, e.g. {extra[0]}", check="backup_manifest"
        )
    ranges = doc.get("WAL-Ranges") or []
    if not ranges:
        raise VerificationError("backup_manifest has no WAL range", check="backup_manifest")
    return ManifestFacts(
        files=len(listed),
        timeline=int(ranges[-1]["Timeline"]),
        start_lsn=wal.parse_lsn(str(ranges[0]["Start-LSN"])),
        stop_lsn=wal.parse_lsn(str(ranges[-1]["End-LSN"])),
    )


def required_segments(info: BaseBackupInfo) -> list[str]:
    """The WAL segments a restore of this base backup needs to become consistent."""
    size = info.wal_segment_size
    first = wal.segment_of(wal.parse_lsn(info.start_lsn), size)
    last = wal.segment_of(wal.parse_lsn(info.stop_lsn), size)
    return [wal.segment_name(info.timeline, n, size) for n in range(first, last + 1)]


def missing_wal(storage: Storage, info: BaseBackupInfo) -> list[str]:
    """Segments of ``required_segments`` not archived on ``storage``."""
    archive = wal.list_archive(storage, info.system_identifier)
    return [name for name in required_segments(info) if name not in archive.files]


def _wait_for_wal(storage: Storage, info: BaseBackupInfo, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pause = 0.1
    while True:
        missing = missing_wal(storage, info)
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise ArchiveError(
                f"WAL segment {missing[0]} of this base backup is not in {storage.url} after "
                f"{timeout:.0f}s (BACKUP_BASE_WAL_WAIT): is archive_command "
                "'pgkeeper --env-file FILE wal-push %p' and is it working? "
                "(see 'pgkeeper pitr status' and pg_stat_archiver)"
            )
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


@dataclass(frozen=True)
class _Server:
    version: str
    major: int
    system_id: int
    segment_size: int
    data_directory: str


def _inspect(connection: Any, conn: ConnInfo) -> _Server:
    """Check the server can make restorable base backups; raise ConfigError saying what to set."""
    info = postgres.server_info(connection)

    def setting(name: str) -> str:
        row = connection.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
        return str(row[0]) if row and row[0] is not None else ""

    if setting("wal_level") not in ("replica", "logical"):
        raise ConfigError(
            f"{conn.server} has wal_level={setting('wal_level')}: base backups need "
            "wal_level = replica (postgresql.conf, then restart the server)"
        )
    if setting("archive_mode") not in ("on", "always"):
        raise ConfigError(
            f"{conn.server} does not archive WAL (archive_mode={setting('archive_mode')}): set "
            "archive_mode = on and archive_command = 'pgkeeper --env-file FILE wal-push %p' "
            "(see docs/pitr.md)"
        )
    row = connection.execute(
        "SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')"
    ).fetchone()
    if row and int(row[0]) > 0:
        raise ConfigError(
            f"{conn.server} has {row[0]} extra tablespace(s): pgkeeper's base backups stream "
            "one tablespace (pg_basebackup -D -); move them to pg_default or use pgBackRest"
        )
    row = connection.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    size = connection.execute(
        "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'"
    ).fetchone()
    return _Server(
        info.version,
        info.major,
        int(row[0]) if row else 0,
        int(size[0]) if size else wal.DEFAULT_SEGMENT_SIZE,
        setting("data_directory"),
    )


def _lock(connection: Any, conn: ConnInfo) -> None:
    row = connection.execute(
        "SELECT pg_try_advisory_lock(%s, %s)", (postgres.LOCK_CLASS, _LOCK_KEY)
    ).fetchone()
    if not (row and row[0]):
        raise BackupRunningError(
            f"another base backup of {conn.server} is running (wait for it to finish)"
        )


def _label_facts(label: bytes) -> tuple[str, str]:
    """(start WAL segment, checkpoint LSN) from backup_label."""
    text = label.decode("utf-8", "replace")
    start = _LABEL_START.search(text)
    checkpoint = _LABEL_CHECKPOINT.search(text)
    if start is None:
        raise VerificationError("backup_label has no START WAL LOCATION", check="structure")
    return start.group(2), checkpoint.group(1) if checkpoint else ""


def run_base_backup(
    settings: Settings,
    *,
    storages: list[Storage] | None = None,
    name: str | None = None,
    trigger: str = "manual",
    flow_run_id: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Take one base backup onto the primary target; see the module docstring.

    Raises ConfigError when the server cannot make restorable base backups, the connection
    errors of ``postgres.connect``, BackupRunningError, ClientVersionError, DumpError when
    pg_basebackup fails, VerificationError when its output does not match its own
    backup_manifest, ArchiveError when its WAL does not reach the archive, StorageError.
    """
    recipients = crypto.recipients_of(settings)  # a bad key list fails before anything runs
    storages = storages if storages is not None else targets(settings)
    primary = storages[0]
    backup_name = naming.validate_name(name or settings.backup_base_name)
    conn = ConnInfo.parse(settings.require_database_url())
    client = postgres.find_client("pg_basebackup", settings.pg_bin_dir)
    connection = postgres.connect(conn)
    try:
        server = _inspect(connection, conn)
        postgres.check_client(client, server.major, server.version)
        _lock(connection, conn)
        catalog.clean_incomplete(primary, CLUSTER, conn.server)
        backup_id, started = catalog.reserve_id(primary, backup_name, CLUSTER, conn.server)
        log.info("base backup %s of %s to %s started", backup_id, conn.server, primary.url)
        try:
            manifest = _take(
                settings, primary, client, conn, server, backup_id, backup_name, started, progress,
                recipients,
            )  # fmt: skip
            manifest = manifest.model_copy(update={"trigger": trigger, "flow_run_id": flow_run_id})
            catalog.write_manifest(primary, manifest)
        except BaseException:
            _discard(primary, backup_id)
            raise
        catalog.clear_pending(primary, backup_id)
    finally:
        connection.close()
    log.info("base backup %s finished: %d bytes", backup_id, manifest.size)
    return manifest


def _take(
    settings: Settings,
    primary: Storage,
    client: postgres.Client,
    conn: ConnInfo,
    server: _Server,
    backup_id: str,
    backup_name: str,
    started: datetime,
    progress: Progress | None,
    recipients: crypto.Recipients | None = None,
) -> Manifest:
    relative = naming.data_name(backup_id, FORMAT, COMPRESSION, encrypted=recipients is not None)
    argv = [
        client.argv0,
        "--pgdata=-",
        "--format=tar",
        "--wal-method=none",
        f"--checkpoint={settings.backup_base_checkpoint}",
        "--manifest-checksums=SHA256",
        f"--label=pgkeeper {backup_id}",
        "--no-password",
    ]
    check = TarCheck()
    try:
        with ClientProcess(argv, conn.env()) as proc:
            stdout = proc.proc.stdout
            assert stdout is not None  # noqa: S101 - ClientProcess pipes stdout

            def read(size: int) -> bytes:
                chunk = stdout.read(size)
                check.feed(chunk)
                return chunk

            with primary.open_write(naming.object_key(backup_id, relative)) as out:
                result = compress_stream(
                    read, out, COMPRESSION, LEVEL, settings.backup_compression_threads, progress,
                    recipients,
                )  # fmt: skip
                if proc.wait() != 0:
                    raise DumpError(f"pg_basebackup failed: {proc.last_error()}")
                check.finish()
                facts = check_against_manifest(check)  # raised inside: nothing is committed
    finally:
        check.finish()  # idempotent: the reading thread never outlives a failed stream
    start_wal, checkpoint = _label_facts(check.label)
    stopped = utcnow()
    info = BaseBackupInfo(
        system_identifier=server.system_id,
        timeline=facts.timeline,
        start_lsn=wal.format_lsn(facts.start_lsn),
        stop_lsn=wal.format_lsn(facts.stop_lsn),
        start_wal=start_wal,
        stop_wal=wal.segment_name(
            facts.timeline, wal.segment_of(facts.stop_lsn, server.segment_size), server.segment_size
        ),
        wal_segment_size=server.segment_size,
        checkpoint_lsn=checkpoint,
        stopped_at=stopped,
        files=facts.files,
        data_directory=server.data_directory,
    )
    _wait_for_wal(primary, info, settings.backup_base_wal_wait)
    return Manifest(
        kind="base",
        id=backup_id,
        name=backup_name,
        database=CLUSTER,
        server=conn.server,
        server_version=server.version,
        pg_dump_version=client.version,
        format=FORMAT,
        compression=COMPRESSION,
        compression_level=LEVEL,
        objects=[StoredObject(name=relative, size=result.size, sha256=result.sha256)],
        size=result.size,
        raw_size=result.raw_size,
        started_at=started,
        finished_at=utcnow(),
        options={"checkpoint": settings.backup_base_checkpoint, "wal_method": "none"},
        pgkeeper_version=__version__,
        base=info,
        encryption=crypto.encryption_record(recipients),
    )


def _discard(storage: Storage, backup_id: str) -> None:
    """Best-effort removal of a failed base backup (the next run finishes the job)."""
    try:
        for item in catalog.backup_objects(storage, backup_id):
            if item.key != naming.pending_key(backup_id):
                storage.delete(item.key)
        storage.delete(naming.pending_key(backup_id))
    except StorageError as exc:
        log.warning("could not remove the partial base backup %s: %s", backup_id, exc)


def verify_base(
    storage: Storage,
    manifest: Manifest,
    level: str = "full",
    progress: Progress | None = None,
    identity: crypto.Identity | None = None,
) -> Verification:
    """Re-read a stored base backup: objects, sha256, the zstd stream, the tar against its
    backup_manifest (full level), and its WAL in the archive. An encrypted one is decrypted
    with ``identity``; without it, its age header and length are checked instead of the
    stream. Raises nothing for bad data; IdentityError when ``identity`` cannot open it."""
    checks: list[CheckResult] = []
    encrypted = manifest.encryption is not None
    if not encrypted:
        identity = None
    decrypted = (identity is not None) if encrypted else None
    obj = manifest.objects[0]
    key = naming.object_key(manifest.id, obj.name)
    info = storage.stat(key)
    if info is None or info.size != obj.size:
        detail = "missing" if info is None else f"{info.size} bytes, manifest says {obj.size}"
        checks.append(CheckResult(name="objects", ok=False, detail=f"{obj.name}: {detail}"))
        return Verification(ok=False, at=utcnow(), level=_level(level), checks=checks,
                            decrypted=decrypted)  # fmt: skip
    checks.append(CheckResult(name="objects", ok=True, detail="1"))
    digest = hashlib.sha256()
    shape = crypto.AgeShape() if encrypted and identity is None else None
    decoder = Decoder(manifest.compression)
    check = TarCheck() if level == "full" and shape is None else None
    broken: VerificationError | None = None
    try:
        with storage.open_read(key) as src:

            def stored(n: int) -> bytes:
                chunk = src.read(CHUNK)
                digest.update(chunk)
                if shape is not None:
                    shape.feed(chunk)
                if progress and chunk:
                    progress(len(chunk))
                return chunk

            broken = _decode_into(stored, decoder, check, identity)
            while stored(CHUNK):  # what decoding left unread, for the checksum
                pass
    except StorageError as exc:
        checks.append(CheckResult(name="objects", ok=False, detail=exc.message))
    finally:
        if check is not None:
            check.finish()
    if any(not c.ok for c in checks):
        return Verification(ok=False, at=utcnow(), level=_level(level), checks=checks,
                            decrypted=decrypted)  # fmt: skip
    if digest.hexdigest() != obj.sha256:
        checks.append(CheckResult(name="checksum", ok=False, detail=f"{obj.name} != manifest"))
        return Verification(ok=False, at=utcnow(), level=_level(level), checks=checks,
                            decrypted=decrypted)  # fmt: skip
    checks.append(CheckResult(name="checksum", ok=True, detail=obj.sha256))
    if shape is not None:
        try:
            shape.check(manifest.encryption.recipients if manifest.encryption else None)
            checks.append(CheckResult(name="encryption", ok=True,
                                      detail=f"{obj.name}: age header and length"))  # fmt: skip
            checks.append(CheckResult(name="decryption", ok=True, detail=NOT_DECRYPTED))
        except VerificationError as exc:
            checks.append(CheckResult(name="encryption", ok=False, detail=f"{obj.name}: {exc}"))
    elif broken is not None:
        checks.append(CheckResult(name=broken.check or "compression", ok=False,
                                  detail=str(broken)))  # fmt: skip
    else:
        if identity is not None:
            checks.append(CheckResult(name="decryption", ok=True, detail="decrypted end to end"))
        if check is not None:
            checks.append(CheckResult(name="compression", ok=True, detail="decoded end to end"))
    if check is not None and shape is None and broken is None:
        try:
            facts = check_against_manifest(check)
            checks.append(
                CheckResult(
                    name="backup_manifest",
                    ok=True,
                    detail=f"{facts.files} files match their size and SHA-256",
                )
            )
        except VerificationError as exc:
            checks.append(CheckResult(name=exc.check or "backup_manifest", ok=False,
                                      detail=str(exc)))  # fmt: skip
    if manifest.base is not None:
        try:
            missing = missing_wal(storage, manifest.base)
        except StorageError as exc:
            missing = [f"(archive unreadable: {exc.message})"]
        if missing:
            detail = f"segment {missing[0]} is not archived here"
            checks.append(CheckResult(name="wal", ok=False, detail=detail))
        else:
            checks.append(CheckResult(
                name="wal", ok=True,
                detail=f"{manifest.base.start_wal} .. {manifest.base.stop_wal} archived",
            ))  # fmt: skip
    ok = all(c.ok for c in checks)
    return Verification(ok=ok, at=utcnow(), level=_level(level), checks=checks,
                        decrypted=decrypted)  # fmt: skip


NOT_DECRYPTED = (
    "not decrypted: no identity here (BACKUP_ENCRYPTION_IDENTITY_FILE), so the tar was not "
    "checked against its backup_manifest; verify where the identity is to check it fully"
)


def _decode_into(
    stored: Callable[[int], bytes],
    decoder: Decoder,
    check: TarCheck | None,
    identity: crypto.Identity | None,
) -> VerificationError | None:
    """Read the stored stream through ``stored`` (decrypting it with ``identity``) and feed
    the decoded tar to ``check`` (None: only read, for the checksum); return what was found
    broken. Stops at the first damage: the caller reads the rest for the checksum. Raises
    IdentityError when ``identity`` cannot open the file, StorageError from ``stored``."""
    if check is None and identity is None:
        return None
    plain = crypto.DecryptingReader(stored, identity) if identity is not None else None
    read = plain.read if plain is not None else stored
    try:
        while chunk := read(CHUNK):
            if check is not None:
                check.feed(decoder.decompress(chunk))
        if check is not None:
            decoder.finish()
    except IdentityError:
        raise
    except VerificationError as exc:
        return exc
    finally:
        if plain is not None:
            plain.close()  # stops decrypting: the rest is read by the caller, in this thread
    return None


def _level(level: str) -> Any:
    return "full" if level == "full" else "quick"
