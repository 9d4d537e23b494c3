"""Write a stored backup to a local stream: as stored, decompressed, or (directory) as a tar.

Every byte read is hashed; a copy whose sha256 differs from the manifest raises
VerificationError at the end, so callers writing to a file discard it (the CLI writes to
``.<name>.part`` and renames only on success). An encrypted backup is sent as stored (the age
file, no key needed); decompressed, it is decrypted first with the identity the caller passes.
"""

from __future__ import annotations

import tarfile
import tempfile
from typing import Any, BinaryIO, cast

from pgkeeper import crypto, naming
from pgkeeper.errors import VerificationError
from pgkeeper.manifest import Manifest
from pgkeeper.pipeline import HashingReader, Progress, decode_verified
from pgkeeper.storage import Storage
from pgkeeper.verify import damaged


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
        if manifest.format != "directory":
            obj = manifest.objects[0]
            with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
                decode = manifest.compression if decompress else "none"
                decode_verified(HashingReader.of(src, obj, progress), decode, out.write, decrypt)
            return
        with tarfile.open(fileobj=out, mode="w|") as archive:
            if decrypt is not None:
                _tar_decrypted(storage, manifest, archive, decrypt, progress)
                return
            for obj in manifest.objects:
                info = tarfile.TarInfo(obj.name)
                info.size = obj.size
                info.mtime = int(manifest.finished_at.timestamp())
                with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
                    reader = HashingReader.of(src, obj, progress)
                    archive.addfile(info, cast(Any, reader))
                    reader.check()
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
