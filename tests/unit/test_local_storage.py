"""The local folder backend: atomic writes, keys kept inside the root, dry runs write nothing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pgkeeper.errors import (
    ConfigError,
    StorageError,
    StorageFullError,
    StoragePermissionError,
)
from pgkeeper.storage import LocalStorage, ReadOnlyStorage, open_storage
from pgkeeper.storage.base import get_bytes, put_bytes, sha256_of
from pgkeeper.storage.local import TEMP_MARK, translate_os_error

KEY = "b_2025-10-02T10-00-00Z/b_2025-10-02T10-00-00Z.dump.zst"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_write_then_read(tmp_path: Path) -> None:
    """A completed write is readable under its key, listed, and stat'ed with its size."""
    storage = LocalStorage(tmp_path)
    put_bytes(storage, KEY, b"hello")
    assert get_bytes(storage, KEY) == b"hello"
    assert [i.key for i in storage.list()] == [KEY]
    info = storage.stat(KEY)
    assert info is not None and info.size == 5
    assert sha256_of(storage, KEY)[1] == 5


def test_nothing_is_visible_while_writing(tmp_path: Path) -> None:
    """Until the block exits the final key does not exist; only a hidden temp file does."""
    storage = LocalStorage(tmp_path)
    with storage.open_write(KEY) as out:
        out.write(b"partial")
        assert storage.stat(KEY) is None
        temps = _files(tmp_path)
        assert len(temps) == 1 and TEMP_MARK in temps[0]
        assert Path(temps[0]).name.startswith(".")
    assert _files(tmp_path) == [KEY]


def test_exception_inside_open_write_leaves_nothing(tmp_path: Path) -> None:
    """An exception in the block removes the temp file; the key never appears."""
    storage = LocalStorage(tmp_path)
    with pytest.raises(RuntimeError), storage.open_write(KEY) as out:
        out.write(b"x" * 100_000)
        raise RuntimeError("pg_dump died")
    assert storage.stat(KEY) is None
    assert _files(tmp_path) == []


def test_keyboard_interrupt_inside_open_write_leaves_nothing(tmp_path: Path) -> None:
    """Even a KeyboardInterrupt (Ctrl-C) removes the partial file."""
    storage = LocalStorage(tmp_path)
    with pytest.raises(KeyboardInterrupt), storage.open_write(KEY) as out:
        out.write(b"x")
        raise KeyboardInterrupt
    assert _files(tmp_path) == []


def test_failed_rewrite_keeps_the_old_object(tmp_path: Path) -> None:
    """Replacing an object is atomic: a failed rewrite leaves the previous content."""
    storage = LocalStorage(tmp_path)
    put_bytes(storage, KEY, b"old")
    with pytest.raises(RuntimeError), storage.open_write(KEY) as out:
        out.write(b"new new new")
        raise RuntimeError("boom")
    assert get_bytes(storage, KEY) == b"old"
    assert _files(tmp_path) == [KEY]


def test_no_space_becomes_storage_full_error(tmp_path: Path) -> None:
    """ENOSPC while writing is a StorageFullError saying what to do; the temp file is removed."""
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageFullError) as info, storage.open_write(KEY) as out:
        out.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "no space left" in str(info.value)
    assert "BACKUP_DIR" in str(info.value)
    assert _files(tmp_path) == []


def test_os_errors_translate_to_storage_errors() -> None:
    """ENOSPC/EDQUOT -> full, EACCES/EPERM/EROFS -> permission (exit 2), others -> StorageError."""
    assert isinstance(translate_os_error(OSError(errno.EDQUOT, "quota"), "f"), StorageFullError)
    for code in (errno.EACCES, errno.EPERM, errno.EROFS):
        error = translate_os_error(OSError(code, "nope"), "/backups/x")
        assert isinstance(error, StoragePermissionError)
        assert error.exit_code == 2
        assert "/backups/x" in str(error)
    other = translate_os_error(OSError(errno.EIO, "Input/output error"), "f")
    assert type(other) is StorageError


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder_is_a_permission_error(tmp_path: Path) -> None:
    """A folder the user cannot write to gives StoragePermissionError, not a traceback."""
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(StoragePermissionError):
            put_bytes(LocalStorage(root), KEY, b"x")
    finally:
        root.chmod(0o755)


