"""The WAL archive of point-in-time recovery: push, fetch, list, and the arithmetic of WAL names.

Keys are made by ``naming`` (``wal/<system id>/<timeline>/<name>-<sha256>.zst``, plus ``.age``
when encrypted); the sha256 is of the WAL file's own (plaintext) bytes, so it is recorded in
the same atomic step that stores the object, and it is what makes a repeated push recognisable
without the private key: age encryption is randomised, two encryptions of one file differ.

push (``archive_command``)
    Hash and compress the file in one pass into a spool in memory (WAL compresses 5-30x), then
    store it with one atomic write on the primary target. A file already archived under that
    name with the same checksum is a success (PostgreSQL retries a push whose answer it lost);
    a different checksum under that name is refused with WalConflictError and nothing is
    written: an archived file is never replaced by other bytes (invariant 12). Segments are
    checked against their own first page (system identifier, segment size, and the page
    address the name implies), so a recycled or foreign file is never archived under the
    wrong name.
fetch (``restore_command``)
    From the first target holding a copy whose bytes decode to its checksum: decompress to a
    temporary name beside the destination, check the sha256, rename. A file in no target
    raises WalMissingError (recovery's normal "end of archive"); a missing segment while the
    same timeline has archived segments on both sides of it, or a file whose every copy is
    damaged, raises WalGapError: recovery must stop there rather than end early and promote.

Encryption (BACKUP_ENCRYPTION_RECIPIENTS, invariant 10)
    ``push`` with ``recipients``: WAL bytes -> sha256 -> zstd -> age -> spool -> storage; the
    object's key ends in ``.age`` and the stored bytes' own sha256 goes with it as metadata
    (S3 and GCS check it on upload and keep it). Nothing that can decrypt is needed to push,
    to refuse other bytes, or to copy offsite (``copy`` checks an encrypted copy's age header,
    length and stored sha256). ``fetch`` decrypts with an identity, then decompresses and checks
    the plaintext's sha256 against the name; an encrypted copy without an identity, or with one
    that is not a recipient, raises IdentityError at once (recovery must stop, not end). One
    archive may hold both kinds (encryption turned on or off on the way): each file is read as
    its key says.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from pgkeeper import crypto, naming
from pgkeeper.errors import (
    ArchiveError,
    IdentityError,
    StorageError,
    UsageError,
    VerificationError,
    WalConflictError,
    WalGapError,
    WalMissingError,
)
from pgkeeper.storage.base import CHUNK, Storage

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
DEFAULT_LEVEL = 1  # zstd: as fast as level 3 on WAL here and cheaper on incompressible pages
SPOOL_IN_MEMORY = 64 * 1024 * 1024  # compressed bytes held in memory before spilling to disk

# XLogLongPageHeaderData (src/include/access/xlog_internal.h), little-endian on every platform
# PostgreSQL archives from here: magic u16, info u16, timeline u32, pageaddr u64, rem_len u32,
# 4 bytes padding, system identifier u64, segment size u32, block size u32.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
_XLP_LONG_HEADER = 0x0002


# --- LSNs and names ------------------------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """``0/2000028`` -> 33554472; raise UsageError for anything else."""
    match = re.fullmatch(r"\s*([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*", text or "")
    if match is None:
        raise UsageError(f"{text!r} is not an LSN (use the form 0/3000060)")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segments_per_xlogid(segment_size: int) -> int:
    return 0x100000000 // segment_size


def segment_number(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment number of a segment-like WAL file name (segment, partial, backup file)."""
    naming.validate_wal_name(name)
    if name.endswith(".history"):
        raise ValueError(f"{name} is a history file, not a segment")
    return int(name[8:16], 16) * segments_per_xlogid(segment_size) + int(name[16:24], 16)


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per = segments_per_xlogid(segment_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def segment_of(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return lsn // segment_size


def timeline_of(name: str) -> int:
    return int(naming.wal_timeline(name), 16)


def kind_of(name: str) -> str:
    """``segment``, ``partial``, ``backup`` (a backup history file) or ``history``."""
    match = naming.WAL_NAME_RE.match(naming.validate_wal_name(name))
    assert match is not None  # noqa: S101 - validate_wal_name accepted it
    if match.group("history"):
        return "history"
    suffix = match.group("suffix") or ""
    if suffix == ".partial":
        return "partial"
    return "backup" if suffix else "segment"


@dataclass(frozen=True)
class SegmentHeader:
    """What a segment's first page says about it."""

    system_id: int
    timeline: int
    page_address: int
    segment_size: int


def read_header(data: bytes) -> SegmentHeader | None:
    """The long page header at the start of a WAL segment, or None if ``data`` has none."""
    if len(data) < _LONG_HEADER.size:
        return None
    _magic, info, timeline, pageaddr, _rem, system_id, seg_size, _blcksz = _LONG_HEADER.unpack(
        data[: _LONG_HEADER.size]
    )
    if not info & _XLP_LONG_HEADER or seg_size < 1 << 20 or seg_size & (seg_size - 1):
        return None
    return SegmentHeader(system_id, timeline, pageaddr, seg_size)


def check_segment(name: str, data: bytes, where: str) -> SegmentHeader:
    """The header of segment ``name`` (first bytes ``data``); raise ArchiveError unless it is
    the segment that name says: right timeline, and its first page at the name's address."""
    header = read_header(data)
    if header is None:
        raise ArchiveError(
            f"{where} does not start with a WAL segment header: refusing to archive it as {name}"
        )
    expected = segment_number(name, header.segment_size) * header.segment_size
    if header.page_address != expected or header.timeline != timeline_of(name):
        raise ArchiveError(
            f"{where} holds WAL of timeline {header.timeline} at "
            f"{format_lsn(header.page_address)}, not segment {name}: refusing to archive it "
            "under that name (was the file recycled or copied?)"
        )
    return header


def system_id_from_control(data_dir: Path) -> int:
    """The system identifier from ``global/pg_control`` (its first 8 bytes in every version)."""
    control = data_dir / "global" / "pg_control"
    try:
        with control.open("rb") as handle:
            raw = handle.read(8)
    except OSError as exc:
        raise UsageError(
            f"cannot read {control} for the system identifier ({exc.strerror}); pass --system-id"
        ) from None
    if len(raw) != 8:
        raise UsageError(f"{control} is too short to hold a system identifier; pass --system-id")
    return int(struct.unpack("<Q", raw)[0])


# --- push ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    sha256: str  # of the WAL file's bytes (the name's checksum)
    size: int  # bytes of the WAL file
    stored: int  # bytes stored (compressed, encrypted when ``key`` ends in .age)
    already: bool  # the same bytes were archived before
    stored_sha256: str = ""  # of the stored bytes, when this push stored them


@dataclass
class _Encoded:
    """A WAL file hashed, compressed (and encrypted) into a spool, ready to store."""

    sha256: str  # of the WAL file's bytes
    size: int
    spool: BinaryIO  # rewound
    stored_sha256: str  # of the spool's bytes
    stored: int


def _encode(src: BinaryIO, level: int, recipients: crypto.Recipients | None = None) -> _Encoded:
    """Hash the WAL file's bytes and compress them in one pass, into a spool; with
    ``recipients`` the compressed stream goes through age on its way in, so the spool (in
    memory, or a private temporary file past SPOOL_IN_MEMORY) never holds plaintext when
    encryption is on."""
    digest = hashlib.sha256()
    stored = hashlib.sha256()
    size = 0
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115 - returned
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()

    def compressed() -> Iterator[bytes]:
        nonlocal size
        while chunk := src.read(CHUNK * 4):
            digest.update(chunk)
            size += len(chunk)
            yield compressor.compress(chunk)
        yield compressor.flush()

    def keep(block: bytes) -> None:
        stored.update(block)
        spool.write(block)

    try:
        if recipients is None:
            for block in compressed():
                keep(block)
        else:
            crypto.encrypt_stream(crypto.blocks_reader(compressed()), keep, recipients)
        length = spool.tell()
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return _Encoded(digest.hexdigest(), size, spool, stored.hexdigest(), length)  # type: ignore[arg-type]


def archived_copies(storage: Storage, system_id: int, name: str) -> dict[str, str]:
    """sha256 -> key of every stored copy of WAL file ``name`` on one target."""
    copies: dict[str, str] = {}
    for info in storage.list(naming.wal_name_prefix(system_id, name)):
        parsed = naming.parse_wal_key(info.key)
        if parsed is not None and parsed[1] == name:
            copies[parsed[2]] = info.key
    return copies


def push(
    storage: Storage,
    path: Path,
    *,
    system_id: int | None = None,
    level: int = DEFAULT_LEVEL,
    recipients: crypto.Recipients | None = None,
) -> PushResult:
    """Archive one WAL file on ``storage`` (encrypted to ``recipients`` when given); see the
    module docstring.

    ``system_id`` is required for history and backup files (segments carry their own); raises
    UsageError for a bad name, ArchiveError for a file that is not the segment its name says,
    WalConflictError when other bytes are archived under that name, StorageError subclasses
    when the target fails (then nothing is visible under the key).
    """
    name = naming.validate_wal_name(path.name)
    kind = kind_of(name)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ArchiveError(f"cannot read WAL file {path}: {exc.strerror}") from None
    with handle:
        before = os.fstat(handle.fileno())
        if kind in ("segment", "partial"):
            header = check_segment(name, handle.read(_LONG_HEADER.size), str(path))
            if system_id is not None and system_id != header.system_id:
                raise ArchiveError(
                    f"{path} belongs to database system {header.system_id}, not {system_id}"
                )
            system_id = header.system_id
            handle.seek(0)
        elif system_id is None:
            raise UsageError(f"archiving {name} needs the system identifier (pass --system-id)")
        encoded = _encode(handle, level, recipients)
        after = os.fstat(handle.fileno())
    sha, size, spool, stored = encoded.sha256, encoded.size, encoded.spool, encoded.stored
    with spool:
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            raise ArchiveError(f"{path} changed while it was read: not archived (retry)")
        copies = archived_copies(storage, system_id, name)
        key = naming.wal_key(system_id, name, sha, encrypted=recipients is not None)
        if sha in copies:
            # The same bytes, archived before (encrypted or not: a file archived before
            # encryption was turned on stays as it was stored, and still restores).
            return PushResult(name, copies[sha], sha, size, stored, already=True)
        if copies:
            raise WalConflictError(
                f"WAL file {name} is already archived in {storage.url} with other contents "
                f"(sha256 {next(iter(copies))[:12]}..., this one {sha[:12]}...): it is never "
                "replaced; is a second server archiving with the same system identifier? "
                "(see 'pgkeeper pitr status')"
            )
        # An encrypted object carries its stored bytes' sha256 (the backend checks it on
        # upload), so an offsite copy can be proven without the key that decrypts it.
        metadata = {"sha256": encoded.stored_sha256} if recipients is not None else None
        with storage.open_write(key, size_hint=stored, metadata=metadata) as out:
            while chunk := spool.read(CHUNK):
                out.write(chunk)
    return PushResult(name, key, sha, size, stored, already=False,
                      stored_sha256=encoded.stored_sha256)  # fmt: skip


# --- fetch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    name: str
    source: str  # the URL of the target it came from
    sha256: str
    size: int


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


def _decode(
    src: BinaryIO, out: _Writable, identity: crypto.Identity | None = None
) -> tuple[str, int]:
    """Decompress a stored WAL object into ``out`` (decrypting it first with ``identity`` when
    one is given: the caller knows from the key that it is encrypted); return (sha256, size)
    of what was written.

    Raises zstandard.ZstdError or VerificationError for a damaged stream, IdentityError when
    no key of ``identity`` is a recipient (before any plaintext)."""
    digest = hashlib.sha256()
    size = 0
    if identity is None:
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)
        while chunk := reader.read(CHUNK * 4):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
        return digest.hexdigest(), size
    from pgkeeper.pipeline import Decoder  # the dumps' zstd decoder: frames, truncation

    decoder = Decoder("zstd")

    def plain(block: bytes) -> None:
        nonlocal size
        data = decoder.decompress(block)
        digest.update(data)
        out.write(data)
        size += len(data)

    crypto.decrypt_stream(src.read, plain, identity)
    decoder.finish()
    return digest.hexdigest(), size


IdentitySource = crypto.Identity | Callable[[], crypto.Identity | None] | None
"""An identity, or a function that loads it the first time an encrypted file needs it (a
restore_command of an archive without encrypted WAL then never reads the key file)."""


def _resolve(identity: IdentitySource) -> crypto.Identity | None:
    if identity is None or isinstance(identity, crypto.Identity):
        return identity
    return identity()


def _identity_refused(name: str, url: str, identity: crypto.Identity | None) -> IdentityError:
    """The one-line error for an encrypted WAL file the identity at hand cannot open."""
    if identity is None:
        return IdentityError(
            f"WAL file {name} in {url} is encrypted (age): fetching it needs the private key "
            "(set BACKUP_ENCRYPTION_IDENTITY_FILE to a key file the server's user can read)"
        )
    return IdentityError(
        f"WAL file {name} in {url} is encrypted (age) and the identity {identity.describe()} "
        "cannot decrypt it: none of its keys is a recipient (use the private key of one of "
        "BACKUP_ENCRYPTION_RECIPIENTS)"
    )


def fetch(
    storages: Sequence[Storage],
    name: str,
    dest: Path,
    *,
    system_id: int,
    identity: IdentitySource = None,
) -> FetchResult:
    """Restore WAL file ``name`` to ``dest`` from the first target with a good copy, decrypting
    an encrypted copy with ``identity`` (loaded then, if it is a loader).

    Raises WalMissingError when no target has it (the normal end of the archive), WalGapError
    when it is missing inside a timeline's archived range or every copy is damaged,
    WalConflictError when a target holds two different copies under the name, IdentityError
    when a copy is encrypted and ``identity`` is None or cannot open it (nothing is written).
    """
    naming.validate_wal_name(name)
    problems: list[str] = []
    for storage in storages:
        try:
            copies = archived_copies(storage, system_id, name)
        except StorageError as exc:
            problems.append(f"{storage.url}: {exc.message}")
            continue
        if len(copies) > 1:
            raise WalConflictError(
                f"{storage.url} holds {len(copies)} different copies of WAL file {name}: "
                "two servers archived under one system identifier; resolve it by hand "
                "(see 'pgkeeper pitr status')"
            )
        for sha, key in copies.items():
            problem = _fetch_copy(storage, key, sha, dest, identity)
            if problem is None:
                return FetchResult(name, storage.url, sha, dest.stat().st_size)
            problems.append(f"{storage.url}: {problem}")
    if problems:
        raise WalGapError(
            f"WAL file {name} could not be restored from any target ({'; '.join(problems)}): "
            "recovery stops here rather than end early"
        )
    _raise_if_gap(storages, system_id, name)
    raise WalMissingError(f"WAL file {name} is not in the archive")


def _fetch_copy(
    storage: Storage, key: str, sha: str, dest: Path, source: IdentitySource = None
) -> str | None:
    """Fetch one copy to ``dest`` (atomically); None when good, else what was wrong. Raises
    IdentityError for an encrypted copy that the identity (None: none at hand) cannot open,
    or when the identity file cannot be loaded."""
    parsed = naming.parse_wal_key(key)
    name = parsed[1] if parsed else key
    encrypted = naming.wal_key_encrypted(key)
    identity = _resolve(source) if encrypted else None
    if encrypted and identity is None:
        raise _identity_refused(name, storage.url, None)
    fd, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".pgkeeper", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, storage.open_read(key) as src:
            got, _size = _decode(src, out, identity)
            out.flush()
            os.fsync(out.fileno())
        if got != sha:
            return f"the stored copy decodes to sha256 {got[:12]}..., not {sha[:12]}..."
        os.replace(temp, dest)
        temp = ""
        return None
    except IdentityError:
        raise _identity_refused(name, storage.url, identity) from None
    except (zstandard.ZstdError, VerificationError) as exc:
        return f"the stored copy is damaged ({exc})"
    except StorageError as exc:
        return exc.message
    finally:
        if temp:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def _raise_if_gap(storages: Sequence[Storage], system_id: int, name: str) -> None:
    """Raise WalGapError when segment ``name`` is missing while its timeline has archived
    segments both before and after it (so recovery would otherwise stop short and promote)."""
    if kind_of(name) != "segment":
        return
    timeline = naming.wal_timeline(name)
    before = after = False
    for storage in storages:
        try:
            infos = storage.list(naming.wal_timeline_prefix(system_id, timeline))
            for info in infos:
                parsed = naming.parse_wal_key(info.key)
                if parsed is None or kind_of(parsed[1]) not in ("segment", "partial"):
                    continue
                other = parsed[1][:24]
                before = before or other < name
                after = after or other > name
        except StorageError:
            continue
        if before and after:
            raise WalGapError(
                f"WAL segment {name} is missing from the archive although later WAL of "
                f"timeline {timeline} is there (a gap): recovery stops here; restore to a point "
                "before it (see 'pgkeeper pitr status')"
            )


class _HashSink:
    """A write-only sink that only hashes (to check a copy without writing it anywhere)."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)


def copy(source: Storage, dest: Storage, key: str, stored_sha256: str | None = None) -> bool:
    """Copy one archived WAL object from ``source`` to ``dest``; False when ``dest`` already
    holds these bytes under that name.

    The copy is proven before it is written: the stored bytes are read into a spool and
    decoded, and they must decode to the checksum in the name. An encrypted object cannot be
    decoded here (the backup host holds no key): its age header and length are checked, and
    its bytes against their sha256 as ``stored_sha256`` (what the pusher stored) or the
    source's provider recorded it; the destination is given that sha256 to check on upload.
    Raises WalConflictError when ``dest`` holds other bytes under the name, ArchiveError for a
    damaged source copy, StorageError subclasses when a target fails.
    """
    parsed = naming.parse_wal_key(key)
    if parsed is None:
        raise ArchiveError(f"{key!r} is not a WAL archive key")
    system_id, name, sha = parsed
    there = archived_copies(dest, system_id, name)
    if sha in there:
        return False
    if there:
        raise WalConflictError(
            f"WAL file {name} is archived in {dest.url} with other contents than in "
            f"{source.url}: it is never replaced (see 'pgkeeper pitr status')"
        )
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        stored = hashlib.sha256()
        with source.open_read(key) as src:
            while chunk := src.read(CHUNK):
                stored.update(chunk)
                spool.write(chunk)
        size = spool.tell()
        spool.seek(0)
        if naming.wal_key_encrypted(key):
            _check_sealed(source, key, name, spool, stored.hexdigest(), stored_sha256)
        else:
            try:
                got, _ = _decode(spool, _HashSink())  # type: ignore[arg-type]
            except zstandard.ZstdError as exc:
                raise ArchiveError(
                    f"WAL file {name} in {source.url} is damaged ({exc})"
                ) from None
            if got != sha:
                raise ArchiveError(
                    f"WAL file {name} in {source.url} decodes to sha256 {got[:12]}..., not "
                    f"{sha[:12]}...: it is damaged; not copied"
                )
        spool.seek(0)
        with dest.open_write(key, size_hint=size, metadata={"sha256": stored.hexdigest()}) as out:
            while chunk := spool.read(CHUNK):
                out.write(chunk)
    return True


def _check_sealed(
    source: Storage,
    key: str,
    name: str,
    spool: _Readable,
    got: str,
    expected: str | None,
) -> None:
    """What can be proven of an encrypted WAL object without its key: an age header, a
    length age can produce, and (when known) the stored bytes' sha256. Raises ArchiveError."""
    shape = crypto.AgeShape()
    while chunk := spool.read(CHUNK):
        shape.feed(chunk)
    try:
        shape.check(None)
    except VerificationError as exc:
        raise ArchiveError(f"WAL file {name} in {source.url} is damaged ({exc})") from None
    if expected is None:
        expected = source.remote_sha256(key)
    if expected is not None and expected != got:
        raise ArchiveError(
            f"WAL file {name} in {source.url} has sha256 {got[:12]}..., stored as "
            f"{expected[:12]}...: it is damaged; not copied"
        )


# --- the archive as a whole --------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedFile:
    name: str
    sha256: str  # of the WAL file's bytes
    key: str
    size: int
    modified: datetime | None

    @property
    def encrypted(self) -> bool:
        return naming.wal_key_encrypted(self.key)


@dataclass
class Archive:
    """What one target holds of one system's WAL, by file name."""

    system_id: int
    url: str
    files: dict[str, list[ArchivedFile]] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)  # keys under the prefix that are not WAL

    def segments(self, timeline: int | None = None) -> list[str]:
        """Names of full segments (of one timeline), in order."""
        return sorted(
            n
            for n in self.files
            if kind_of(n) == "segment" and (timeline is None or timeline_of(n) == timeline)
        )

    def timelines(self) -> list[int]:
        found = {timeline_of(n) for n in self.files}
        return sorted(found)

    def histories(self) -> list[str]:
        return sorted(n for n in self.files if kind_of(n) == "history")

    def conflicts(self) -> list[str]:
        return sorted(n for n, copies in self.files.items() if len(copies) > 1)

    def encrypted(self) -> int:
        """How many archived files are encrypted (age)."""
        return sum(f.encrypted for copies in self.files.values() for f in copies)

    def newest(self, timeline: int) -> ArchivedFile | None:
        names = self.segments(timeline)
        return self.files[names[-1]][0] if names else None


