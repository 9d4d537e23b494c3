"""Local folder backend: ``file:///var/backups`` or a plain path (``BACKUP_DIR``).

Writes go to ``.<name>.tmp-<random>`` beside the final name, are fsynced, renamed into place and
the folder is fsynced, so a crash leaves either the whole object or a temp file that no listing
of backups ever shows (the catalog only reads manifests) and that cleanup removes.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pgkeeper.errors import StorageError, StorageFullError, StoragePermissionError
from pgkeeper.storage.base import ObjectInfo, key_parts

TEMP_MARK = ".tmp-"


def translate_os_error(exc: OSError, what: str) -> StorageError:
    """Turn an OSError into the project's storage error with a what-to-do message."""
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return StorageFullError(
            f"no space left writing {what} (free disk space or move BACKUP_DIR)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoragePermissionError(
            f"cannot write {what}: permission denied (make the folder writable for this user "
            "or set BACKUP_DIR)"
        )
    return StorageError(f"cannot access {what}: {exc.strerror or exc}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileWriter:
    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def write(self, data: bytes, /) -> int:
        return self._handle.write(data)


class LocalStorage:
    """A folder on this machine."""

    kind = "local"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key_parts(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key) if key else self.root

    @contextmanager
    def open_write(
        self, key: str, size_hint: int | None = None, metadata: dict[str, str] | None = None
    ) -> Iterator[_FileWriter]:
        final = self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate_os_error(exc, str(final.parent)) from exc
        temp = final.with_name(f".{final.name}{TEMP_MARK}{secrets.token_hex(4)}")
        try:
            with open(temp, "xb") as handle:
                yield _FileWriter(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise translate_os_error(exc, str(final)) from exc
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Atomically create ``key`` with ``data`` unless it exists; True when created here."""
        final = self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            temp = final.with_name(f".{final.name}{TEMP_MARK}{secrets.token_hex(4)}")
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temp, final)  # fails if the key exists: the atomic step
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise translate_os_error(exc, str(final)) from exc
        return True

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed by the with below, after yield
        except FileNotFoundError:
            raise StorageError(f"{key!r} not found in {self.url}") from None
        except OSError as exc:
            raise translate_os_error(exc, str(path)) from exc
        with handle:
            yield handle

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for filename in sorted(filenames):
                full = Path(dirpath, filename)
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise translate_os_error(exc, str(path)) from exc
        # Remove folders left empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
