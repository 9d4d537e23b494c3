"""Downloading a stored backup: its file name, its bytes (as stored, decompressed, or a
directory backup as a tar), and HTTP's view of them (ranges, ETag, length) for the API.

Every byte read is hashed. Writing to a local stream (``write_backup``, the CLI) raises
VerificationError at the end when the copy's sha256 differs from the manifest, so callers
writing a file discard it (the CLI writes ``.<name>.part`` and renames only on success).
Serving over HTTP (``serve``) holds back the last chunk of a whole object until its sha256
matched, so a corrupt copy ends the response short of its Content-Length and a client never
keeps it as a complete download. The tar of a directory backup is the same bytes either way
(``tar_layout``), which is what lets the API announce its length up front.
An encrypted backup is sent as stored (the age file, no key needed); decompressed, it is
decrypted first with the identity the caller passes.
"""

from __future__ import annotations

import hashlib
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from pgkeeper import crypto, naming
from pgkeeper.errors import UsageError, VerificationError
from pgkeeper.manifest import Manifest, StoredObject
from pgkeeper.pipeline import HashingReader, Progress, decode_verified
from pgkeeper.storage import Storage
from pgkeeper.storage.base import CHUNK
from pgkeeper.verify import damaged


class RangeNotSatisfiableError(UsageError):
    """A Range header none of whose bytes exist."""

    http_status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


def download_name(manifest: Manifest, decompress: bool = False) -> str:
    """The file name a download is saved under: the stored file's, a directory backup's tar
    (``<id>.dir.tar``), or without the compression suffix when decompressed."""
    if manifest.format == "directory":
        return f"{manifest.id}.dir.tar"
    name = manifest.filename
    if decompress:
        for suffix in (".age", ".zst", ".gz"):
            name = name.removesuffix(suffix)
    return name


def check_present(storage: Storage, manifest: Manifest) -> None:
    """Raise the damaged-copy VerificationError unless every object of the backup is a regular
    file of its recorded size on ``storage``: checked before a response starts streaming, so a
    missing or planted object (a link out of the folder) is an error, never a partial body."""
    for obj in manifest.objects:
        info = storage.stat(naming.object_key(manifest.id, obj.name))
        if info is None or info.size != obj.size:
            problem = "missing or not a regular file" if info is None else "of the wrong size"
            raise damaged(
                manifest,
                storage,
                VerificationError(f"{obj.name} is {problem}", check="objects"),
                "nothing was sent",
            )


# --- the bytes -----------------------------------------------------------------------------------


def _skip(src: BinaryIO, count: int) -> None:
    """Move a stored object's reader ``count`` bytes on: seek where possible, else read past."""
    try:
        if src.seekable():
            src.seek(count)
            return
    except (AttributeError, OSError):
        pass
    while count > 0:
        chunk = src.read(min(CHUNK, count))
        if not chunk:
            return
        count -= len(chunk)