def list_systems(storage: Storage) -> list[int]:
    """System identifiers with WAL on a target."""
    systems: set[int] = set()
    for info in storage.list(naming.WAL_ROOT + "/"):
        parsed = naming.parse_wal_key(info.key)
        if parsed is not None:
            systems.add(parsed[0])
    return sorted(systems)


def list_archive(storage: Storage, system_id: int) -> Archive:
    """Every archived WAL file of one system on one target."""
    archive = Archive(system_id, storage.url)
    for info in storage.list(naming.wal_system_prefix(system_id)):
        parsed = naming.parse_wal_key(info.key)
        if parsed is None or parsed[0] != system_id:
            archive.foreign.append(info.key)
            continue
        archive.files.setdefault(parsed[1], []).append(
            ArchivedFile(parsed[1], parsed[2], info.key, info.size, info.modified)
        )
    return archive


def gaps(names: Iterable[str], segment_size: int = DEFAULT_SEGMENT_SIZE) -> list[tuple[str, str]]:
    """Missing runs inside one timeline's archived segments: (first missing, last missing)."""
    ordered = sorted(names)
    found: list[tuple[str, str]] = []
    for previous, current in itertools.pairwise(ordered):
        a, b = segment_number(previous, segment_size), segment_number(current, segment_size)
        if b - a > 1:
            tli = timeline_of(current)
            found.append(
                (segment_name(tli, a + 1, segment_size), segment_name(tli, b - 1, segment_size))
            )
    return found