@pytest.mark.parametrize("key", ["", "../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/."])
def test_unsafe_keys_are_refused(tmp_path: Path, key: str) -> None:
    """No key can name a path outside the root (or an ambiguous one)."""
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(StorageError):
        put_bytes(storage, key, b"x")
    with pytest.raises(StorageError):
        storage.delete(key)
    assert not (tmp_path / "x").exists()


def test_missing_object_is_a_storage_error(tmp_path: Path) -> None:
    """Reading a key that is not there names it and the target."""
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError, match="not found"):
        get_bytes(storage, KEY)
    assert storage.stat(KEY) is None


def test_delete_removes_empty_folders_but_not_the_root(tmp_path: Path) -> None:
    """Deleting the last object of a backup removes its folder; the root stays."""
    storage = LocalStorage(tmp_path)
    put_bytes(storage, KEY, b"x")
    storage.delete(KEY)
    storage.delete(KEY)  # idempotent
    assert list(tmp_path.iterdir()) == []
    assert tmp_path.is_dir()


def test_list_filters_by_prefix(tmp_path: Path) -> None:
    """list(prefix) returns only keys under that prefix; a missing root lists nothing."""
    storage = LocalStorage(tmp_path)
    put_bytes(storage, "a_2025-01-01T00-00-00Z/manifest.json", b"{}")
    put_bytes(storage, "b_2025-01-01T00-00-00Z/manifest.json", b"{}")
    assert [i.key for i in storage.list("a_")] == ["a_2025-01-01T00-00-00Z/manifest.json"]
    assert list(LocalStorage(tmp_path / "missing").list()) == []


def test_read_only_storage_refuses_writes_and_deletes(tmp_path: Path) -> None:
    """The dry-run wrapper reads through but refuses every change, leaving the files alone."""
    inner = LocalStorage(tmp_path)
    put_bytes(inner, KEY, b"keep me")
    view = ReadOnlyStorage(inner)
    with pytest.raises(StoragePermissionError, match="dry run"):
        put_bytes(view, KEY, b"overwrite")
    with pytest.raises(StoragePermissionError, match="dry run"):
        view.open_write("other/key")
    with pytest.raises(StoragePermissionError, match="dry run"):
        view.delete(KEY)
    assert get_bytes(view, KEY) == b"keep me"
    assert [i.key for i in view.list()] == [KEY]
    assert view.stat(KEY) is not None
    assert view.url == inner.url and view.kind == "local"
    assert _files(tmp_path) == [KEY]


@pytest.mark.parametrize("url", ["file:///var/backups", "/var/backups", "relative/folder"])
def test_open_storage_builds_local_targets(url: str) -> None:
    """A path or a file:// URL is a local folder."""
    storage = open_storage(url)
    assert isinstance(storage, LocalStorage)
    assert storage.root.is_absolute()


# --- links, planted files and modes (issue 10: reads never leave the backup's folder) ---------

BACKUP = "b_2025-10-02T10-00-00Z"