def send_object(
    storage: Storage,
    manifest: Manifest,
    obj: StoredObject,
    first: int = 0,
    length: int | None = None,
    progress: Progress | None = None,
) -> Iterator[bytes]:
    """Yield ``length`` bytes (default: to the end) of a stored object from ``first``.

    A whole object is hashed as it goes and its last chunk is held back until the sha256 equals
    the manifest's; VerificationError otherwise (a part of an object is not checked: compare
    the whole file with its sha256).
    """
    length = obj.size - first if length is None else length
    whole = first == 0 and length == obj.size
    digest = hashlib.sha256() if whole else None
    held = b""
    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        if first:
            _skip(src, first)
        remaining = length
        while remaining > 0:
            chunk = src.read(min(CHUNK, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            if digest is not None:
                digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
            if held:
                yield held
            held = chunk
    if remaining > 0:
        raise VerificationError(f"{obj.name} is shorter than its manifest says", check="objects")
    if digest is not None and digest.hexdigest() != obj.sha256:
        raise VerificationError(
            f"{obj.name} does not match its manifest's sha256 (download aborted; "
            f"run 'pgkeeper verify {manifest.id}')",
            check="checksum",
        )
    if held:
        yield held


def tar_layout(manifest: Manifest) -> tuple[list[tuple[bytes, StoredObject]], int]:
    """Headers and total size of the tar of a directory backup.

    The bytes of ``tarfile.open(mode="w|")``: a PAX header per member, data padded to 512-byte
    blocks, two zero blocks, padding to a 10240-byte record. Knowing the size up front is what
    lets an HTTP response carry a Content-Length.
    """
    members: list[tuple[bytes, StoredObject]] = []
    total = 0
    for obj in manifest.objects:
        info = tarfile.TarInfo(obj.name)
        info.size = obj.size
        info.mtime = int(manifest.finished_at.timestamp())
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        members.append((header, obj))
        total += len(header) + obj.size + (-obj.size % tarfile.BLOCKSIZE)
    total += 2 * tarfile.BLOCKSIZE
    total += -total % tarfile.RECORDSIZE
    return members, total


def send_tar(
    storage: Storage, manifest: Manifest, progress: Progress | None = None
) -> Iterator[bytes]:
    """The directory backup as a tar stream; each member is verified as ``send_object`` does."""
    members, total = tar_layout(manifest)
    sent = 0
    for header, obj in members:
        yield header
        yield from send_object(storage, manifest, obj, progress=progress)
        padding = -obj.size % tarfile.BLOCKSIZE
        if padding:
            yield b"\0" * padding
        sent += len(header) + obj.size + padding
    yield b"\0" * (total - sent)  # end-of-archive blocks and record padding


def write_backup(
    storage: Storage,
    manifest: Manifest,
    out: BinaryIO,
    *,
    decompress: bool = False,
    progress: Progress | None = None,
    identity: crypto.Identity | None = None,
) -> None:
    """Stream a backup to ``out``; raise VerificationError if the stored bytes are bad.

    ``decompress`` of an encrypted backup decrypts with ``identity`` (required then: see
    ``crypto.identity_for``); a directory backup's tar then holds the decrypted files."""
    decrypt = identity if decompress and manifest.encryption is not None else None
    try:
        if manifest.format == "directory":
            if decrypt is not None:
                with tarfile.open(fileobj=out, mode="w|") as archive:
                    _tar_decrypted(storage, manifest, archive, decrypt, progress)
                return
            for chunk in send_tar(storage, manifest, progress):
                out.write(chunk)
            return
        obj = manifest.objects[0]
        with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
            decode = manifest.compression if decompress else "none"
            decode_verified(HashingReader.of(src, obj, progress), decode, out.write, decrypt)
    except VerificationError as exc:
        raise damaged(
            manifest, storage, exc, "the download is incomplete and must not be used"
        ) from None


def _tar_decrypted(
    storage: Storage,
    manifest: Manifest,
    archive: tarfile.TarFile,
    identity: crypto.Identity,
    progress: Progress | None,
) -> None:
    """Add every file of an encrypted directory backup, decrypted, to ``archive``. A tar member
    needs its size first: each file is decrypted into a private temporary file (in memory up to
    8 MiB), checked against its sha256, then added."""
    for obj in manifest.objects:
        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as plain:
            with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
                reader = HashingReader.of(src, obj, progress)
                decode_verified(reader, "none", plain.write, identity)
            info = tarfile.TarInfo(obj.name.removesuffix(crypto.SUFFIX))
            info.size = plain.tell()
            info.mtime = int(manifest.finished_at.timestamp())
            plain.seek(0)
            archive.addfile(info, cast(Any, plain))


# --- HTTP's view -----------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``(first, last)`` a Range header asks for, or None to send it all.

    Invalid or multi-range headers are ignored (RFC 9110 lets a server send the whole
    representation); a range starting past the end raises RangeNotSatisfiableError.
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    unsatisfiable = RangeNotSatisfiableError(
        f"range {header.strip()[:60]!r} is outside the file's {size} bytes", size
    )
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise unsatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


@dataclass
class Served:
    """A download as HTTP sends it: status (200/206), headers, and the body, made on demand
    (``body()`` reads the backup; HEAD never calls it)."""

    status: int
    headers: dict[str, str]
    body: Callable[[], Iterator[bytes]] = field(repr=False)


def serve(
    storage: Storage, manifest: Manifest, range_header: str | None, if_range: str | None
) -> Served:
    """The response to a download request: the whole file, or the one ``Range`` asked for
    (single-file backups only; a directory backup's tar is always sent whole), with
    Content-Length, Content-Disposition, the sha256 as ETag and X-Backup-Sha256.

    Raises the damaged-copy VerificationError when an object is missing (before any byte is
    sent) and RangeNotSatisfiableError for a range past the end.
    """
    check_present(storage, manifest)
    headers = {
        "Content-Disposition": f'attachment; filename="{download_name(manifest)}"',
        "X-Backup-Id": manifest.id,
        "X-Backup-Sha256": manifest.sha256,
    }
    if manifest.format == "directory":
        _, total = tar_layout(manifest)
        headers |= {"Content-Length": str(total), "Accept-Ranges": "none"}
        return Served(200, headers, lambda: send_tar(storage, manifest))
    obj = manifest.objects[0]
    etag = f'"{obj.sha256}"'
    headers |= {"Accept-Ranges": "bytes", "ETag": etag}
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client's partial copy is of other bytes: send them all
    span = parse_range(range_header, obj.size)
    if span is None:
        headers["Content-Length"] = str(obj.size)
        return Served(200, headers, lambda: send_object(storage, manifest, obj))
    first, last = span
    headers |= {
        "Content-Length": str(last - first + 1),
        "Content-Range": f"bytes {first}-{last}/{obj.size}",
    }
    length = last - first + 1
    return Served(206, headers, lambda: send_object(storage, manifest, obj, first, length))