@dataclass(frozen=True)
class TimelineSwitch:
    """One line of a timeline history file: ``parent`` switched to the child at ``lsn``."""

    parent: int
    lsn: int


def parse_history(text: str) -> list[TimelineSwitch]:
    """The switch points of a ``.history`` file (comments and blank lines skipped)."""
    switches = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) < 2:
            continue
        try:
            switches.append(TimelineSwitch(int(fields[0]), parse_lsn(fields[1])))
        except (ValueError, UsageError):
            continue
    return switches


def read_history(
    storage: Storage, archive: Archive, timeline: int, identity: IdentitySource = None
) -> list[TimelineSwitch]:
    """The switch points leading to ``timeline`` (empty for timeline 1 or a missing file).
    Raises IdentityError for an encrypted history file ``identity`` cannot open."""
    name = f"{timeline:08X}.history"
    copies = archive.files.get(name)
    if not copies:
        return []
    with tempfile.TemporaryDirectory(prefix="pgkeeper-history-") as tmp:
        dest = Path(tmp) / name
        problem = _fetch_copy(storage, copies[0].key, copies[0].sha256, dest, identity)
        if problem is not None:
            raise ArchiveError(f"history file {name} in {storage.url}: {problem}")
        return parse_history(dest.read_text(errors="replace"))


