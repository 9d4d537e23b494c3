"""The background WAL prefetcher of restores (see ``pgkeeper.wal_spool``).

``wal-fetch`` of a segment that is not prefetched fetches it itself and then starts this
process (``start_prefetcher``), which fetches the next ``AHEAD`` segments of the same
timeline into ``pg_wal/.pgkeeper/prefetch/`` with ``BACKUP_WAL_PUSH_WORKERS`` threads: each is
decrypted (an encrypted one, with BACKUP_ENCRYPTION_IDENTITY_FILE), decoded and checked
against its checksum by ``wal.fetch`` into a temporary name, then renamed in, so the folder
only ever holds verified segments (in the server's private pg_wal, as recovery would have
them anyway). A file it cannot fetch gets ``<name>.error``: ``wal-fetch`` then tries itself
and exits 126 with the reason (no identity, a wrong one, damage).

Recovery asks for segments in order; a ``wal-fetch`` asking for one not yet there writes
``<name>.want`` and the prefetcher turns to it (a switch to a new timeline moves it there).
A segment the archive lacks gets ``<name>.missing`` and nothing past it is fetched (the end of
the archive: ``wal-fetch`` then decides through the full path, which also tells a gap from
the end).

It exits after ``BACKUP_WAL_PUSHER_IDLE`` seconds without a request, removing what it
fetched and nobody took, and at once when its pg_wal folder is gone.
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

from pgkeeper import crypto, naming, wal, wal_spool
from pgkeeper.errors import PgkeeperError, WalMissingError
from pgkeeper.settings import Settings, env_file, load_settings, use_env_file
from pgkeeper.storage import Storage, targets

log = logging.getLogger("pgkeeper.wal_prefetch")

AHEAD = 8  # segments fetched ahead of recovery (128 MiB of disk at 16 MiB segments)
IDLE = 10.0  # at most this long after the last request: a finished recovery asks no more
PAUSE = 0.01


def start_prefetcher(
    dest: Path,
    after: str,
    system_id: int,
    *,
    python: str | None = None,
    owner: str | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Start a detached prefetcher for the pg_wal folder holding ``dest`` (it exits at once
    when one already runs there). ``owner``: run it as that user (``pitr restore`` as root
    starts it for the server's user before the server asks for its first segment)."""
    folder = Path(wal_spool.prefetch_of(dest))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = folder.parent / "prefetch.log"
    if owner is not None:
        import shutil

        for path in (folder.parent, folder):
            shutil.chown(path, owner, owner)
        log_path.touch(mode=0o600)
        shutil.chown(log_path, owner, owner)
    pg_wal = dest.parent.resolve()
    argv = [python or sys.executable, "-m", "pgkeeper.wal_prefetch", "--pg-wal", str(pg_wal),
            "--after", after, "--system-id", str(system_id)]  # fmt: skip
    chosen = env_file()
    if chosen is not None:
        argv += ["--env-file", str(chosen)]
    if owner is not None:
        argv = ["runuser", "-u", owner, "--", *argv]
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError:  # a log we may not write must never fail a restore_command
        fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        wal_spool.spawn_detached(argv, pg_wal.parent, fd, env)
    finally:
        os.close(fd)


