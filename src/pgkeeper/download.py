"""Write a stored backup to a local stream: as stored, decompressed, or (directory) as a tar.

Every byte read is hashed; a copy whose sha256 differs from the manifest raises
VerificationError at the end, so callers writing to a file discard it (the CLI writes to
``.<name>.part`` and renames only on success).
"""

from __future__ import annotations

import tarfile
from typing import BinaryIO

from pgkeeper import naming
from pgkeeper.manifest import Manifest, StoredObject
from pgkeeper.pipeline import Decoder, Progress
from pgkeeper.restore import _HashingReader
from pgkeeper.storage import Storage
from pgkeeper.storage.base import CHUNK


def _copy(
    storage: Storage,
    manifest: Manifest,
    obj: StoredObject,
    out: BinaryIO,
    decode: str,
    progress: Progress | None,
) -> None:
    decoder = Decoder(decode)
    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        reader = _HashingReader(src, obj, progress)
        while chunk := reader.read(CHUNK):
            out.write(decoder.decompress(chunk))
    decoder.finish()
    reader.check()


class _TarSource:
    """A file-like over one stored object for tarfile.addfile, hashing as it goes."""

    def __init__(self, reader: _HashingReader) -> None:
        self._reader = reader

    def read(self, n: int = -1) -> bytes:
        return self._reader.read(CHUNK if n < 0 else n)


def write_backup(
    storage: Storage,
    manifest: Manifest,
    out: BinaryIO,
    *,
    decompress: bool = False,
    progress: Progress | None = None,
) -> None:
    """Stream a backup to ``out``; raise VerificationError if the stored bytes are bad."""
    if manifest.format != "directory":
        decode = manifest.compression if decompress else "none"
        _copy(storage, manifest, manifest.objects[0], out, decode, progress)
        return
    with tarfile.open(fileobj=out, mode="w|") as archive:
        for obj in manifest.objects:
            info = tarfile.TarInfo(obj.name)
            info.size = obj.size
            info.mtime = int(manifest.finished_at.timestamp())
            with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
                reader = _HashingReader(src, obj, progress)
                archive.addfile(info, _TarSource(reader))  # type: ignore[arg-type]
                reader.check()
