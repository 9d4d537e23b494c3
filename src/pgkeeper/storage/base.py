"""The one storage protocol every backend implements, and helpers built only on it.

A backend stores opaque objects under ``/``-separated keys relative to its prefix. Writes are
atomic: ``open_write`` returns a context manager whose data becomes visible under the key only
when the block exits cleanly (local: temp name + fsync + rename; S3: multipart complete; GCS:
resumable upload finalised); on an exception nothing is visible and any partial upload is
aborted. Backends translate their SDK's errors into ``pgkeeper.errors.StorageError`` subclasses.
"""

from __future__ import annotations

import builtins
import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from pgkeeper.errors import StorageError, StoragePermissionError

CHUNK = 1024 * 1024  # 1 MiB: the unit of every streamed read and write


def key_parts(key: str) -> list[str]:
    """The parts of a storage key; raise StorageError for an empty part, '.' or '..'.

    Every backend passes its keys through here, so no key can escape a target's prefix. A
    trailing '/' (naming a folder) is allowed.
    """
    parts = key.rstrip("/").split("/")
    if not key or any(part in ("", ".", "..") for part in parts):
        raise StorageError(f"unsafe storage key {key!r}")
    return parts


def with_prefix(prefix: str, key: str) -> str:
    """The provider's key for ``key`` under a target's prefix (validated)."""
    key_parts(key)
    return f"{prefix}/{key}" if prefix else key


def without_prefix(prefix: str, full_key: str) -> str:
    """The target-relative key of a provider key listed under ``prefix``."""
    return full_key[len(prefix) + 1 :] if prefix else full_key


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or stat knows of one stored object."""

    key: str
    size: int
    modified: datetime | None = None


class Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...


@runtime_checkable
class Storage(Protocol):
    """Open for read, open for write, list, stat, delete; plus three optional abilities every
    backend declares, so callers never probe for methods:

    ``atomic_create``     True when ``create_exclusive`` is one atomic create-if-absent
                          (local: ``link()``); False when it is a write and read-back
                          (``claim_by_readback``): of racing writers at most the last proceeds.
    ``stored_checksums``  True when ``remote_sha256`` can answer from what the provider keeps
                          with the object (S3 metadata or SHA-256 checksums, GCS metadata)
                          without reading it; False: it always answers None.
    ``orphan_uploads``    True when a killed writer can leave invisible, billed parts behind
                          (S3 multipart uploads) that ``abort_orphan_uploads`` cleans.
    """

    url: str  # where this target is, without credentials, for messages and listings
    kind: str  # "local", "s3" or "gcs"
    atomic_create: bool
    stored_checksums: bool
    orphan_uploads: bool

    def open_write(
        self, key: str, size_hint: int | None = None, metadata: dict[str, str] | None = None
    ) -> AbstractContextManager[Writer]:
        """Write an object atomically; ``metadata`` (e.g. the sha256) is kept where supported."""
        ...

    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]: ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def stat(self, key: str) -> ObjectInfo | None: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None:
        """A filesystem path for the key when the backend is a local folder, else None."""
        ...

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` only if it does not exist; True when this caller did."""
        ...

    def remote_sha256(self, key: str) -> str | None:
        """The object's sha256 (hex) as the provider stores it, or None when it cannot say.
        Raises StorageError when the object is missing."""
        ...

    def abort_orphan_uploads(self, prefix: str = "") -> builtins.list[str]:
        """Clean what killed writers left invisible under ``prefix``; return their keys."""
        ...


def claim_by_readback(storage: Storage, key: str, data: bytes) -> bool:
    """``create_exclusive`` for stores without an atomic create-if-absent: the data carries a
    random token (the caller's), is written unless the key exists, and read back; of two racing
    writers at most the last one proceeds (a rare loser fails cleanly on its next step)."""
    if storage.stat(key) is not None:
        return False
    put_bytes(storage, key, data)
    return get_bytes(storage, key) == data


def put_bytes(storage: Storage, key: str, data: bytes) -> None:
    with storage.open_write(key, size_hint=len(data)) as out:
        out.write(data)


def get_bytes(storage: Storage, key: str) -> bytes:
    with storage.open_read(key) as src:
        return src.read()


def sha256_of(storage: Storage, key: str) -> tuple[str, int]:
    """Re-read an object and return its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with storage.open_read(key) as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ReadOnlyStorage:
    """A view of a storage target that refuses every change: how dry runs are enforced."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.url = inner.url
        self.kind = inner.kind
        self.atomic_create = inner.atomic_create
        self.stored_checksums = inner.stored_checksums
        self.orphan_uploads = inner.orphan_uploads

    def _refuse(self, what: str, key: str) -> StoragePermissionError:
        return StoragePermissionError(
            f"dry run: refused to {what} {key!r} in {self.url} (this is a bug; please report it)"
        )

    def open_write(
        self, key: str, size_hint: int | None = None, metadata: dict[str, str] | None = None
    ) -> AbstractContextManager[Writer]:
        raise self._refuse("write", key)

    def open_read(self, key: str) -> AbstractContextManager[BinaryIO]:
        return self._inner.open_read(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self._inner.list(prefix)

    def stat(self, key: str) -> ObjectInfo | None:
        return self._inner.stat(key)

    def delete(self, key: str) -> None:
        raise self._refuse("delete", key)

    def local_path(self, key: str) -> Path | None:
        return self._inner.local_path(key)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        raise self._refuse("create", key)

    def remote_sha256(self, key: str) -> str | None:
        return self._inner.remote_sha256(key)

    def abort_orphan_uploads(self, prefix: str = "") -> builtins.list[str]:
        raise self._refuse("clean uploads under", prefix or "/")
