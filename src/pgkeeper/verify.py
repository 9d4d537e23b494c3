"""Verify a stored backup: its bytes, its compression stream and its dump structure.

Checks, in order, each named in results and errors:
  ``objects``      every object of the manifest exists with the recorded size
  ``checksum``     the stored bytes hash to the manifest's sha256 (re-read, never cached)
  ``compression``  the zstd/gzip stream decodes end to end (zstd frames carry their own checksum)
  ``structure``    custom/tar/directory: ``pg_restore --file=/dev/null`` reads the whole archive,
                   every data block to its end (a cut-off dump fails here; the checksum of an
                   import only proves the bytes are the ones that came), and a tar is followed
                   header by header to its end-of-archive block; plain: the dump's header and its
                   "dump complete" trailer are there and it holds no psql meta-command outside
                   COPY data (plainsql.py; pg_dump's own \\restrict lines aside); a server's
                   globals (pg_dumpall --globals-only): the same, with the cluster dump's header
                   and trailer, and a \\connect (a full cluster dump, databases included) refused
A ``quick`` verification skips decoding beyond what the structure check needs: the archive's
table of contents (``pg_restore --list``), or a plain dump's first chunk.

An encrypted (age) backup is decrypted first when an identity is at hand (check ``decryption``:
every chunk authenticates, the last one is marked). Without one (the backup host never holds
it) only what needs no key is checked: ``objects``, ``checksum`` and ``encryption`` (each file's
age header, that its recipients are the manifest's, and a length age can produce); the
verification is recorded ``decrypted: false`` and its ``decryption`` check says it was not done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

from pgkeeper import catalog, crypto, naming, plainsql, postgres
from pgkeeper.errors import IdentityError, PgkeeperError, StorageError, VerificationError
from pgkeeper.manifest import CheckResult, Manifest, StoredObject, Verification, utcnow
from pgkeeper.pipeline import ClientProcess, Decoder, HashingReader, Progress
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK

log = logging.getLogger(__name__)

# pg_restore reading a stream needs no more than the pipe's last MiB once its input ended; one
# that runs on has met a truncated tar, on which pg_restore 15 spins forever (measured).
_PG_RESTORE_GRACE = 60.0
_TAR_BLOCK = 512


def _fail(checks: list[CheckResult], name: str, detail: str) -> None:
    checks.append(CheckResult(name=name, ok=False, detail=detail))


class _TarWalk:
    """Follows a tar stream's 512-byte headers to tell a whole archive from a cut one:
    pg_restore reading a tar from a pipe takes a member cut short for a short member (and
    exits 0), or spins at the cut. Whole means: every member to its end, then the
    end-of-archive block of zeros pg_dump writes."""

    def __init__(self) -> None:
        self._skip = 0  # bytes of member data and padding still to pass
        self._header = bytearray()
        self.member = ""
        self.ended = False
        self.error = ""

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data) and not (self.ended or self.error):
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            take = min(_TAR_BLOCK - len(self._header), len(data) - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == _TAR_BLOCK:
                self._read_header(bytes(self._header))
                self._header.clear()

    def _read_header(self, block: bytes) -> None:
        if block == bytes(_TAR_BLOCK):
            self.ended = True
            return
        stored = block[148:156].split(b"\0", 1)[0].strip()
        checksum = sum(block[:148]) + 8 * ord(" ") + sum(block[156:])  # its own field as blanks
        if not stored.isdigit() or int(stored, 8) != checksum:
            self.error = f"a damaged tar header after {self.member or 'the start'}"
            return
        self.member = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        field = block[124:136]
        if field[0] & 0x80:  # base-256, for members of 8 GiB and more
            size = int.from_bytes(field[1:], "big")
        else:
            size = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
        self._skip = -(-size // _TAR_BLOCK) * _TAR_BLOCK

    def problem(self) -> str:
        """What is wrong with the archive read so far as a whole one, or ''."""
        if self.error:
            return self.error
        if self.ended:
            return ""
        if self._skip or self._header:
            return f"the tar archive is truncated (it ends inside {self.member or 'a header'})"
        return "the tar archive is truncated (no end-of-archive block)"


class _StructureSink:
    """Receives the decoded dump stream and judges its structure.

    custom/tar: full verification feeds ``pg_restore --file=/dev/null``, which reads every data
    block to its end (``--list`` only reads the table of contents, so a cut-off dump passed);
    quick feeds ``pg_restore --list``. plain: the header and trailer, and no psql meta-command
    (plainsql.Scanner) in what is read."""

    def __init__(
        self, fmt: str, pg_restore: postgres.Client | None, full: bool, kind: str = "dump"
    ) -> None:
        self.fmt = fmt
        self.full = full
        self.globals = kind == "globals"
        self.header = plainsql.CLUSTER_HEADER if self.globals else plainsql.HEADER
        self.trailer = plainsql.CLUSTER_TRAILER if self.globals else plainsql.TRAILER
        self.head = b""
        self.tail = b""
        self.proc: ClientProcess | None = None
        self.listing = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.tar = _TarWalk() if fmt == "tar" and full else None
        self.scanner = plainsql.Scanner() if fmt == "plain" else None
        if fmt in ("custom", "tar") and pg_restore is not None:
            argv = [pg_restore.argv0, "--file=/dev/null" if full else "--list"]
            self.proc = ClientProcess(
                argv,
                dict(os.environ),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL if full else self.listing,
            )

    @property
    def satisfied(self) -> bool:
        """True once the structure check needs no more bytes (for quick verification)."""
        if self.proc is not None:
            return self.proc.proc.poll() is not None
        return len(self.head) >= len(self.header) + 16

    def feed(self, data: bytes) -> None:
        if len(self.head) < 4096:
            self.head += data[: 4096 - len(self.head)]
        self.tail = (self.tail + data[-4096:])[-4096:]
        if self.tar is not None:
            self.tar.feed(data)
        if self.scanner is not None and self.scanner.found is None:
            self.scanner.feed(data)
        proc = self.proc
        if proc is not None and proc.proc.poll() is None and proc.proc.stdin is not None:
            # pg_restore --list stops reading after the table of contents, and a pg_restore
            # that met damage stops at it: a closed pipe is fine (its exit code tells).
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.proc.stdin.write(data)

    def result(self) -> CheckResult:
        if self.proc is not None:
            return self._archive_result(self.proc)
        if self.fmt == "plain":
            return self._plain_result()
        return CheckResult(name="structure", ok=True, detail="not checked")

    def _archive_result(self, proc: ClientProcess) -> CheckResult:
        if proc.proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.proc.stdin.close()
        cut = self.tar.problem() if self.tar is not None else ""
        if cut:
            proc.kill()
            return CheckResult(name="structure", ok=False, detail=cut)
        try:
            code = proc.proc.wait(timeout=_PG_RESTORE_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            return CheckResult(
                name="structure",
                ok=False,
                detail="pg_restore did not finish reading the archive (it spins on a cut one)",
            )
        proc.wait()  # lets the stderr reader finish
        if code != 0:
            what = "pg_restore could not read the archive to its end"
            if not self.full:
                what = "pg_restore --list"
            return CheckResult(name="structure", ok=False, detail=f"{what}: {proc.last_error()}")
        if self.full:
            return CheckResult(name="structure", ok=True, detail="pg_restore read every entry")
        self.listing.seek(0)
        entries = sum(1 for line in self.listing if line[:1] not in (b";", b"\n"))
        return CheckResult(name="structure", ok=True, detail=f"{entries} archive entries")

    def _plain_result(self) -> CheckResult:
        scanner = self.scanner
        assert scanner is not None  # noqa: S101 - made for the plain format
        what = "cluster dump (globals)" if self.globals else "plain dump"
        if self.header not in self.head:
            return CheckResult(name="structure", ok=False, detail=f"{what} header missing")
        if self.full:
            if self.trailer not in self.tail:
                return CheckResult(
                    name="structure", ok=False, detail=f"{what} is truncated (no trailer)"
                )
            scanner.finish()
        found = scanner.found
        if found is not None and self.globals and found.name in ("c", "connect"):
            detail = (
                f"it holds databases (\\{found.name} at line {found.line}): a whole pg_dumpall "
                "cluster dump, not pg_dumpall --globals-only"
            )
            return CheckResult(name="structure", ok=False, detail=detail)
        if found is not None:
            return CheckResult(name="structure", ok=False, detail=str(found))
        detail = "header, trailer, SQL only" if self.full else "header, SQL only so far"
        return CheckResult(name="structure", ok=True, detail=detail)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()  # reaps pg_restore and lets the stderr reader finish
            # Not used as a context manager, so nobody else closes these pipes.
            for stream in (self.proc.proc.stdin, self.proc.proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):  # a flush into a dead pg_restore
                        stream.close()
        self.listing.close()


class _FileSink:
    """Receives a decrypted object and writes it to a staging file (directory backups)."""

    satisfied = False

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()

    def feed(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        self._file.close()


class _Enough(Exception):
    """The structure check needs no more plaintext: stop decrypting."""


class _Decoding:
    """Decrypts (with an identity), decodes and feeds the structure check in its own thread
    while the caller reads and hashes: both release the GIL, so a full verification takes the
    longer of the two, not their sum. A decoding error stops decoding only; hashing goes on, so
    damage in storage is reported as the checksum failure, which says more than the decoder's
    complaint."""

    def __init__(
        self,
        compression: str,
        sink: _StructureSink | _FileSink | None,
        full: bool,
        identity: crypto.Identity | None = None,
    ) -> None:
        self._decoder = Decoder(compression)
        self._sink = sink
        self._full = full
        self._identity = identity
        self.wanted = True  # False once decoding failed or (quick) the structure is judged
        self.error: VerificationError | None = None
        self.refused: IdentityError | None = None  # the identity does not open it
        self._ended = False
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, daemon=True, name="pgkeeper-decode")
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def _stored(self, n: int) -> bytes:
        """The next stored chunk, for the decrypter (b"" at the end)."""
        if self._ended:
            return b""
        chunk = self._queue.get()
        if chunk is None:
            self._ended = True
            return b""
        return chunk

    def _plain(self, chunk: bytes) -> None:
        if not self.wanted:
            raise _Enough
        try:
            data = self._decoder.decompress(chunk)
        except VerificationError as exc:
            self.error, self.wanted = exc, False
            raise _Enough from None
        if self._sink is not None:
            self._sink.feed(data)
            if not self._full and self._sink.satisfied:
                self.wanted = False

    def _run(self) -> None:
        try:
            if self._identity is None:
                while chunk := self._stored(CHUNK):
                    self._plain(chunk)
            else:
                crypto.decrypt_stream(self._stored, self._plain, self._identity)
        except _Enough:
            pass
        except VerificationError as exc:
            if self.wanted:
                self.error, self.wanted = exc, False
        except IdentityError as exc:
            self.refused, self.wanted = exc, False
        while self._stored(CHUNK):  # the reader may still be putting chunks
            pass
        if self.wanted and self.error is None:
            try:
                self._decoder.finish()
            except VerificationError as exc:
                self.error = exc

    def finish(self) -> VerificationError | None:
        """Wait for the decoder; return what it found wrong, if anything. Raise IdentityError
        when the identity did not open the file (not a fault of the backup)."""
        self._queue.put(None)
        self._thread.join()
        if self.refused is not None:
            raise self.refused
        return self.error


def _check_object(
    storage: Storage,
    manifest: Manifest,
    obj: StoredObject,
    checks: list[CheckResult],
    sink: _StructureSink | _FileSink | None,
    decode: bool,
    progress: Progress | None,
    copy_to: Path | None = None,
    identity: crypto.Identity | None = None,
    shape: crypto.AgeShape | None = None,
) -> None:
    key = naming.object_key(manifest.id, obj.name)
    compression = "none" if manifest.format == "directory" else manifest.compression
    decoding = (
        _Decoding(compression, sink, decode, identity)
        if (decode or sink is not None)
        else None
    )
    broken: VerificationError | None = None
    reader: HashingReader | None = None
    try:
        with contextlib.ExitStack() as stack:
            copy = None
            if copy_to is not None:
                copy_to.parent.mkdir(parents=True, exist_ok=True)
                copy = stack.enter_context(open(copy_to, "wb"))
            src = stack.enter_context(storage.open_read(key))
            reader = HashingReader.of(src, obj, progress)
            while chunk := reader.read(CHUNK):
                if decoding is not None and decoding.wanted:
                    decoding.put(chunk)
                if copy is not None:
                    copy.write(chunk)
                if shape is not None:
                    shape.feed(chunk)
        if decoding is not None:
            broken = decoding.finish()
    except StorageError as exc:
        if decoding is not None:
            decoding.finish()
        _fail(checks, "objects", f"{obj.name}: {exc}")
        return
    assert reader is not None  # noqa: S101 - open_read either yielded or raised StorageError
    if reader.size != obj.size:
        _fail(
            checks, "checksum", f"{obj.name}: {reader.size} bytes stored, manifest says {obj.size}"
        )
    elif reader.hexdigest != obj.sha256:
        _fail(checks, "checksum", f"{obj.name}: sha256 {reader.hexdigest[:12]}... != manifest")
    elif broken is not None:
        _fail(checks, broken.check or "compression", f"{obj.name}: {broken}")
    elif shape is not None:
        recorded = manifest.encryption.recipients if manifest.encryption else None
        try:
            shape.check(recorded or None)
        except VerificationError as exc:
            _fail(checks, "encryption", f"{obj.name}: {exc}")


def check_backup(
    storage: Storage,
    manifest: Manifest,
    level: str = "full",
    pg_bin_dir: Path | None = None,
    progress: Progress | None = None,
    identity: crypto.Identity | None = None,
) -> Verification:
    """Run every check on one stored copy and return the results (raises nothing for bad data;
    IdentityError when ``identity`` does not open an encrypted backup: not the backup's fault).

    Storage failures while reading are reported as failed checks, not raised. An encrypted
    backup without ``identity`` gets the checks that need no key (see the module docstring).
    """
    if manifest.kind == "base":  # a pg_basebackup tar: checked against its backup_manifest
        from pgkeeper.basebackup import verify_base

        return verify_base(storage, manifest, level, progress, identity)
    full = level == "full"
    encrypted = manifest.encryption is not None
    if not encrypted:
        identity = None
    checks: list[CheckResult] = []
    present = {info.key: info.size for info in catalog.backup_objects(storage, manifest.id)}
    for obj in manifest.objects:
        key = naming.object_key(manifest.id, obj.name)
        if key not in present:
            _fail(checks, "objects", f"{obj.name} is missing from {storage.url}")
        elif present[key] != obj.size:
            _fail(checks, "objects", f"{obj.name}: {present[key]} bytes, manifest says {obj.size}")
    if not checks:
        checks.append(CheckResult(name="objects", ok=True, detail=f"{len(manifest.objects)}"))
        pg_restore = None
        if manifest.format in ("custom", "tar", "directory"):
            pg_restore = postgres.find_client("pg_restore", pg_bin_dir)
        if encrypted and identity is None:
            _check_sealed(storage, manifest, checks, progress)
        elif manifest.format == "directory":
            _check_directory(storage, manifest, checks, pg_restore, full, progress, identity)
        else:
            sink = _StructureSink(manifest.format, pg_restore, full, manifest.kind)
            try:
                _check_object(
                    storage, manifest, manifest.objects[0], checks, sink, full, progress,
                    identity=identity,
                )  # fmt: skip
                failed = any(not c.ok for c in checks)
                if not failed:
                    checks.append(CheckResult(name="checksum", ok=True, detail=manifest.sha256))
                    if identity is not None:
                        detail = "decrypted end to end" if full else "header and first chunks"
                        checks.append(CheckResult(name="decryption", ok=True, detail=detail))
                    if manifest.compression != "none":
                        detail = "decoded end to end" if full else "header decoded"
                        checks.append(CheckResult(name="compression", ok=True, detail=detail))
                    checks.append(sink.result())
            finally:
                sink.close()
    ok = all(c.ok for c in checks)
    return Verification(
        ok=ok,
        at=utcnow(),
        level="full" if full else "quick",
        checks=checks,
        decrypted=(identity is not None) if encrypted else None,
    )


NOT_DECRYPTED = (
    "not decrypted: no identity here (BACKUP_ENCRYPTION_IDENTITY_FILE), so the data was neither "
    "decoded nor read by pg_restore; verify where the identity is to check it fully"
)


def _check_sealed(
    storage: Storage, manifest: Manifest, checks: list[CheckResult], progress: Progress | None
) -> None:
    """An encrypted backup without its identity: every object's sha256, age header (its
    recipients against the manifest's) and length."""
    for obj in manifest.objects:
        shape = crypto.AgeShape()
        _check_object(storage, manifest, obj, checks, None, False, progress, shape=shape)
    if any(not c.ok for c in checks):
        return
    count = len(manifest.encryption.recipients) if manifest.encryption else 0
    checks.append(CheckResult(name="checksum", ok=True, detail="every object"))
    checks.append(
        CheckResult(
            name="encryption",
            ok=True,
            detail=f"age headers ({count} recipients) and lengths of every object",
        )
    )
    checks.append(CheckResult(name="decryption", ok=True, detail=NOT_DECRYPTED))


def _check_directory(
    storage: Storage,
    manifest: Manifest,
    checks: list[CheckResult],
    pg_restore: postgres.Client | None,
    full: bool,
    progress: Progress | None,
    identity: crypto.Identity | None = None,
) -> None:
    """Hash every file of a directory-format backup, then judge the archive: quick reads its
    table of contents; full has ``pg_restore --file=/dev/null`` read every data file to its end,
    in the local backup folder itself or, from a remote target or encrypted (decrypted with
    ``identity``, into a private temporary folder), from a copy staged while the files are
    hashed (one read of each)."""
    folder = naming.data_name(manifest.id, manifest.format, manifest.compression)
    local = storage.local_path(naming.object_key(manifest.id, folder))
    with tempfile.TemporaryDirectory(prefix="pgkeeper-verify-") as tmp:
        if identity is not None:
            local = None  # only decrypted copies are readable by pg_restore
        stage = Path(tmp) if full and (local is None or not local.is_dir()) else None
        for obj in manifest.objects:
            if identity is not None and (full or obj.name.endswith("/toc.dat" + crypto.SUFFIX)):
                plain = Path(tmp) / obj.name.removesuffix(crypto.SUFFIX)
                sink = _FileSink(plain)
                try:
                    _check_object(
                        storage, manifest, obj, checks, sink, True, progress, identity=identity
                    )
                finally:
                    sink.close()
                continue
            copy_to = stage / obj.name if stage is not None else None
            _check_object(storage, manifest, obj, checks, None, False, progress, copy_to)
        if any(not c.ok for c in checks):
            return
        checks.append(CheckResult(name="checksum", ok=True, detail="every object"))
        if identity is not None:
            what = "every object decrypted" if full else "toc.dat decrypted"
            checks.append(CheckResult(name="decryption", ok=True, detail=what))
        if pg_restore is None:
            checks.append(CheckResult(name="structure", ok=True, detail="not checked"))
        elif full:
            source = stage / folder if stage is not None else local
            assert source is not None  # noqa: S101 - staged when not local
            checks.append(_read_directory(pg_restore, source))
        elif identity is not None:  # toc.dat was decrypted into the temporary folder
            checks.append(_listing(pg_restore, Path(tmp) / folder))
        else:
            checks.append(_directory_listing(storage, manifest, pg_restore, folder, Path(tmp)))


def _read_directory(pg_restore: postgres.Client, source: Path) -> CheckResult:
    argv = [pg_restore.argv0, "--file=/dev/null", str(source)]
    with ClientProcess(argv, dict(os.environ), stdout=subprocess.DEVNULL) as proc:
        if proc.wait() != 0:
            return CheckResult(
                name="structure",
                ok=False,
                detail=f"pg_restore could not read the archive to its end: {proc.last_error()}",
            )
    return CheckResult(name="structure", ok=True, detail="pg_restore read every entry")


def _directory_listing(
    storage: Storage, manifest: Manifest, pg_restore: postgres.Client, folder: str, tmp: Path
) -> CheckResult:
    toc = tmp / "toc.dat"
    try:
        with storage.open_read(naming.object_key(manifest.id, f"{folder}/toc.dat")) as src:
            toc.write_bytes(src.read())
    except StorageError as exc:
        return CheckResult(name="structure", ok=False, detail=f"toc.dat unreadable: {exc}")
    return _listing(pg_restore, tmp)


def _listing(pg_restore: postgres.Client, folder: Path) -> CheckResult:
    """``pg_restore --list`` of a directory archive's ``toc.dat`` in ``folder``."""
    out = subprocess.run(
        [pg_restore.argv0, "--list", str(folder)], capture_output=True, text=True, timeout=300
    )
    if out.returncode != 0:
        return CheckResult(
            name="structure", ok=False, detail=f"pg_restore --list: {out.stderr.strip()}"
        )
    entries = sum(1 for line in out.stdout.splitlines() if line and not line.startswith(";"))
    return CheckResult(name="structure", ok=True, detail=f"{entries} archive entries")


def damaged(
    manifest: Manifest, storage: Storage, exc: VerificationError, outcome: str
) -> VerificationError:
    """The one-line error for a stored copy found damaged while reading it; ``outcome`` says
    what that means for the caller (e.g. 'nothing was restored')."""
    return VerificationError(
        f"backup {manifest.id!r} in {storage.url} is damaged ({exc.check} check failed: {exc}); "
        f"{outcome} (run 'pgkeeper verify {manifest.id}', or use another copy or backup)",
        check=exc.check,
    )


def failed_check(verification: Verification) -> CheckResult | None:
    return next((c for c in verification.checks if not c.ok), None)


def verify_backup(
    settings: Settings,
    backup_id: str,
    *,
    storages: list[Storage] | None = None,
    level: str = "full",
    progress: Progress | None = None,
    record: bool = True,
) -> Manifest:
    """Verify a backup on the first target holding it and record the result in its manifest.

    Raises InvalidBackupIdError/BackupNotFoundError for bad ids, and VerificationError naming
    the failed check when the stored backup is bad (the failure is recorded first).
    """
    storages = storages if storages is not None else targets(settings)
    manifest, storage = catalog.find(storages, backup_id)
    return verify_copy(settings, storage, manifest, level=level, progress=progress, record=record)


def verify_copy(
    settings: Settings,
    storage: Storage,
    manifest: Manifest,
    *,
    level: str = "full",
    progress: Progress | None = None,
    record: bool = True,
    identity_required: bool = False,
) -> Manifest:
    """Verify one copy, record the outcome on that copy's manifest, raise if it is bad.

    An encrypted backup is decrypted when BACKUP_ENCRYPTION_IDENTITY_FILE is set, else checked
    as far as that goes without the key (see the module docstring). An identity that does not
    open the backup (none of its keys a recipient: not the backup's fault) raises IdentityError,
    recording nothing, when ``identity_required`` (``pgkeeper verify``); else (the verification
    after a backup, a restore's safety backup) it is said in a warning and the check without
    the key is done."""
    identity = crypto.configured_identity(settings) if manifest.encryption else None
    if identity is not None:
        try:
            crypto.check_identity(storage, manifest, identity)
        except (VerificationError, StorageError):
            pass  # damaged or unreadable: check_backup finds it and records the failed check
        except IdentityError as exc:
            if identity_required:
                raise
            log.warning("%s: verifying without decrypting", exc)
            identity = None
    result = check_backup(storage, manifest, level, settings.pg_bin_dir, progress, identity)
    updated = manifest.model_copy(update={"verification": result})
    if record:
        try:
            catalog.write_manifest(storage, updated)
        except PgkeeperError as exc:
            log.warning("could not record the verification of %s: %s", manifest.id, exc)
    bad = failed_check(result)
    if bad is not None:
        raise VerificationError(
            f"backup {manifest.id!r} in {storage.url} failed the {bad.name} check: {bad.detail} "
            "(do not restore it; take a new backup or use another copy)",
            check=bad.name,
        )
    return updated