def test_a_linked_folder_inside_a_backup_is_never_followed(tmp_path: Path) -> None:
    """A planted `<id>/link -> /secret/dir` cannot be read through, stat'ed or listed."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret.txt").write_text("root's secrets")
    root = tmp_path / "backups"
    storage = LocalStorage(root)
    put_bytes(storage, f"{BACKUP}/manifest.json", b"{}")
    (root / BACKUP / "link").symlink_to(secret)
    key = f"{BACKUP}/link/secret.txt"
    with pytest.raises(StorageError, match="symbolic link"):
        get_bytes(storage, key)
    with pytest.raises(StorageError, match="symbolic link"):
        storage.stat(key)
    with pytest.raises(StorageError, match="symbolic link"):
        storage.local_path(key)
    assert [i.key for i in storage.list()] == [f"{BACKUP}/manifest.json"]
    with pytest.raises(StorageError, match="symbolic link"), storage.open_write(key) as out:
        out.write(b"overwrite")
    assert (secret / "secret.txt").read_text() == "root's secrets"


def test_a_linked_file_is_neither_read_nor_listed(tmp_path: Path) -> None:
    """A planted link to a file outside the target reads as refused, lists as absent."""
    outside = tmp_path / "shadow"
    outside.write_text("secret")
    root = tmp_path / "backups"
    storage = LocalStorage(root)
    put_bytes(storage, f"{BACKUP}/manifest.json", b"{}")
    (root / BACKUP / "data.dump").symlink_to(outside)
    with pytest.raises(StorageError, match="symbolic link"):
        get_bytes(storage, f"{BACKUP}/data.dump")
    assert storage.stat(f"{BACKUP}/data.dump") is None
    assert [i.key for i in storage.list()] == [f"{BACKUP}/manifest.json"]
    storage.delete(f"{BACKUP}/data.dump")  # removes the link, never what it points at
    assert outside.read_text() == "secret"
    assert not (root / BACKUP / "data.dump").is_symlink()


def test_a_planted_fifo_is_refused_instead_of_blocking(tmp_path: Path) -> None:
    """Reading a FIFO would hang a restore or download forever: it is refused at once."""
    storage = LocalStorage(tmp_path)
    put_bytes(storage, f"{BACKUP}/manifest.json", b"{}")
    os.mkfifo(tmp_path / BACKUP / "pipe.dump")
    with pytest.raises(StorageError, match="not a regular file"):
        get_bytes(storage, f"{BACKUP}/pipe.dump")
    assert storage.stat(f"{BACKUP}/pipe.dump") is None


def test_a_linked_root_is_the_operators_choice(tmp_path: Path) -> None:
    """BACKUP_DIR may itself be a link (/backups -> /mnt/disk): only links below it are refused."""
    real = tmp_path / "disk"
    real.mkdir()
    (tmp_path / "backups").symlink_to(real)
    storage = LocalStorage(tmp_path / "backups")
    put_bytes(storage, KEY, b"data")
    assert get_bytes(storage, KEY) == b"data"
    assert (real / KEY).read_bytes() == b"data"


def test_what_the_backend_creates_is_private_to_its_owner(tmp_path: Path) -> None:
    """Backups hold every row: files are created 0600 and folders 0700, whatever the umask."""
    old = os.umask(0o022)
    try:
        storage = LocalStorage(tmp_path / "backups")
        put_bytes(storage, KEY, b"rows")
        assert storage.create_exclusive(f"{BACKUP}/pending.json", b"{}")
    finally:
        os.umask(old)
    root = tmp_path / "backups"
    assert (root / KEY).stat().st_mode & 0o777 == 0o600
    assert (root / BACKUP / "pending.json").stat().st_mode & 0o777 == 0o600
    assert (root / BACKUP).stat().st_mode & 0o777 == 0o700
    assert root.stat().st_mode & 0o777 == 0o700


def test_a_file_as_backup_dir_is_a_config_error(tmp_path: Path) -> None:
    """BACKUP_DIR naming a file is a user error (exit 2) in one line, not 'no backups'."""
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder") as info:
        open_storage(str(path))
    assert info.value.exit_code == 2


@pytest.mark.parametrize("url", ["file://somehost/tmp/x", "file://10.0.0.1/backups"])
def test_a_file_url_with_a_host_is_refused(url: str) -> None:
    """file://somehost/tmp/x used to write to /tmp/x on this machine, silently."""
    with pytest.raises(ConfigError, match="names the host"):
        open_storage(url)


def test_a_file_url_for_localhost_is_a_local_folder(tmp_path: Path) -> None:
    """file://localhost/path and file:///path are the same folder (RFC 8089)."""
    storage = open_storage(f"file://localhost{tmp_path}")
    assert storage.url == str(tmp_path)
