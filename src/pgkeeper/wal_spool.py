"""The spool between ``wal-push`` and the background WAL pusher; standard library only.

PostgreSQL runs ``archive_command`` once per WAL file, one after the other, and a Python
process that imports pgkeeper's settings and a cloud SDK costs 0.3-0.6 s before it has read a
byte: slower than a busy server writes 16 MiB segments. So, as pgBackRest's asynchronous
archive-push does, the work is split:

- the background pusher (``pgkeeper.wal_async``) reads ``pg_wal/archive_status/*.ready``,
  archives the ready files ahead of PostgreSQL's requests, several at once, and after each
  file is durably stored on the primary target writes ``<name>.ok`` here (the file's inode,
  size and mtime, so an acknowledgement never covers other bytes) or ``<name>.error``;
- ``wal-push`` for a file whose ``.ok`` is here consumes it and exits 0 without importing
  anything but this module (~25 ms), and waits here while the pusher runs.

Restores mirror it (WAL-G's prefetch, pgBackRest's archive-get async): after ``wal-fetch``
has fetched a segment itself, a background prefetcher (``pgkeeper.wal_prefetch``) fetches the
next segments into ``pg_wal/.pgkeeper/prefetch/``, each checked against its checksum before it
is renamed in; ``wal-fetch`` of a prefetched segment is one rename into place, and for a
segment the prefetcher is about to fetch it writes ``<name>.want`` there and waits.

The spool is ``pg_wal/.pgkeeper/`` (0700, owned by the server's user). It holds only these
small status files, never WAL: losing it costs a re-check, since pushing the same bytes twice
is a success. ``pg_basebackup`` never copies it (it skips everything in ``pg_wal``), and
PostgreSQL's WAL recycling ignores it (not a WAL file name).

Paths are plain strings and ``os.path`` here, not pathlib: this module is what every
``wal-push`` of a busy server imports, and ``pathlib`` (with ``re``) or ``subprocess`` cost
~15 ms of a ~35 ms process (measured with ``python -X importtime``).
"""

from __future__ import annotations

import fcntl
import os
import stat
import time

SPOOL = ".pgkeeper"
LOCK = "push.lock"
SYNC = "sync-mode"  # written while BACKUP_WAL_ASYNC is off: the fast path then starts nothing
LOG = "pusher.log"
OK = ".ok"
ERROR = ".error"
_HEX = frozenset("0123456789ABCDEF")


def _join(*parts: str | os.PathLike[str]) -> str:
    return os.path.join(*(os.fspath(p) for p in parts))


def spool_of(wal_path: str | os.PathLike[str]) -> str:
    """The spool folder of the pg_wal folder holding ``wal_path``."""
    return _join(os.path.dirname(os.fspath(wal_path)), SPOOL)


def looks_like_wal(name: str) -> bool:
    """A cheap check that ``name`` is a WAL file name (segment, partial, backup, history)."""
    if len(name) == 24:
        return set(name) <= _HEX
    if name.endswith(".partial") and len(name) == 32:
        return set(name[:24]) <= _HEX
    if name.endswith(".history") and len(name) == 16:
        return set(name[:8]) <= _HEX
    if name.endswith(".backup") and len(name) == 40:
        return set(name[:24] + name[25:33]) <= _HEX and name[24] == "."
    return False