class Prefetcher:
    """Keeps the next segments of recovery fetched; see the module docstring."""

    def __init__(
        self, settings: Settings, pg_wal: Path, storages: list[Storage], system_id: int
    ) -> None:
        self.settings = settings
        self.pg_wal = pg_wal
        self.folder = pg_wal / wal_spool.SPOOL / wal_spool.PREFETCH
        self.storages = storages
        self.system_id = system_id
        self.identity = crypto.identity_loader(settings)
        self.pool = ThreadPoolExecutor(
            max_workers=settings.backup_wal_push_workers, thread_name_prefix="pgkeeper-prefetch"
        )
        self.in_flight: dict[str, Future[None]] = {}
        self.fetched: set[str] = set()  # put in the folder by us (taken or not)
        self.ended = False  # the archive has nothing past the cursor

    def fetch_one(self, name: str) -> None:
        temp = self.folder / f".{name}.part"
        try:
            wal.fetch(self.storages, name, temp, system_id=self.system_id,
                      identity=self.identity)  # fmt: skip
            os.replace(temp, self.folder / name)
            self.fetched.add(name)
        except WalMissingError:
            wal_spool.write_status(self.folder, name, wal_spool.MISSING, "\n")
        except PgkeeperError as exc:
            log.error("%s: %s", name, exc.message)
            wal_spool.write_status(self.folder, name, wal_spool.ERROR, exc.message + "\n")
        finally:
            with contextlib.suppress(OSError):
                temp.unlink()

    def _wants(self) -> list[str]:
        names = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(wal_spool.WANT):
                name = entry.name[: -len(wal_spool.WANT)]
                if naming.WAL_NAME_RE.match(name) and len(name) in (24, 16):  # + histories
                    names.append(name)
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        return sorted(names)

    def _known(self, name: str) -> bool:
        if name in self.in_flight or (self.folder / name).exists():
            return True
        return any((self.folder / (name + s)).exists() for s in (wal_spool.MISSING,
                                                               wal_spool.ERROR))  # fmt: skip

    def run(self, after: str) -> None:
        cursor = after
        idle_since = time.monotonic()
        while self.pg_wal.is_dir():
            for name, future in list(self.in_flight.items()):
                if future.done():
                    del self.in_flight[name]
            wants = self._wants()
            for name in wants:  # what recovery waits for comes first
                if not self._known(name):
                    self.in_flight[name] = self.pool.submit(self.fetch_one, name)
            taken = [n for n in self.fetched if not (self.folder / n).exists()]
            for name in taken:
                self.fetched.discard(name)
            segments = [n for n in [*wants, *taken] if len(n) == 24]
            newest = max([cursor, *segments], key=self._order)
            if newest != cursor:
                cursor, self.ended = newest, False
            if wants or taken:
                idle_since = time.monotonic()
            self._ahead(cursor)
            if self.in_flight:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= min(IDLE, self.settings.backup_wal_pusher_idle):
                break
            time.sleep(PAUSE)
        self.pool.shutdown(wait=True)
        self._clean()

    @staticmethod
    def _order(name: str) -> tuple[int, int]:
        return wal.timeline_of(name), wal.segment_number(name)

    def _ahead(self, cursor: str) -> None:
        if self.ended:
            return
        timeline, number = self._order(cursor)
        for step in range(1, AHEAD + 1):
            name = wal.segment_name(timeline, number + step)
            if (self.folder / (name + wal_spool.MISSING)).exists():
                self.ended = True
                return
            if not self._known(name) and len(self.in_flight) < AHEAD:
                self.in_flight[name] = self.pool.submit(self.fetch_one, name)

    def _clean(self) -> None:
        """Remove what nobody took, and every marker."""
        for entry in os.scandir(self.folder):
            if entry.name != wal_spool.FETCH_LOCK:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def main(argv: list[str] | None = None) -> int:
    """``python -m pgkeeper.wal_prefetch --pg-wal DIR --after NAME --system-id N``."""
    parser = argparse.ArgumentParser(prog="pgkeeper-wal-prefetcher")
    parser.add_argument("--pg-wal", required=True, type=Path)
    parser.add_argument("--after", required=True)
    parser.add_argument("--system-id", required=True, type=int)
    parser.add_argument("--env-file", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(message)s"
    )
    folder = args.pg_wal / wal_spool.SPOOL / wal_spool.PREFETCH
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(folder / wal_spool.FETCH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another prefetcher serves this folder
    try:
        if args.env_file is not None:
            use_env_file(args.env_file)
        settings = load_settings()
        naming.validate_wal_name(args.after)
        prefetcher = Prefetcher(settings, args.pg_wal, targets(settings), args.system_id)
        prefetcher.run(args.after)
    except PgkeeperError as exc:
        log.error("prefetcher cannot run: %s", exc.message)
        return 1
    finally:
        os.close(lock_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
