"""Streaming: a client process's stdout -> compress -> (encrypt) -> sha256 -> storage writer,
and back.

Memory is bounded by one chunk (1 MiB) plus the compressor's window and one age chunk (64 KiB),
whatever the database size; nothing uncompressed or unencrypted touches disk. The sha256 is of
the stored (compressed, encrypted) bytes, so ``sha256sum`` on the stored file reproduces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import subprocess
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

import zstandard

from pgkeeper import crypto
from pgkeeper.errors import DumpError, IdentityError, VerificationError
from pgkeeper.manifest import StoredObject
from pgkeeper.storage.base import CHUNK, Writer

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of new bytes handled

# zstd 2: measured on realistic data (bench/), it keeps up with one server process's COPY on
# one core and still stores ~10% less than pg_dump -Fc's gzip; zstd 3 falls behind the dump and
# zstd 1 is only level with gzip's size. See docs/benchmarks.md.
DEFAULT_LEVEL = {"zstd": 2, "gzip": 6, "none": 0}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


class Codec(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def make_compressor(kind: str, level: int | None = None, threads: int = 1) -> Codec:
    """A streaming compressor. ``threads`` 1 compresses in the calling thread; N > 1 gives zstd
    N worker threads; 0 means one worker per core."""
    if kind == "zstd":
        workers = threads or (os.cpu_count() or 1)
        # On two cores the server's COPY takes one core and pg_dump plus this loop the other:
        # worker threads then only compete for it and cost ~100 MB of buffers (bench/), so the
        # default is in-thread. Machines with spare cores can raise BACKUP_COMPRESSION_THREADS.
        compressor = zstandard.ZstdCompressor(
            level=DEFAULT_LEVEL["zstd"] if level is None else level,
            threads=workers if workers > 1 else 0,
            write_checksum=True,
        )
        return compressor.compressobj()
    if kind == "gzip":
        return zlib.compressobj(
            DEFAULT_LEVEL["gzip"] if level is None else level, zlib.DEFLATED, 31
        )
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown compression {kind!r}")


class Decoder:
    """Streaming decompression of zstd / gzip / none, across concatenated frames/members.

    ``finish()`` raises VerificationError when the stream ends inside a frame (truncation).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._obj: object | None = None
        self._started = False

    def _new(self) -> object:
        if self.kind == "zstd":
            return zstandard.ZstdDecompressor().decompressobj()
        return zlib.decompressobj(31)

    def decompress(self, data: bytes) -> bytes:
        if self.kind == "none":
            return data
        out: list[bytes] = []
        try:
            while data:
                if self._obj is None:
                    self._obj = self._new()
                    self._started = True
                out.append(self._obj.decompress(data))  # type: ignore[attr-defined]
                if self._obj.eof:  # type: ignore[attr-defined]
                    data = self._obj.unused_data  # type: ignore[attr-defined]
                    self._obj = None
                else:
                    data = b""
        except (zstandard.ZstdError, zlib.error) as exc:
            raise VerificationError(
                f"the {self.kind} stream is corrupt ({exc})", check="compression"
            ) from exc
        return b"".join(out)

    def finish(self) -> None:
        if self.kind == "none":
            return
        if self._obj is not None or not self._started:
            raise VerificationError(
                f"the {self.kind} stream is truncated (it ends inside a frame)", check="compression"
            )


@dataclass
class StreamResult:
    size: int  # bytes stored
    raw_size: int  # bytes read from the source, before compression
    sha256: str  # of the stored bytes


def compress_stream(
    read: Callable[[int], bytes],
    out: Writer,
    compression: str,
    level: int | None = None,
    threads: int = 1,
    progress: Progress | None = None,
    recipients: crypto.Recipients | None = None,
) -> StreamResult:
    """Copy ``read`` to ``out`` through a compressor (and age, to ``recipients``), hashing
    what is written."""
    codec = make_compressor(compression, level, threads)
    digest = hashlib.sha256()
    size = raw = 0

    def emit(block: bytes) -> None:
        nonlocal size
        if block:
            digest.update(block)
            out.write(block)
            size += len(block)

    def compressed() -> Iterator[bytes]:
        nonlocal raw
        while chunk := read(CHUNK):
            raw += len(chunk)
            yield codec.compress(chunk)
            if progress:
                progress(len(chunk))
        yield codec.flush()

    if recipients is None:
        for block in compressed():
            emit(block)
    else:
        # age pulls the compressed blocks and pushes its 64 KiB chunks to emit: one thread.
        crypto.encrypt_stream(crypto.blocks_reader(compressed()), emit, recipients)
    return StreamResult(size, raw, digest.hexdigest())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie does not: a process that died a moment ago is
    one until its parent collects its exit status."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


