"""The background WAL pusher, and ``wal-push``'s full path (see ``pgkeeper.wal_spool``).

``archive(settings, path)`` is what ``wal-push`` does when the fast path could not settle it:
with ``BACKUP_WAL_ASYNC`` on and ``path`` inside a ``pg_wal`` folder it starts the pusher if
none runs and waits for the acknowledgement of its file; otherwise it archives the file itself.
Either way it returns only when the file is durably stored on the primary target with its
checksum, and raises the pusher's error otherwise.

The pusher (``python -m pgkeeper.wal_async --pg-wal DIR``) holds the spool's lock for its
whole life (a second one exits at once), opens the targets once, and loops: every ready file
(``archive_status/*.ready``, history files first, then in name order) without a status file
is archived by one of ``BACKUP_WAL_PUSH_WORKERS`` threads (zstd and sha256 release the GIL),
at most ``AHEAD`` files in flight; with BACKUP_ENCRYPTION_RECIPIENTS set each is encrypted
(age) there too, so ``wal-push`` itself never does more than before (the recipients are parsed
once, when the pusher starts). Each archived file is then copied to the offsite targets
(best effort: a failure is logged and ``pgkeeper upload`` or the upload flow makes the copy
later; the acknowledgement never waits for it). The pusher exits after
``BACKUP_WAL_PUSHER_IDLE`` seconds without work, or at once when its pg_wal folder is gone.
It also exits (after the files in flight) within a second of its ``--env-file`` changing: a
busy server never leaves it idle, and a setting such as BACKUP_ENCRYPTION_RECIPIENTS must
apply from the next file on, so the next ``wal-push`` starts a pusher with the new settings.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pgkeeper import crypto, wal, wal_spool
from pgkeeper.errors import ArchiveError, PgkeeperError
from pgkeeper.settings import Settings, env_file, load_settings, use_env_file
from pgkeeper.storage import Storage, targets

log = logging.getLogger("pgkeeper.wal_async")

AHEAD = 16  # files in flight at most: bounds memory (one compressed spool each) and work
SCAN_PAUSE = 0.02  # seconds between looks at archive_status while there is work
IDLE_PAUSE = 0.1
SPAWN_EVERY = 1.0  # seconds between two attempts of one wal-push to start a pusher
SETTINGS_CHECK = 1.0  # seconds between two looks at the env file for a change


def _archive_status(pg_wal: Path) -> Path:
    return pg_wal / "archive_status"


def archive(settings: Settings, path: Path) -> wal.PushResult | None:
    """Archive ``path`` on the primary target, through the pusher when it applies.

    Returns the push result when this process archived the file itself, None when the pusher
    did. Raises ArchiveError (with the pusher's message) or the push's own errors.
    """
    pg_wal = path.parent
    if _archive_status(pg_wal).is_dir():
        _mark_mode(pg_wal / wal_spool.SPOOL, settings.backup_wal_async)
        if settings.backup_wal_async:
            _through_pusher(settings, path)
            return None
    recipients = crypto.recipients_of(settings)  # a bad key list fails before anything
    primary = targets(settings)[0]
    return wal.push(
        primary,
        path,
        system_id=_system_id_for(path),
        level=settings.backup_wal_compression_level,
        recipients=recipients,
    )


def _mark_mode(spool: Path, asynchronous: bool) -> None:
    """Keep the ``sync-mode`` marker in step with BACKUP_WAL_ASYNC (the fast path reads it)."""
    marker = spool / wal_spool.SYNC
    if asynchronous:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
    elif spool.is_dir() and not marker.exists():
        marker.touch()


def _system_id_for(path: Path) -> int | None:
    """The system identifier for a history or backup file: pg_control of the data folder."""
    if wal.kind_of(path.name) in ("segment", "partial"):
        return None  # a segment carries its own
    return wal.system_id_from_control(path.resolve().parent.parent)


def _through_pusher(settings: Settings, path: Path) -> None:
    spool = Path(wal_spool.spool_of(path))
    spool.mkdir(mode=0o700, exist_ok=True)
    if not wal_spool.private_folder(spool):
        raise ArchiveError(f"{spool} is not a folder of this user: remove it (it holds no WAL)")
    deadline = time.monotonic() + settings.backup_wal_push_timeout
    last_spawn = 0.0
    while True:
        if wal_spool.take_ok(path):
            return
        error = wal_spool.take_error(path)
        if error is not None:
            raise ArchiveError(f"{path.name}: {error}")
        if not wal_spool.pusher_running(spool) and time.monotonic() - last_spawn > SPAWN_EVERY:
            chosen = env_file()
            wal_spool.start_pusher(path.parent, str(chosen) if chosen else None)
            last_spawn = time.monotonic()
        if time.monotonic() > deadline:
            raise ArchiveError(
                f"{path.name} was not archived within {settings.backup_wal_push_timeout:.0f}s "
                f"(BACKUP_WAL_PUSH_TIMEOUT); see {spool / wal_spool.LOG}"
            )
        if wal_spool.wait_for_ok(path, 5.0):
            return


class Pusher:
    """Archives a pg_wal folder's ready files ahead of PostgreSQL; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        pg_wal: Path,
        storages: list[Storage],
        env_file: Path | None = None,
        env_seen: tuple[int, int, int] | None = None,
    ) -> None:
        self.settings = settings
        self.env_file = env_file  # what the settings were read from, as it was then
        self._env_seen = env_seen if env_seen is not None else _signature(env_file)
        self.pg_wal = pg_wal
        self.spool = pg_wal / wal_spool.SPOOL
        self.primary = storages[0]
        self.offsite = storages[1:]
        self.recipients = crypto.recipients_of(settings)  # parsed once, used by every thread
        self.data_dir = pg_wal.parent
        self.pool = ThreadPoolExecutor(
            max_workers=settings.backup_wal_push_workers, thread_name_prefix="pgkeeper-wal"
        )
        self.in_flight: dict[str, Future[None]] = {}
        # name -> fingerprint of what this pusher archived: after a wal-push took the .ok,
        # the file stays ready until PostgreSQL notes it archived; archiving it again then
        # would only cost a read and a compression, so the .ok is written again instead.
        self.archived: dict[str, str] = {}
        self._system_id: int | None = None

    def system_id(self) -> int:
        if self._system_id is None:
            self._system_id = wal.system_id_from_control(self.data_dir)
        return self._system_id

    def ready(self) -> list[str]:
        """Ready WAL file names, history files first, then in name (= WAL) order."""
        try:
            names = [
                entry.name[: -len(".ready")]
                for entry in os.scandir(_archive_status(self.pg_wal))
                if entry.name.endswith(".ready")
            ]
        except FileNotFoundError:
            return []
        names = [n for n in names if wal_spool.looks_like_wal(n)]
        return sorted(names, key=lambda n: (not n.endswith(".history"), n))

    def _has_status(self, name: str) -> bool:
        return any(
            (self.spool / (name + suffix)).exists() for suffix in (wal_spool.OK, wal_spool.ERROR)
        )

    def _acknowledge_again(self, name: str) -> bool:
        """Write the .ok of a file this pusher archived, if its bytes are unchanged."""
        known = self.archived.get(name)
        if known is None:
            return False
        try:
            same = wal_spool.fingerprint(self.pg_wal / name) == known
        except OSError:
            same = False
        if not same:
            del self.archived[name]
            return False
        wal_spool.write_status(self.spool, name, wal_spool.OK, known + "\n")
        return True

    def push_one(self, name: str) -> None:
        path = self.pg_wal / name
        try:
            before = wal_spool.fingerprint(path)
            system_id = None if wal.kind_of(name) in ("segment", "partial") else self.system_id()
            result = wal.push(
                self.primary,
                path,
                system_id=system_id,
                level=self.settings.backup_wal_compression_level,
                recipients=self.recipients,
            )
            if wal_spool.fingerprint(path) != before:
                raise ArchiveError(f"{path} changed while it was archived (retry)")
        except PgkeeperError as exc:
            log.error("%s: %s", name, exc.message)
            wal_spool.write_status(self.spool, name, wal_spool.ERROR, exc.message + "\n")
            return
        except Exception as exc:  # the last line of defence: PostgreSQL must hear of it
            log.exception("%s: unexpected error", name)
            wal_spool.write_status(
                self.spool, name, wal_spool.ERROR, f"unexpected {type(exc).__name__}: {exc}\n"
            )
            return
        wal_spool.write_status(self.spool, name, wal_spool.OK, before + "\n")
        self.archived[name] = before
        log.info("%s archived (%s)", name, "already there" if result.already else result.key)
        self._copy_offsite(result)

    def _copy_offsite(self, result: wal.PushResult) -> None:
        for dest in self.offsite:
            try:
                wal.copy(self.primary, dest, result.key, result.stored_sha256 or None)
            except PgkeeperError as exc:
                log.warning(
                    "%s: copy to %s failed (%s); 'pgkeeper upload' copies it later",
                    result.name,
                    dest.url,
                    exc.message,
                )

    def sweep(self, ready: set[str]) -> None:
        """Remove status files of WAL that is no longer ready (archived, or gone)."""
        for entry in os.scandir(self.spool):
            for suffix in (wal_spool.OK, wal_spool.ERROR):
                if entry.name.endswith(suffix):
                    name = entry.name[: -len(suffix)]
                    if name not in ready and name not in self.in_flight:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
        for name in [n for n in self.archived if n not in ready]:
            del self.archived[name]

    def settings_changed(self) -> bool:
        """Whether the env file the settings came from was changed (or removed) since."""
        return self.env_file is not None and _signature(self.env_file) != self._env_seen

    def run(self) -> None:
        idle_since = time.monotonic()
        last_sweep = last_check = 0.0
        while self.pg_wal.is_dir():
            if time.monotonic() - last_check > SETTINGS_CHECK:
                last_check = time.monotonic()
                if self.settings_changed():
                    log.info("%s changed: exiting, the next wal-push starts a pusher with it",
                             self.env_file)  # fmt: skip
                    break
            for name, future in list(self.in_flight.items()):
                if future.done():
                    del self.in_flight[name]
            ready = self.ready()
            todo = [n for n in ready if n not in self.in_flight and not self._has_status(n)]
            todo = [n for n in todo if not self._acknowledge_again(n)]
            for name in todo[: max(0, AHEAD - len(self.in_flight))]:
                self.in_flight[name] = self.pool.submit(self.push_one, name)
            now = time.monotonic()
            if now - last_sweep > 5.0:
                self.sweep(set(ready))
                last_sweep = now
            if self.in_flight or todo:
                idle_since = now
                time.sleep(SCAN_PAUSE)
                continue
            if now - idle_since >= self.settings.backup_wal_pusher_idle:
                break
            time.sleep(IDLE_PAUSE)
        self.pool.shutdown(wait=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m pgkeeper.wal_async --pg-wal DIR [--env-file FILE]``: run one pusher."""
    parser = argparse.ArgumentParser(prog="pgkeeper-wal-pusher")
    parser.add_argument("--pg-wal", required=True, type=Path)
    parser.add_argument("--env-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s"
    )
    spool = args.pg_wal / wal_spool.SPOOL
    spool.mkdir(mode=0o700, exist_ok=True)
    lock_fd = os.open(spool / wal_spool.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another pusher serves this folder
    try:
        seen = _signature(args.env_file)  # before reading it: a change while reading is seen
        if args.env_file is not None:
            use_env_file(args.env_file)
        settings = load_settings()
        _mark_mode(spool, settings.backup_wal_async)
        if not settings.backup_wal_async:
            return 0  # synchronous: each wal-push archives its own file (the marker says so)
        pusher = Pusher(settings, args.pg_wal, targets(settings), args.env_file, seen)
        log.info("pusher started for %s -> %s", args.pg_wal, pusher.primary.url)
        pusher.run()
        log.info("pusher idle: exiting")
    except PgkeeperError as exc:
        log.error("pusher cannot run: %s", exc.message)
        # Every waiting wal-push hears why, instead of timing out.
        for name in _ready_names(args.pg_wal):
            wal_spool.write_status(spool, name, wal_spool.ERROR, exc.message + "\n")
        return 1
    finally:
        os.close(lock_fd)
    return 0


def _signature(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a changed file: inode (an editor's rename), size and modification time."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _ready_names(pg_wal: Path) -> list[str]:
    try:
        return [
            e.name[: -len(".ready")]
            for e in os.scandir(_archive_status(pg_wal))
            if e.name.endswith(".ready") and wal_spool.looks_like_wal(e.name[: -len(".ready")])
        ]
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