def private_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a real folder (not a link) owned by this user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def fingerprint(path: str | os.PathLike[str]) -> str:
    """What an acknowledgement is bound to: the file's inode, size and modification time."""
    st = os.stat(path)
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def write_status(spool: str | os.PathLike[str], name: str, suffix: str, text: str) -> None:
    """Atomically write ``<name><suffix>`` (``.ok``, ``.error``, ...) in the spool."""
    final = _join(spool, name + suffix)
    temp = _join(spool, f".{name}{suffix}.{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, final)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def take_ok(wal_path: str | os.PathLike[str]) -> bool:
    """Consume the acknowledgement of ``wal_path`` if there is one for these very bytes.

    An acknowledgement of other bytes under that name (a stale one) is removed and False is
    returned, so the caller has the file archived again.
    """
    ok = _join(spool_of(wal_path), os.path.basename(os.fspath(wal_path)) + OK)
    text = _read(ok)
    if text is None:
        return False
    recorded = text.split("\n", 1)[0].strip()
    try:
        current = fingerprint(wal_path)
    except OSError:
        current = ""
    try:
        os.unlink(ok)
    except FileNotFoundError:
        return False  # another wal-push took it first: let the caller check again
    return recorded == current


def take_error(wal_path: str | os.PathLike[str]) -> str | None:
    """Consume the pusher's error for ``wal_path``: its one-line message, or None."""
    error = _join(spool_of(wal_path), os.path.basename(os.fspath(wal_path)) + ERROR)
    text = _read(error)
    if text is None:
        return None
    try:
        os.unlink(error)
    except OSError:
        return None
    text = text.strip()
    return text.splitlines()[0] if text else "the background pusher failed (no message)"


def pusher_running(spool: str | os.PathLike[str]) -> bool:
    """Whether a pusher holds the spool's lock (checked without taking it for long)."""
    return pusher_running_at(_join(spool, LOCK))


def pusher_running_at(lock: str | os.PathLike[str]) -> bool:
    """Whether a background process holds the lock file ``lock``."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we got
    return False


def wait_for_ok(
    wal_path: str | os.PathLike[str], timeout: float, grace: float = 0.0
) -> bool | None:
    """Wait while a pusher runs for the acknowledgement of ``wal_path``.

    True: acknowledged (consumed). None: there is an error file, no pusher runs (after
    ``grace`` seconds, the time a just started one needs to take its lock), or the time is
    up: the caller decides. Never raises for a missing spool.
    """
    spool = spool_of(wal_path)
    if not private_folder(spool):
        return None
    error = _join(spool, os.path.basename(os.fspath(wal_path)) + ERROR)
    started = time.monotonic()
    deadline = started + timeout
    pause = 0.001
    while True:
        if take_ok(wal_path):
            return True
        stopped = not pusher_running(spool) and time.monotonic() - started >= grace
        if os.path.exists(error) or stopped:
            # One more look: the pusher may have finished it and exited just now.
            return True if take_ok(wal_path) else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.005)


SPAWN_GRACE = 5.0  # seconds a just started pusher has to take its lock (its imports)


def push_fast(
    wal_path: str | os.PathLike[str], env_file: str | None, timeout: float
) -> bool | None:
    """wal-push's fast path: True when the pusher acknowledged ``wal_path`` (consumed).

    Starts a pusher when none runs (it loads the settings itself, and exits at once, leaving
    the ``sync-mode`` marker, when BACKUP_WAL_ASYNC is off). None whenever this cannot settle
    it: not a pg_wal folder, synchronous mode, an error to report, the time is up.
    """
    pg_wal = os.path.dirname(os.fspath(wal_path))
    if not os.path.isdir(_join(pg_wal, "archive_status")):
        return None
    spool = spool_of(wal_path)
    try:
        os.mkdir(spool, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    if not private_folder(spool):
        return None
    if take_ok(wal_path):
        return True
    if os.path.exists(_join(spool, SYNC)):
        return None
    grace = 0.0
    name = os.path.basename(os.fspath(wal_path))
    if not pusher_running(spool) and not os.path.exists(_join(spool, name + ERROR)):
        start_pusher(pg_wal, env_file)
        grace = SPAWN_GRACE
    return wait_for_ok(wal_path, timeout, grace)


def start_pusher(pg_wal: str | os.PathLike[str], env_file: str | None) -> None:
    """Start a detached pusher for ``pg_wal`` (it exits at once if one already runs)."""
    import sys

    folder = os.path.abspath(os.fspath(pg_wal))
    log_path = _join(folder, SPOOL, LOG)
    try:
        if os.stat(log_path).st_size > 1024 * 1024:
            os.unlink(log_path)
    except OSError:
        pass
    argv = [sys.executable, "-m", "pgkeeper.wal_async", "--pg-wal", folder]
    if env_file is not None:
        argv += ["--env-file", os.path.abspath(env_file)]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        spawn_detached(argv, os.path.dirname(folder), fd)
    finally:
        os.close(fd)


def spawn_detached(
    argv: list[str], cwd: str | os.PathLike[str], log_fd: int, env: dict[str, str] | None = None
) -> None:
    """Start a background helper in its own session (it outlives the wal-push or wal-fetch
    that starts it: PostgreSQL only waits for that one). A thread reaps it, so a long-lived
    caller (a Prefect worker running restore tests) keeps no zombie."""
    import subprocess
    import threading

    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
        start_new_session=True, env=env,
    )  # fmt: skip
    threading.Thread(target=proc.wait, daemon=True, name="pgkeeper-reap").start()


# --- restores: the prefetch folder ---------------------------------------------------------------

PREFETCH = "prefetch"
FETCH_LOCK = "fetch.lock"
WANT = ".want"
MISSING = ".missing"
MISSING_FRESH = 10.0  # seconds a prefetcher's "not in the archive" answer is trusted


def prefetch_of(dest: str | os.PathLike[str]) -> str:
    """The prefetch folder beside ``dest`` (``pg_wal/RECOVERYXLOG`` -> pg_wal/.pgkeeper/...)."""
    return _join(os.path.dirname(os.fspath(dest)), SPOOL, PREFETCH)


def take_prefetched(name: str, dest: str | os.PathLike[str]) -> bool:
    """Move the prefetched ``name`` to ``dest`` (one rename); False when it is not there."""
    try:
        os.replace(_join(prefetch_of(dest), name), dest)
    except FileNotFoundError:
        return False
    return True


def _fresh(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < MISSING_FRESH
    except OSError:
        return False


def wait_prefetched(name: str, dest: str | os.PathLike[str], timeout: float) -> bool | None:
    """Ask the running prefetcher for ``name`` and wait for it. True: it is at ``dest``.
    False: the prefetcher just found it is not in the archive (and no gap: ``wal.fetch``
    decided). None: no prefetcher, an error, or the time is up: the full path decides."""
    folder = prefetch_of(dest)
    if not (private_folder(os.path.dirname(folder)) and private_folder(folder)):
        return None
    if take_prefetched(name, dest):
        return True
    missing = _join(folder, name + MISSING)
    if _fresh(missing):
        return False
    lock = _join(folder, FETCH_LOCK)
    if not pusher_running_at(lock):
        return None
    try:
        with open(_join(folder, name + WANT), "a"):
            pass
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        if take_prefetched(name, dest):
            return True
        if _fresh(missing):
            return False
        if os.path.exists(_join(folder, name + ERROR)) or not pusher_running_at(lock):
            return True if take_prefetched(name, dest) else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
