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
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

SPOOL = ".pgkeeper"
LOCK = "push.lock"
SYNC = "sync-mode"  # written while BACKUP_WAL_ASYNC is off: the fast path then starts nothing
LOG = "pusher.log"
OK = ".ok"
ERROR = ".error"
_HEX = frozenset("0123456789ABCDEF")


def spool_of(wal_path: Path) -> Path:
    """The spool folder of the pg_wal folder holding ``wal_path``."""
    return wal_path.parent / SPOOL


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


def private_folder(path: Path) -> bool:
    """True when ``path`` is a real folder (not a link) owned by this user."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def fingerprint(path: Path) -> str:
    """What an acknowledgement is bound to: the file's inode, size and modification time."""
    st = os.stat(path)
    return f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"


def write_status(spool: Path, name: str, suffix: str, text: str) -> None:
    """Atomically write ``<name><suffix>`` (``.ok`` or ``.error``) in the spool."""
    final = spool / (name + suffix)
    temp = spool / f".{name}{suffix}.{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temp, final)


def take_ok(wal_path: Path) -> bool:
    """Consume the acknowledgement of ``wal_path`` if there is one for these very bytes.

    An acknowledgement of other bytes under that name (a stale one) is removed and False is
    returned, so the caller has the file archived again.
    """
    ok = spool_of(wal_path) / (wal_path.name + OK)
    try:
        recorded = ok.read_text(encoding="utf-8").split("\n", 1)[0].strip()
    except OSError:
        return False
    try:
        current = fingerprint(wal_path)
    except OSError:
        current = ""
    try:
        os.unlink(ok)
    except FileNotFoundError:
        return False  # another wal-push took it first: let the caller check again
    return recorded == current


def take_error(wal_path: Path) -> str | None:
    """Consume the pusher's error for ``wal_path``: its one-line message, or None."""
    error = spool_of(wal_path) / (wal_path.name + ERROR)
    try:
        text = error.read_text(encoding="utf-8").strip()
        os.unlink(error)
    except OSError:
        return None
    return text.splitlines()[0] if text else "the background pusher failed (no message)"


def pusher_running(spool: Path) -> bool:
    """Whether a pusher holds the spool's lock (checked without taking it for long)."""
    return pusher_running_at(spool / LOCK)


def pusher_running_at(lock: Path) -> bool:
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


def wait_for_ok(wal_path: Path, timeout: float, grace: float = 0.0) -> bool | None:
    """Wait while a pusher runs for the acknowledgement of ``wal_path``.

    True: acknowledged (consumed). None: there is an error file, no pusher runs (after
    ``grace`` seconds, the time a just started one needs to take its lock), or the time is
    up: the caller decides. Never raises for a missing spool.
    """
    spool = spool_of(wal_path)
    if not private_folder(spool):
        return None
    started = time.monotonic()
    deadline = started + timeout
    pause = 0.002
    while True:
        if take_ok(wal_path):
            return True
        stopped = not pusher_running(spool) and time.monotonic() - started >= grace
        if (spool / (wal_path.name + ERROR)).exists() or stopped:
            # One more look: the pusher may have finished it and exited just now.
            return True if take_ok(wal_path) else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


SPAWN_GRACE = 5.0  # seconds a just started pusher has to take its lock (its imports)


def push_fast(wal_path: Path, env_file: str | None, timeout: float) -> bool | None:
    """wal-push's fast path: True when the pusher acknowledged ``wal_path`` (consumed).

    Starts a pusher when none runs (it loads the settings itself, and exits at once, leaving
    the ``sync-mode`` marker, when BACKUP_WAL_ASYNC is off). None whenever this cannot settle
    it: not a pg_wal folder, synchronous mode, an error to report, the time is up.
    """
    if not (wal_path.parent / "archive_status").is_dir():
        return None
    spool = spool_of(wal_path)
    try:
        spool.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    if not private_folder(spool):
        return None
    if take_ok(wal_path):
        return True
    if (spool / SYNC).exists():
        return None
    grace = 0.0
    if not pusher_running(spool) and not (spool / (wal_path.name + ERROR)).exists():
        start_pusher(wal_path.parent, env_file)
        grace = SPAWN_GRACE
    return wait_for_ok(wal_path, timeout, grace)


def start_pusher(pg_wal: Path, env_file: str | None) -> None:
    """Start a detached pusher for ``pg_wal`` (it exits at once if one already runs)."""
    import sys

    spool = pg_wal / SPOOL
    log_path = spool / LOG
    try:
        if log_path.stat().st_size > 1024 * 1024:
            log_path.unlink()
    except OSError:
        pass
    argv = [sys.executable, "-m", "pgkeeper.wal_async", "--pg-wal", str(pg_wal.absolute())]
    if env_file is not None:
        argv += ["--env-file", str(Path(env_file).absolute())]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        spawn_detached(argv, pg_wal.absolute().parent, fd)
    finally:
        os.close(fd)


# --- restores: the prefetch folder ---------------------------------------------------------------

PREFETCH = "prefetch"
FETCH_LOCK = "fetch.lock"
WANT = ".want"
MISSING = ".missing"


def prefetch_of(dest: Path) -> Path:
    """The prefetch folder beside ``dest`` (``pg_wal/RECOVERYXLOG`` -> pg_wal/.pgkeeper/...)."""
    return dest.parent / SPOOL / PREFETCH


def take_prefetched(name: str, dest: Path) -> bool:
    """Move the prefetched ``name`` to ``dest`` (one rename); False when it is not there."""
    try:
        os.replace(prefetch_of(dest) / name, dest)
    except FileNotFoundError:
        return False
    return True


MISSING_FRESH = 10.0  # seconds a prefetcher's "not in the archive" answer is trusted


def _fresh(path: Path) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < MISSING_FRESH
    except OSError:
        return False


def wait_prefetched(name: str, dest: Path, timeout: float) -> bool | None:
    """Ask the running prefetcher for ``name`` and wait for it. True: it is at ``dest``.
    False: the prefetcher just found it is not in the archive (and no gap: ``wal.fetch``
    decided). None: no prefetcher, an error, or the time is up: the full path decides."""
    folder = prefetch_of(dest)
    if not (private_folder(folder.parent) and private_folder(folder)):
        return None
    if take_prefetched(name, dest):
        return True
    missing = folder / (name + MISSING)
    if _fresh(missing):
        return False
    if not pusher_running_at(folder / FETCH_LOCK):
        return None
    want = folder / (name + WANT)
    try:
        want.touch()
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        if take_prefetched(name, dest):
            return True
        if _fresh(missing):
            return False
        if (folder / (name + ERROR)).exists() or not pusher_running_at(folder / FETCH_LOCK):
            return True if take_prefetched(name, dest) else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def spawn_detached(
    argv: list[str], cwd: Path, log_fd: int, env: dict[str, str] | None = None
) -> None:
    """Start a background helper in its own session (it outlives the wal-push or wal-fetch
    that starts it: PostgreSQL only waits for that one). A thread reaps it, so a long-lived
    caller (a Prefect worker running restore tests) keeps no zombie."""
    proc = subprocess.Popen(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
        start_new_session=True, env=env,
    )  # fmt: skip
    threading.Thread(target=proc.wait, daemon=True, name="pgkeeper-reap").start()
