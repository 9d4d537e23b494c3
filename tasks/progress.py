"""A progress artifact for long work (a dump), updated from the core's progress callback.

The core calls ``progress(n)`` for every chunk (1 MiB); this turns that into at most one API
update per second. The total is an estimate (a dump's size is only known at its end): the raw
size of this database's previous backup, else the database's on-disk size; the bar stops at
99% until the work is done. A failed update is logged and ignored: a progress bar must never
fail a backup.
"""

from __future__ import annotations

import time
from types import TracebackType

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from pgkeeper import catalog, postgres
from pgkeeper.postgres import ConnInfo
from pgkeeper.storage import Storage

MIB = 1024 * 1024
MIN_INTERVAL = 1.0  # seconds between two updates of the artifact


def expected_dump_size(storages: list[Storage], url: str) -> int | None:
    """Bytes the next dump of ``url`` will probably write.

    Connection errors propagate: they are the backup's own errors (a transient one is retried).
    """
    conn = ConnInfo.parse(url)
    for entry in catalog.list_all(storages[:1]):
        manifest = entry.manifest
        same = manifest.database == conn.dbname and manifest.server == conn.server
        if same and manifest.raw_size:
            return manifest.raw_size
    with postgres.connect(conn) as connection:
        row = connection.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else None


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class ProgressArtifact:
    """Callable progress sink: ``with ProgressArtifact("backup-progress", total) as p: p(n)``."""

    def __init__(self, key: str, what: str, total: int | None) -> None:
        self.key = key
        self.what = what
        self.total = total
        self.done = 0
        self._last = 0.0
        self._final: str | None = None
        self._id = create_progress_artifact(progress=0.0, key=key, description=self._text())

    def finish(self, description: str) -> None:
        """The text the bar ends with at 100% (the final figures, not the last estimate)."""
        self._final = description

    def _text(self) -> str:
        if self._final is not None:
            return self._final
        about = f" of about {human_size(self.total)}" if self.total else ""
        return f"{self.what}: {human_size(self.done)}{about}"

    def _percent(self) -> float:
        if not self.total:
            return 0.0
        return min(99.0, 100.0 * self.done / self.total)

    def _update(self, percent: float) -> None:
        try:
            update_progress_artifact(self._id, progress=percent, description=self._text())
        except Exception as exc:  # a progress bar never fails the work
            get_run_logger().debug("progress artifact update failed: %s", exc)

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if now - self._last >= MIN_INTERVAL:
            self._last = now
            self._update(self._percent())

    def __enter__(self) -> ProgressArtifact:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            if self._final is None:
                self._final = f"{self.what}: {human_size(self.done)}, done"
            self._update(100.0)
        else:
            self._final = f"{self.what}: {human_size(self.done)}, then it failed"
            self._update(self._percent())
