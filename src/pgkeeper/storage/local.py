"""Local folder backend: ``file:///var/backups`` or a plain path (``BACKUP_DIR``).

Writes go to ``.<name>.tmp-<random>`` beside the final name, are fsynced, renamed into place and
the folder is fsynced, so a crash leaves either the whole object or a temp file that no listing
of backups ever shows (the catalog only reads manifests) and that cleanup removes.

Nothing below the root is ever followed through a symbolic link: every key is opened one
component at a time from a descriptor of the root with ``O_NOFOLLOW`` (so a link planted inside
a backup folder, ``<id>/link -> /etc``, cannot make a read, a download or a write leave the
target), listings skip links, and only regular files are read (a planted FIFO would block a
reader forever). The root itself may be a link (``/backups -> /mnt/disk``): that is the
operator's choice, not something found inside a backup.

Backups hold every row of a database, so what this backend creates is private to its owner:
files ``0600``, folders ``0700``.
"""

from __future__ import annotations

import builtins
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from pgkeeper.errors import ConfigError, StorageError, StorageFullError, StoragePermissionError
from pgkeeper.storage.base import ObjectInfo, key_parts

TEMP_MARK = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


class _FileWriter:
    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def write(self, data: bytes, /) -> int:
        return self._handle.write(data)


class LocalStorage:
    """A folder on this machine."""

    kind = "local"
    atomic_create = True  # link() of a fully written temp file fails if the key exists
    stored_checksums = False  # a local file keeps no checksum: reading it is the check
    orphan_uploads = False  # a killed writer leaves only a hidden temp file (see cleanup)

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(
                f"storage folder {self.root} is a file, not a folder "
                "(point BACKUP_DIR or BACKUP_TARGETS at a folder)"
            )

    # --- walking without following links -----------------------------------------------------

    def _linked(self, key: str) -> StorageError:
        return StorageError(
            f"{key!r} in {self.url} passes through a symbolic link or a non-folder: refusing to "
            "follow it (something was planted in the backup folder; inspect and remove it)"
        )

    def _root_fd(self, create: bool) -> int:
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            except OSError as exc:
                raise translate_os_error(exc, str(self.root)) from exc
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise
        except NotADirectoryError:
            raise ConfigError(
                f"storage folder {self.root} is a file, not a folder "
                "(point BACKUP_DIR or BACKUP_TARGETS at a folder)"
            ) from None
        except OSError as exc:
            raise translate_os_error(exc, str(self.root)) from exc

    def _parent_fd(self, key: str, create: bool) -> tuple[int, str]:
        """A descriptor of the folder holding ``key`` and the key's last part.

        Each folder is opened with O_NOFOLLOW relative to the previous one; with ``create``,
        missing folders are made (0700). Raises FileNotFoundError when a folder is missing
        (and not created), StorageError when a part is a link or not a folder.
        """
        parts = key_parts(key)
        fd = self._root_fd(create)
        try:
            for part in parts[:-1]:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    # FileExistsError: made by a concurrent writer; open it below.
                    with suppress(FileExistsError):
                        os.mkdir(part, DIR_MODE, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except (NotADirectoryError, OSError) as exc:
                    if isinstance(exc, NotADirectoryError) or exc.errno == errno.ELOOP:
                        raise self._linked(key) from None
                    raise
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd, parts[-1]

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key_parts(key))

    def local_path(self, key: str) -> Path | None:
        """The filesystem path of ``key`` (the root for ""), after checking that no existing
        part of it below the root is a symbolic link (callers hand it to pg_restore/pg_dump)."""
        if not key:
            return self.root
        path = self.root
        for part in key_parts(key):
            path = path / part
            try:
                if stat.S_ISLNK(os.lstat(path).st_mode):
                    raise self._linked(key)
            except FileNotFoundError:
                break
        return self._path(key)

    # --- the protocol ----------------------------------------------------------------------

    @contextmanager
    def open_write(
        self, key: str, size_hint: int | None = None, metadata: dict[str, str] | None = None
    ) -> Iterator[_FileWriter]:
        final = self._path(key)
        try:
            dir_fd, name = self._parent_fd(key, create=True)
        except OSError as exc:
            raise translate_os_error(exc, str(final.parent)) from exc
        temp = f".{name}{TEMP_MARK}{secrets.token_hex(4)}"
        try:
            try:
                with _new_file(temp, dir_fd) as handle:
                    yield _FileWriter(handle)
                    handle.flush()
                    os.fsync(handle.fileno())
                # rename() replaces a link planted at the final name; it never follows it.
                os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                os.fsync(dir_fd)
            except OSError as exc:
                _unlink_quietly(temp, dir_fd)
                raise translate_os_error(exc, str(final)) from exc
            except BaseException:
                _unlink_quietly(temp, dir_fd)
                raise
        finally:
            os.close(dir_fd)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Atomically create ``key`` with ``data`` unless it exists; True when created here."""
        final = self._path(key)
        try:
            dir_fd, name = self._parent_fd(key, create=True)
        except OSError as exc:
            raise translate_os_error(exc, str(final)) from exc
        temp = f".{name}{TEMP_MARK}{secrets.token_hex(4)}"
        try:
            with _new_file(temp, dir_fd) as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                # link() fails if the key exists, link or not: the atomic step.
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                return False
            finally:
                _unlink_quietly(temp, dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            raise translate_os_error(exc, str(final)) from exc
        finally:
            os.close(dir_fd)
        return True

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        path = self._path(key)
        dir_fd: int | None = None
        try:
            dir_fd, name = self._parent_fd(key, create=False)
            # O_NONBLOCK: opening a planted FIFO must not wait for a writer (checked below).
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
            )
        except FileNotFoundError:
            raise StorageError(f"{key!r} not found in {self.url}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._linked(key) from None
            raise translate_os_error(exc, str(path)) from exc
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(
                f"{key!r} in {self.url} is not a regular file: refusing to read it "
                "(something was planted in the backup folder; inspect and remove it)"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as handle:
            yield handle

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Regular files under the root; links (to files or folders) are never listed or
        descended into."""
        if not self.root.is_dir():
            return
        # Walk only the deepest folder the prefix names (a WAL fetch lists one timeline's
        # folder, not every backup); local_path refuses a link on the way down.
        start = self.root
        if "/" in prefix:
            try:
                folder = self.local_path(prefix.rsplit("/", 1)[0])
            except StorageError:  # a link or an unsafe part: nothing is listed through it
                return
            if folder is None or not folder.is_dir() or folder.is_symlink():
                return
            start = folder
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for filename in sorted(filenames):
                full = Path(dirpath, filename)
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = full.lstat()
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's size and time; None when it is missing, a link or not a file."""
        try:
            dir_fd, name = self._parent_fd(key, create=False)
        except FileNotFoundError:
            return None
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(dir_fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            dir_fd, name = self._parent_fd(key, create=False)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise translate_os_error(exc, str(path)) from exc
        try:
            os.unlink(name, dir_fd=dir_fd)  # a link is removed itself, never its target
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise StorageError(f"{key!r} in {self.url} is a folder, not an object") from None
        except OSError as exc:
            raise translate_os_error(exc, str(path)) from exc
        finally:
            os.close(dir_fd)
        # Remove folders left empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def remote_sha256(self, key: str) -> str | None:
        if self.stat(key) is None:
            raise StorageError(f"{key!r} not found in {self.url}")
        return None

    def abort_orphan_uploads(self, prefix: str = "") -> builtins.list[str]:
        return []


def _new_file(name: str, dir_fd: int) -> BinaryIO:
    """A new private file (0600) in the folder ``dir_fd``; never an existing one or a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(name, flags, FILE_MODE, dir_fd=dir_fd), "wb")


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