def prune_plan(
    archive: Archive, kept_starts: Iterable[int], segment_size: int = DEFAULT_SEGMENT_SIZE
) -> list[ArchivedFile]:
    """What WAL retention removes from one system's archive (pure): every segment, partial
    segment and backup history file wholly before the oldest kept base backup's start LSN.

    Nothing when no base backup is kept (without one the archive restores nothing, but it is
    not for rotation to decide that the operator's own base backups do not exist), and never
    a timeline history file: they are tiny and recovery reads them to find its way.
    """
    starts = list(kept_starts)
    if not starts:
        return []
    floor = segment_of(min(starts), segment_size)
    doomed: list[ArchivedFile] = []
    for name, copies in archive.files.items():
        if kind_of(name) == "history":
            continue
        if segment_number(name, segment_size) < floor:
            doomed.extend(copies)
    return sorted(doomed, key=lambda f: f.name)


def remove(storage: Storage, files: Iterable[ArchivedFile]) -> int:
    """Delete archived files; returns how many. Raises the backend's StorageError."""
    count = 0
    for item in files:
        storage.delete(item.key)
        count += 1
    return count


@dataclass
class UploadReport:
    """What ``upload_missing`` copied (files per target URL) and what failed."""

    copied: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def upload_missing(storages: Sequence[Storage]) -> UploadReport:
    """Copy every archived WAL file of the primary (the first target) that an offsite target
    lacks, proving each copy (``copy``). Per-target failures are collected, not raised, so
    one unreachable bucket does not stop the others."""
    report = UploadReport()
    if len(storages) < 2:
        return report
    primary = storages[0]
    try:
        systems = list_systems(primary)
    except StorageError as exc:
        report.failed[primary.url] = exc.message
        return report
    for dest in storages[1:]:
        count = 0
        try:
            for system_id in systems:
                source = list_archive(primary, system_id)
                there = list_archive(dest, system_id)
                for name in sorted(source.files):
                    have = {f.sha256 for f in there.files.get(name, [])}
                    for item in source.files[name]:
                        if item.sha256 not in have and copy(primary, dest, item.key):
                            count += 1
        except (StorageError, ArchiveError) as exc:
            report.failed[dest.url] = exc.message
        report.copied[dest.url] = count
    return report
