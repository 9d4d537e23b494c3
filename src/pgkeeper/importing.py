"""Import an external dump as a backup: detect what it is by content, store it, verify it.

Recognised, by content never by file name: custom (``PGDMP``), tar (``pg_dump -Ft``), a tar of a
directory-format dump, and plain SQL, each raw, gzip or zstd compressed, and a server's globals
(``pg_dumpall --globals-only``), imported as a globals backup (database ``*``). A whole
``pg_dumpall`` (databases included) and anything else is refused with NotADumpError before
anything is listed. Custom, plain and tar dumps are stored
as they came (same bytes, same compression); a directory tar is unpacked into the directory
layout so it restores with ``pg_restore -j``.

Encryption: an age-encrypted custom, plain or tar dump (a pgkeeper download of an encrypted
backup, or ``age -r KEY dump``) is recognised by its header and needs the identity
(BACKUP_ENCRYPTION_IDENTITY_FILE / --identity) to tell what it holds; it is stored as it came
(still encrypted) and verified decrypted. With BACKUP_ENCRYPTION_RECIPIENTS set, an unencrypted
dump is encrypted on its way to the target (each file of a directory tar too): nothing
unencrypted reaches it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import struct
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pgkeeper import __version__, catalog, crypto, naming, plainsql
from pgkeeper.errors import (
    IdentityError,
    NotADumpError,
    StorageError,
    VerificationError,
)
from pgkeeper.manifest import Encryption, Manifest, StoredObject, utcnow
from pgkeeper.pipeline import GZIP_MAGIC, ZSTD_MAGIC, Decoder, Progress
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK
from pgkeeper.verify import check_backup, failed_check

log = logging.getLogger(__name__)

PLAIN_MARKERS = (plainsql.HEADER,)
# pg_dumpall output creates roles and databases and \connects between them: it cannot be
# restored into one database, so it is refused rather than stored as an unrestorable backup.
# Its --globals-only output (roles and tablespaces, no \connect) is a globals backup.
CLUSTER_MARKER = plainsql.CLUSTER_HEADER
_CLUSTER_DATABASES = re.compile(rb"^(?:\\connect\b|-- Databases$)", re.MULTILINE)
_WHOLE_CLUSTER = (
    "this is a pg_dumpall cluster dump with databases, which pgkeeper cannot restore into one "
    "database (import a pg_dump of each database, and pg_dumpall --globals-only for the roles)"
)
_PLAIN_VERSION = re.compile(rb"-- Dumped from database version (\S+)")
_PLAIN_CLIENT = re.compile(rb"-- Dumped by pg_dump version (\S+)")


@dataclass
class DumpKind:
    format: str  # custom | plain | tar | directory
    compression: str  # zstd | gzip | none
    database: str = "unknown"
    kind: str = "dump"  # dump | globals (pg_dumpall --globals-only, database "*")
    server_version: str = ""
    pg_dump_version: str = ""


def _compression_of(head: bytes) -> str:
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return "none"


def parse_archive_header(data: bytes) -> dict[str, str]:
    """Read database name and versions from a custom/tar archive header (``PGDMP...``).

    Layout (pg_backup_archiver.c, ReadHead): magic, version major/minor/rev bytes, int size,
    offset size, format byte, compression (a byte from archive 1.15, else an int), creation
    time as 7 ints, then the database name, server version and pg_dump version as strings.
    Returns {} when the header is not readable.
    """
    try:
        if not data.startswith(b"PGDMP"):
            return {}
        vmaj, vmin, _vrev, int_size = data[5], data[6], data[7], data[8]
        pos = 11  # skip offset size and format byte

        def read_int() -> int:
            nonlocal pos
            sign = data[pos]
            value = int.from_bytes(data[pos + 1 : pos + 1 + int_size], "little")
            pos += 1 + int_size
            return -value if sign else value

        def read_str() -> str:
            nonlocal pos
            length = read_int()
            if length < 0:
                return ""
            text = data[pos : pos + length].decode("utf-8", "replace")
            pos += length
            return text

        if (vmaj, vmin) >= (1, 15):
            pos += 1
        else:
            read_int()
        for _ in range(7):
            read_int()
        return {"database": read_str(), "server_version": read_str(), "pg_dump_version": read_str()}
    except (IndexError, struct.error, ValueError):
        return {}


def detect(head: bytes) -> DumpKind:
    """Tell what a dump is from its first bytes (up to a few MiB); raise NotADumpError."""
    compression = _compression_of(head)
    try:
        decoder = Decoder(compression)
        inner = decoder.decompress(head) if compression != "none" else head
    except VerificationError as exc:
        raise NotADumpError(f"not a PostgreSQL dump: the {compression} data is corrupt") from exc
    if inner.startswith(b"PGDMP"):
        info = parse_archive_header(inner)
        return DumpKind("custom", compression, **info) if info else DumpKind("custom", compression)
    if len(inner) >= 512 and inner[257:262] == b"ustar":
        return _detect_tar(inner, compression)
    text = inner.lstrip(b"\xef\xbb\xbf")[:8192]
    if CLUSTER_MARKER in text:
        if _CLUSTER_DATABASES.search(text):
            raise NotADumpError(_WHOLE_CLUSTER)
        # Globals only, as far as the head shows: verification reads it all (a \connect
        # further on is refused there).
        return DumpKind("plain", compression, database="*", kind="globals")
    if any(marker in text for marker in PLAIN_MARKERS):
        kind = DumpKind("plain", compression)
        if (m := _PLAIN_VERSION.search(text)) is not None:
            kind.server_version = m.group(1).decode()
        if (m := _PLAIN_CLIENT.search(text)) is not None:
            kind.pg_dump_version = m.group(1).decode()
        return kind
    raise NotADumpError(
        "not a PostgreSQL dump (expected pg_dump custom, tar, directory-tar or plain SQL output, "
        "optionally gzip or zstd compressed)"
    )


# The files of a directory-format dump (pg_backup_directory.c): the TOC, one file per table's
# data, and the large objects, each possibly compressed by pg_dump.
_DIR_MEMBER = re.compile(r"(?:toc\.dat|blobs\.toc|(?:blob_)?\d+\.dat(?:\.gz|\.lz4|\.zst)?)")


def _tar_files(inner: bytes) -> list[tarfile.TarInfo]:
    """The regular files whose headers lie within ``inner`` (pax/GNU headers understood)."""
    files: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(inner), mode="r:") as archive:
            files.extend(member for member in archive if member.isfile())
    except (tarfile.TarError, EOFError):
        pass  # the head ends inside the archive: judge the members seen so far
    return files


def _detect_tar(inner: bytes, compression: str) -> DumpKind:
    files = _tar_files(inner)
    if files and files[0].name == "toc.dat":  # pg_dump -Ft writes toc.dat first, at the top
        body = inner[files[0].offset_data : files[0].offset_data + files[0].size]
        return DumpKind("tar", compression, **parse_archive_header(body))
    # A tar of a directory-format dump: pg_dump's own files, all in one folder (or none).
    folders = {Path(f.name).parent.as_posix() for f in files}
    if files and len(folders) == 1 and all(_DIR_MEMBER.fullmatch(Path(f.name).name) for f in files):
        return DumpKind("directory", compression)
    first = files[0].name if files else "no file"
    raise NotADumpError(
        f"not a PostgreSQL dump: a tar archive holding {first!r} "
        "(expected toc.dat from pg_dump -Ft or a directory-format dump folder)"
    )


class _Head:
    """A stream with its first bytes already read, so detection does not need a seek."""

    def __init__(self, head: bytes, read: Callable[[int], bytes]) -> None:
        self._head = head
        self._read = read

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                data, self._head = self._head, b""
                if n < 0:
                    return data + self._read_all()
                return data + (self._read(n - len(data)) if n > len(data) else b"")
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._read_all() if n < 0 else self._read(n)

    def _read_all(self) -> bytes:
        parts = []
        while chunk := self._read(CHUNK):
            parts.append(chunk)
        return b"".join(parts)


def import_stream(
    settings: Settings,
    read: Callable[[int], bytes],
    *,
    name: str = "imported",
    storage: Storage | None = None,
    progress: Progress | None = None,
    max_bytes: int | None = None,
    at: datetime | None = None,
    database: str | None = None,
    source: dict[str, str] | None = None,
) -> Manifest:
    """Import a dump read from ``read`` as a new backup on the primary target.

    ``at``: the backup's own time, for a backup made elsewhere earlier (``folder_import``): its
    id is exactly ``<name>_<at>`` and the manifest's start and finish times are ``at``, so
    listings and retention see its real age. ``database``: what the dump is of, when it does
    not say (plain SQL). ``source``: where it came from (file name, its sha256), recorded in
    the manifest's options (``imported_from``, ``imported_sha256``).

    Raises NotADumpError for anything that is not a dump (or a dump that fails verification),
    StorageError when the target fails, UsageError when it exceeds ``max_bytes``,
    BackupExistsError when the id ``at`` asks for is taken.
    """
    naming.validate_name(name)
    primary = storage if storage is not None else targets(settings)[0]
    head = b""
    while len(head) < 64 * 1024:
        chunk = read(CHUNK)
        if not chunk:
            break
        head += chunk
    if not head:
        raise NotADumpError("not a PostgreSQL dump: the file is empty")
    identity: crypto.Identity | None = None
    recipients: crypto.Recipients | None = None
    encryption = None
    if crypto.is_encrypted(head):
        identity = _import_identity(settings, head)
        while len(head) < 256 * 1024 and (chunk := read(CHUNK)):  # a header and a full chunk
            head += chunk
        kind = detect(_decrypted_head(head, identity))
        if kind.format == "directory":
            raise NotADumpError(
                "an age-encrypted tar of a directory-format dump cannot be imported as it is: "
                "decrypt it first (age -d -i KEY FILE > dump.tar) and import the tar"
            )
        encryption = Encryption(recipients=[])  # an age file of unknown recipients
    else:
        kind = detect(head)
        recipients = crypto.recipients_of(settings)
        encryption = crypto.encryption_record(recipients)
        identity = crypto.configured_identity(settings) if recipients is not None else None
    if database is not None and kind.kind != "globals":  # a server's globals are of no database
        kind.database = database
    stream = _Head(head, _limited(read, max_bytes))
    with catalog.new_backup(primary, name, kind.database, "import", at=at) as reservation:
        backup_id, started = reservation.backup_id, reservation.started
        if kind.format == "directory":
            objects = _store_directory_tar(primary, backup_id, stream, kind, progress, recipients)
        else:
            relative = naming.data_name(
                backup_id, kind.format, kind.compression, kind.kind,
                encrypted=encryption is not None,
            )  # fmt: skip
            objects = [
                _store_object(primary, backup_id, relative, stream.read, progress, recipients)
            ]
        manifest = Manifest(
            id=backup_id,
            name=name,
            kind=kind.kind,  # type: ignore[arg-type]
            database=kind.database or "unknown",
            server="import",
            server_version=kind.server_version,
            pg_dump_version=kind.pg_dump_version,
            format=kind.format,  # type: ignore[arg-type]
            compression="none" if kind.format == "directory" else kind.compression,  # type: ignore[arg-type]
            encryption=encryption,
            objects=objects,
            size=sum(o.size for o in objects),
            started_at=started,
            finished_at=started if at is not None else utcnow(),
            trigger="import",
            options={**source, "imported_at": utcnow().isoformat()} if source else {},
            pgkeeper_version=__version__,
        )
        result = check_backup(primary, manifest, "full", settings.pg_bin_dir, identity=identity)
        bad = failed_check(result)
        if bad is not None and kind.kind == "globals" and "holds databases" in bad.detail:
            raise NotADumpError(_WHOLE_CLUSTER)
        if bad is not None:
            raise NotADumpError(
                f"not a usable PostgreSQL dump: it failed the {bad.name} check ({bad.detail})"
            )
        manifest = manifest.model_copy(update={"verification": result})
        reservation.commit(manifest)
    return manifest


def _limited(read: Callable[[int], bytes], max_bytes: int | None) -> Callable[[int], bytes]:
    if max_bytes is None:
        return read
    seen = 0

    def limited(n: int) -> bytes:
        nonlocal seen
        data = read(n)
        seen += len(data)
        if seen > max_bytes:
            raise NotADumpError(f"the dump is larger than the import limit of {max_bytes} bytes")
        return data

    return limited


def _store_object(
    storage: Storage,
    backup_id: str,
    relative: str,
    read: Callable[[int], bytes],
    progress: Progress | None,
    recipients: crypto.Recipients | None = None,
) -> StoredObject:
    """Store what ``read`` returns under ``relative`` (encrypted to ``recipients``, if any)."""
    digest = hashlib.sha256()
    size = 0
    with storage.open_write(naming.object_key(backup_id, relative)) as out:

        def emit(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)

        def counted(n: int) -> bytes:
            chunk = read(n)
            if progress and chunk:
                progress(len(chunk))
            return chunk

        if recipients is not None:
            crypto.encrypt_stream(counted, emit, recipients)
        else:
            while chunk := counted(CHUNK):
                emit(chunk)
    return StoredObject(name=relative, size=size, sha256=digest.hexdigest())


def _import_identity(settings: Settings, head: bytes) -> crypto.Identity:
    """The identity an age-encrypted import needs; IdentityError when none is configured."""
    if not head.startswith(crypto.AGE_MAGIC):
        raise NotADumpError(
            "this is an ASCII-armored age file: store it binary (age -d ... | age -r KEY > FILE) "
            "or decrypt it, then import it"
        )
    identity = crypto.configured_identity(settings)
    if identity is None:
        raise IdentityError(
            "this dump is encrypted (age): importing it needs its private key to tell what it "
            "holds (set BACKUP_ENCRYPTION_IDENTITY_FILE or pass --identity FILE)"
        )
    return identity


class _HeadEnd(Exception):
    """Enough plaintext to tell what the dump is."""


def _decrypted_head(head: bytes, identity: crypto.Identity) -> bytes:
    """The first plaintext of an age file whose first bytes are ``head`` (IdentityError when
    the identity does not open it)."""
    plain = bytearray()
    fed = [head]

    def read(n: int) -> bytes:
        return fed.pop() if fed else b""

    def collect(data: bytes) -> None:
        plain.extend(data)
        if len(plain) >= 64 * 1024:
            raise _HeadEnd

    try:
        crypto.decrypt_stream(read, collect, identity)
    except _HeadEnd:
        pass
    except VerificationError as exc:
        if not plain:  # a head cut inside a longer file ends in an error after its chunks
            raise NotADumpError(f"not a PostgreSQL dump: {exc}") from None
    return bytes(plain)



def _store_directory_tar(
    storage: Storage,
    backup_id: str,
    stream: _Head,
    kind: DumpKind,
    progress: Progress | None,
    recipients: crypto.Recipients | None = None,
) -> list[StoredObject]:
    folder = naming.data_name(backup_id, "directory", "none")
    source: Any = stream
    if kind.compression == "zstd":
        import zstandard

        source = zstandard.ZstdDecompressor().stream_reader(cast(Any, stream))
    objects: list[StoredObject] = []
    toc_head = bytearray()
    try:
        gzipped = kind.compression == "gzip"
        with tarfile.open(fileobj=source, mode="r|gz" if gzipped else "r|") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                inner = Path(member.name).name  # directory dumps are flat: keep file names only
                if not re.fullmatch(r"[A-Za-z0-9_.-]+", inner):
                    raise NotADumpError(f"not a directory-format dump: odd member {member.name!r}")
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                read: Callable[[int], bytes] = handle.read
                if inner == "toc.dat":  # its header names the database; keep it before storing
                    read = _capture(handle.read, toc_head)
                if recipients is not None:
                    inner += crypto.SUFFIX
                obj = _store_object(
                    storage, backup_id, f"{folder}/{inner}", read, progress, recipients
                )
                objects.append(obj)
    except tarfile.TarError as exc:
        raise NotADumpError(
            f"not a PostgreSQL dump: the tar archive is unreadable ({exc})"
        ) from exc
    toc_name = "/toc.dat" + (crypto.SUFFIX if recipients is not None else "")
    if not any(o.name.endswith(toc_name) for o in objects):
        raise NotADumpError("not a directory-format dump: the tar has no toc.dat")
    info = parse_archive_header(bytes(toc_head))
    kind.database = info.get("database", kind.database)
    kind.server_version = info.get("server_version", "")
    kind.pg_dump_version = info.get("pg_dump_version", "")
    return objects


def _capture(read: Callable[[int], bytes], into: bytearray) -> Callable[[int], bytes]:
    """``read`` that also keeps the first 64 KiB it returns in ``into``."""

    def capturing(n: int) -> bytes:
        data = read(n)
        if len(into) < 64 * 1024:
            into.extend(data[: 64 * 1024 - len(into)])
        return data

    return capturing


def import_file(
    settings: Settings,
    path: Path,
    *,
    name: str = "imported",
    progress: Progress | None = None,
    database: str | None = None,
) -> Manifest:
    """Import a dump file (see ``import_stream``). A directory is refused: tar it first."""
    if path.is_dir():
        raise NotADumpError(
            f"{path} is a folder; import a directory-format dump as a tar "
            f"(tar -cf dump.tar -C {path.parent} {path.name})"
        )
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror} (check the path)") from exc
    with handle:
        return import_stream(settings, handle.read, name=name, progress=progress, database=database)