PIPE_SIZE = 1 << 20  # Linux's default pipe-max-size
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _widen(fd: int) -> None:
    """Give a pipe 1 MiB of buffer instead of 64 KiB (Linux; best effort).

    With 64 KiB, pg_dump, the server and the compressor wait on each other every few rows: a
    1 MiB pipe let the backup stream run ~0.5 s (12%) faster per GB (bench/).
    """
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


class ClientProcess:
    """A pg client process whose stderr is collected (bounded) and which never outlives us.

    Used as a context manager: leaving the block by an exception terminates the process and
    waits for it, so an interrupted backup leaves no orphan ``pg_dump``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
    ) -> None:
        self.argv = list(argv)
        self.name = os.path.basename(self.argv[0])
        self._tail: deque[str] = deque(maxlen=50)
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env
            )
        except OSError as exc:
            raise DumpError(f"cannot start {self.name}: {exc} (check PG_BIN_DIR)") from exc
        for pipe in (self.proc.stdout, self.proc.stdin):
            if pipe is not None:
                _widen(pipe.fileno())
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None  # noqa: S101 - Popen was given stderr=PIPE
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._tail.append(line)
                log.debug("%s: %s", self.name, line)

    @property
    def stderr_lines(self) -> list[str]:
        return list(self._tail)

    def last_error(self) -> str:
        for line in reversed(self._tail):
            if "error" in line.lower() or "fatal" in line.lower():
                return line
        return self._tail[-1] if self._tail else f"{self.name} exited without a message"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join(timeout=5)
        return code

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.kill()
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.wait()
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()  # the drain thread is done with it


# --- reading a stored object back, verified ----------------------------------------------------


class HashingReader:
    """Reads one stored object, hashing it; ``check()`` compares with the manifest's record."""

    def __init__(
        self,
        src: IO[bytes],
        name: str,
        size: int,
        sha256: str,
        progress: Progress | None = None,
    ) -> None:
        self._src = src
        self.name = name
        self._expected = (size, sha256)
        self._digest = hashlib.sha256()
        self._size = 0
        self._progress = progress

    @classmethod
    def of(
        cls, src: IO[bytes], obj: StoredObject, progress: Progress | None = None
    ) -> HashingReader:
        """A reader checked against one manifest object's size and sha256."""
        return cls(src, obj.name, obj.size, obj.sha256, progress)

    @property
    def size(self) -> int:
        return self._size

    @property
    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def read(self, n: int = CHUNK) -> bytes:
        chunk = self._src.read(n if n >= 0 else CHUNK)
        self._digest.update(chunk)
        self._size += len(chunk)
        if self._progress and chunk:
            self._progress(len(chunk))
        return chunk

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def matches(self) -> bool:
        return (self._size, self._digest.hexdigest()) == self._expected

    def check(self) -> None:
        """Raise VerificationError (check ``checksum``) when the bytes read are not the record's."""
        if not self.matches:
            raise VerificationError(
                f"{self.name} does not match its manifest ({self._size} bytes, sha256 "
                f"{self._digest.hexdigest()[:12]}...)",
                check="checksum",
            )


def decode_verified(
    reader: HashingReader,
    compression: str,
    sink: Callable[[bytes], object],
    identity: crypto.Identity | None = None,
) -> None:
    """Feed ``sink`` the decoded bytes of a stored object (decrypted first with ``identity``
    when one is given); raise VerificationError naming the failed check if the object is
    damaged, IdentityError when the identity does not open it.

    The checksum is judged over every stored byte, so a damaged byte is reported as a checksum
    failure even when the decrypter, the decoder, or the sink (pg_restore choking on damaged
    bytes that still decode) trips over it first. Callers must not commit anything they built
    from ``sink`` before this returns.
    """
    decoder = Decoder(compression)
    plain = crypto.DecryptingReader(reader.read, identity) if identity is not None else None
    read = plain.read if plain is not None else reader.read
    try:
        try:
            while chunk := read(CHUNK):
                sink(decoder.decompress(chunk))
            decoder.finish()
        finally:
            if plain is not None:
                plain.close()  # stops decrypting: the stored bytes are read here from now on
    except IdentityError:
        raise  # the key, not the bytes: nothing to judge
    except VerificationError:
        reader.drain()  # tell a damaged byte (checksum) from a bad encoder (compression)
        reader.check()
        raise
    except Exception as exc:
        try:
            reader.drain()
        except Exception:
            raise exc from None  # the sink's error is the one to report
        reader.check()  # damaged stored bytes explain the sink's failure: say so
        raise
    reader.check()
