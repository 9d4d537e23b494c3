"""Parallel restore of a streamed custom-format archive, with no decoded copy on disk.

``pg_restore -j`` needs a seekable, uncompressed archive; a stored backup is a compressed
stream. Staging it decoded costs a full extra write and read before the first row loads, so a
custom-format restore with ``jobs`` > 1 runs in four steps instead:

1. **head**: the stream's first bytes, up to where ``pg_restore --list`` stops reading (the
   archive header and its table of contents, a few MiB at most), go to a local file;
2. **pre-data** from the head file: ``pg_restore --section=pre-data``;
3. **data**, one pass over the checksum-verified stream: ``pg_restore -L <table data> -f -``
   turns the archive into COPY blocks, whose rows are dealt in ~1 MiB runs of whole lines to
   ``jobs`` connections, each running COPY into the same table. Every table loads ``jobs``
   wide, also a database that is one big table (where ``pg_restore -j`` gains nothing). Large
   objects, if any, go through a second ``pg_restore`` fed the same stream;
4. **the rest** from the head file with ``pg_restore -j``: sequence values, indexes,
   constraints, triggers, materialized views, privileges. None of it needs data blocks.

In COPY's text format a newline inside a value is written as ``\\n``, so every raw newline ends
a row and any run of whole lines is a valid COPY input. Rows are stored in a different physical
order than the source's (as with any logical restore, nothing depends on it).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psycopg

from pgkeeper import postgres
from pgkeeper.errors import RestoreError
from pgkeeper.pipeline import ClientProcess, Decoder
from pgkeeper.postgres import ConnInfo
from pgkeeper.storage.base import CHUNK

log = logging.getLogger(__name__)

BATCH = 1 << 20  # rows are dealt to the connections in runs of about this many bytes
QUEUE_DEPTH = 4  # batches waiting per connection: bounds memory to ~jobs * 5 MiB
COPY_END = b"\\.\n"
# Lines pg_restore prints around the COPY blocks: its session settings (applied to every
# connection) and psql-only meta-commands and comments (ignored).
SETTING_PREFIXES = (b"SET ", b"SELECT pg_catalog.set_config(")
IGNORED_PREFIXES = (b"--", b"\\restrict", b"\\unrestrict")


@dataclass
class Plan:
    """Which archive entries each step restores, from ``pg_restore --list`` of the head."""

    table_data: list[str] = field(default_factory=list)  # step 3, dealt across connections
    streamed: list[str] = field(default_factory=list)  # step 3, other data that has data blocks
    rest: list[str] = field(default_factory=list)  # step 4 (pre-data entries are filtered out)


def plan(listing: str, data_listing: str) -> Plan:
    """Split an archive's entries between the steps.

    ``listing`` is ``pg_restore --list`` of the whole archive, ``data_listing`` the same
    restricted to ``--section=data``. TABLE DATA entries are loaded by the connections;
    sequence values carry their SQL in the table of contents; any other data entry (large
    objects) needs its data blocks, so it is restored from the stream by pg_restore itself.
    """
    result = Plan()
    data_ids = {_dump_id(line) for line in data_listing.splitlines() if _dump_id(line)}
    for line in listing.splitlines():
        dump_id = _dump_id(line)
        if dump_id is None:
            continue
        kind = _entry_kind(line)
        if dump_id in data_ids and kind.startswith("TABLE DATA "):
            result.table_data.append(line)
        elif dump_id in data_ids and not kind.startswith("SEQUENCE SET "):
            result.streamed.append(line)
        else:
            result.rest.append(line)
    return result


def _dump_id(line: str) -> str | None:
    head, sep, _ = line.partition(";")
    head = head.strip()
    return head if sep and head.isdigit() else None


def _entry_kind(line: str) -> str:
    """``3340; 0 16390 TABLE DATA bench customers postgres`` -> ``TABLE DATA bench ...``."""
    fields = line.partition(";")[2].split(maxsplit=2)
    return fields[2] if len(fields) == 3 else ""


# --- step 1: the head ------------------------------------------------------------------------


class Readable(Protocol):
    """What ``capture_head`` reads from: a stored object, or its decrypted stream."""

    def read(self, n: int = -1, /) -> bytes: ...


def capture_head(
    src: Readable, compression: str, dest: Path, pg_restore: str, env: dict[str, str]
) -> str:
    """Decode ``src`` into ``dest`` until ``pg_restore --list`` has read the archive's whole
    table of contents; return its listing. (Unverified bytes: the data pass checks every
    stored byte before the restored database is kept.)"""
    decoder = Decoder(compression)
    listing = dest.with_suffix(".list")
    with (
        open(listing, "wb") as out,
        open(dest, "wb") as head,
        ClientProcess([pg_restore, "--list"], env, stdin=subprocess.PIPE, stdout=out) as proc,
    ):
        stdin = proc.proc.stdin
        assert stdin is not None  # noqa: S101 - stdin=PIPE
        while proc.proc.poll() is None and (raw := src.read(CHUNK)):
            data = decoder.decompress(raw)
            head.write(data)
            try:
                stdin.write(data)
                stdin.flush()
            except BrokenPipeError:
                break  # it read what it needed and exited
        with contextlib.suppress(BrokenPipeError):
            stdin.close()
        if proc.wait() != 0:
            raise RestoreError(f"pg_restore --list failed: {proc.last_error()}")
    return listing.read_text("utf-8", "replace")


# --- step 3: the data ------------------------------------------------------------------------

_ABORT = object()


class _Aborted(Exception):
    pass


class _Connection(threading.Thread):
    """One COPY connection. Its queue holds, per table: the COPY statement, batches of rows,
    then None; ``abort()`` abandons the COPY in flight."""

    def __init__(self, conn: ConnInfo, dbname: str, settings: list[str]) -> None:
        super().__init__(daemon=True, name="pgkeeper-copy")
        self.queue: queue.Queue[object] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.error: BaseException | None = None
        self.aborted = False
        self.finished = False
        self._db = postgres.connect(conn, dbname=dbname)
        for statement in settings:
            self._db.execute(statement.encode())  # pg_restore's own session settings
        # Durability comes from the final swap's commit: rows of a scratch database that is
        # never swapped in need no WAL flush of their own.
        self._db.execute("SET synchronous_commit = off")

    def run(self) -> None:
        try:
            while (statement := self._next()) is not None:
                with self._db.cursor().copy(str(statement).encode()) as copy:
                    while (batch := self._next()) is not None:
                        copy.write(batch)  # type: ignore[arg-type]
            self.finished = True
        except _Aborted:
            pass
        except BaseException as exc:  # the dealer reports it
            self.error = exc

    def _next(self) -> object:
        item = self.queue.get()
        if self.aborted or item is _ABORT:
            raise _Aborted
        return item

    def abort(self) -> None:
        self.aborted = True
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_ABORT)  # wakes it if it waits; if full, it is busy

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._db.close()


class TableDealer:
    """Reads pg_restore's COPY blocks and deals their rows to ``jobs`` connections.

    Connections open at the first row, with the session settings pg_restore printed before
    it (client encoding, row security off, ...). Each table's rows go round-robin in ~1 MiB
    batches, so a small table loads on one connection while the next one starts on another.
    """

    def __init__(self, conn: ConnInfo, dbname: str, jobs: int) -> None:
        self._conn_info = conn
        self._dbname = dbname
        self._jobs = jobs
        self._settings: list[str] = []
        self._copy_head: bytes | None = None
        self.connections: list[_Connection] = []
        self._turn = 0
        self.tables = 0

    def run(self, read: Callable[[int], bytes]) -> None:
        """Consume pg_restore's output (``read``) to its end."""
        buf = b""
        long_row: list[bytes] = []  # pieces of a row longer than a read, joined once
        statement: str | None = None
        started: set[int] = set()  # connections in a COPY of the current table
        eof = False
        while not eof:
            data = read(BATCH)
            eof = not data
            if not eof and b"\n" not in data:
                long_row.append(data)
                continue
            if long_row:
                data, long_row = b"".join([*long_row, data]), []
            buf = buf + data if buf else data
            while True:
                if statement is None:
                    newline = buf.find(b"\n")
                    if newline < 0:
                        break
                    statement = self._outside_copy(buf[:newline])
                    buf = buf[newline + 1 :]
                    started = set()
                    continue
                end = _copy_end(buf)
                if end is not None:
                    if end:
                        self._deal(statement, buf[:end], started)
                    for index in started:
                        self._put(index, None)
                    buf = buf[end + len(COPY_END) :]
                    statement = None
                    self.tables += 1
                    continue
                cut = buf.rfind(b"\n")
                if cut < 0 or (len(buf) < BATCH and not eof):
                    break
                self._deal(statement, buf[: cut + 1], started)
                buf = buf[cut + 1 :]
        if statement is not None or self._copy_head is not None or buf.strip():
            raise RestoreError("pg_restore's output ended inside a COPY block (truncated archive?)")

    def _outside_copy(self, raw: bytes) -> str | None:
        """Handle one line outside the COPY blocks; return the COPY statement it starts."""
        line = raw.rstrip(b"\r")
        if self._copy_head is not None:  # a quoted identifier held a newline
            line, self._copy_head = self._copy_head + b"\n" + line, None
        if line.startswith(b"COPY "):
            if line.endswith(b" FROM stdin;"):
                return line.decode("utf-8")
            self._copy_head = line
            return None
        if not line or line.startswith(IGNORED_PREFIXES):
            return None
        if line.startswith(SETTING_PREFIXES):
            if not self.connections:
                self._settings.append(line.decode("utf-8"))
            else:  # e.g. default_tablespace: it only matters to CREATE, not to COPY
                log.debug("ignored between COPY blocks: %s", line[:200])
            return None
        raise RestoreError(
            f"unexpected line in pg_restore's data output: {line[:80]!r} "
            "(restore with --jobs 1, and please report it)"
        )

    def _deal(self, statement: str, rows: bytes, started: set[int]) -> None:
        if not self.connections:
            for _ in range(self._jobs):
                connection = _Connection(self._conn_info, self._dbname, self._settings)
                self.connections.append(connection)
                connection.start()
        index = self._turn % len(self.connections)
        self._turn += 1
        if index not in started:
            started.add(index)
            self._put(index, statement)
        self._put(index, rows)

    def _put(self, index: int, item: object) -> None:
        connection = self.connections[index]
        while True:
            self.check()
            try:
                connection.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        """Raise RestoreError if a connection failed."""
        for connection in self.connections:
            if connection.error is not None:
                raise RestoreError(f"loading table data failed: {_first_line(connection.error)}")
            if not connection.is_alive() and not (connection.finished or connection.aborted):
                raise RestoreError("a COPY connection stopped unexpectedly")

    def finish(self, ok: bool) -> None:
        """End every connection and wait for it; ``ok`` False abandons COPYs in flight."""
        for connection in self.connections:
            if ok:
                self._put(self.connections.index(connection), None)
            else:
                connection.abort()
        for connection in self.connections:
            connection.join(timeout=None if ok else 30)
            connection.close()
        if ok:
            self.check()


def _copy_end(buf: bytes) -> int | None:
    """Offset of the line ``\\.`` that ends a COPY block in ``buf``, if it is there."""
    if buf.startswith(COPY_END):
        return 0
    at = buf.find(b"\n" + COPY_END)
    return None if at < 0 else at + 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
