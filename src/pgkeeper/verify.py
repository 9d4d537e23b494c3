"""Verify a stored backup: its bytes, its compression stream and its dump structure.

Checks, in order, each named in results and errors:
  ``objects``      every object of the manifest exists with the recorded size
  ``checksum``     the stored bytes hash to the manifest's sha256 (re-read, never cached)
  ``compression``  the zstd/gzip stream decodes end to end (zstd frames carry their own checksum)
  ``structure``    custom/tar/directory: ``pg_restore --list`` reads the archive's table of
                   contents; plain: the dump's header and its "dump complete" trailer are there
A ``quick`` verification skips decoding beyond what the structure check needs.
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

from pgkeeper import catalog, naming, postgres
from pgkeeper.errors import PgkeeperError, StorageError, VerificationError
from pgkeeper.manifest import CheckResult, Manifest, StoredObject, Verification, utcnow
from pgkeeper.pipeline import ClientProcess, Decoder, HashingReader, Progress
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK

log = logging.getLogger(__name__)

PLAIN_HEADER = b"-- PostgreSQL database dump"
PLAIN_TRAILER = b"-- PostgreSQL database dump complete"


def _fail(checks: list[CheckResult], name: str, detail: str) -> None:
    checks.append(CheckResult(name=name, ok=False, detail=detail))


class _StructureSink:
    """Receives the decoded dump stream and judges its structure."""

    def __init__(self, fmt: str, pg_restore: postgres.Client | None) -> None:
        self.fmt = fmt
        self.head = b""
        self.tail = b""
        self.proc: ClientProcess | None = None
        self.listing = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        if fmt in ("custom", "tar") and pg_restore is not None:
            self.proc = ClientProcess(
                [pg_restore.argv0, "--list"],
                dict(os.environ),
                stdin=subprocess.PIPE,
                stdout=self.listing,
            )

    @property
    def satisfied(self) -> bool:
        """True once the structure check needs no more bytes (for quick verification)."""
        if self.proc is not None:
            return self.proc.proc.poll() is not None
        return len(self.head) >= len(PLAIN_HEADER) + 16

    def feed(self, data: bytes) -> None:
        if len(self.head) < 4096:
            self.head += data[: 4096 - len(self.head)]
        self.tail = (self.tail + data[-4096:])[-4096:]
        proc = self.proc
        if proc is not None and proc.proc.poll() is None and proc.proc.stdin is not None:
            # pg_restore --list stops reading after the table of contents: a closed pipe is fine.
            with contextlib.suppress(BrokenPipeError, OSError):
                proc.proc.stdin.write(data)

    def result(self, complete: bool) -> CheckResult:
        if self.proc is not None:
            if self.proc.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self.proc.proc.stdin.close()
            code = self.proc.wait()
            self.listing.seek(0)
            entries = sum(1 for line in self.listing if line[:1] not in (b";", b"\n"))
            if code != 0:
                return CheckResult(
                    name="structure",
                    ok=False,
                    detail=f"pg_restore --list: {self.proc.last_error()}",
                )
            return CheckResult(name="structure", ok=True, detail=f"{entries} archive entries")
        if self.fmt == "plain":
            if PLAIN_HEADER not in self.head:
                return CheckResult(name="structure", ok=False, detail="plain dump header missing")
            if complete and PLAIN_TRAILER not in self.tail:
                return CheckResult(
                    name="structure", ok=False, detail="plain dump is truncated (no trailer)"
                )
            return CheckResult(name="structure", ok=True, detail="header and trailer present")
        return CheckResult(name="structure", ok=True, detail="not checked")

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


class _Decoding:
    """Decodes (and feeds the structure check) in its own thread while the caller reads and
    hashes: both release the GIL, so a full verification takes the longer of the two, not
    their sum. A decoding error stops decoding only; hashing goes on, so damage in storage is
    reported as the checksum failure, which says more than the decoder's complaint."""

    def __init__(self, compression: str, sink: _StructureSink | None, full: bool) -> None:
        self._decoder = Decoder(compression)
        self._sink = sink
        self._full = full
        self.wanted = True  # False once decoding failed or (quick) the structure is judged
        self.error: VerificationError | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=4)
        self._thread = threading.Thread(target=self._run, daemon=True, name="pgkeeper-decode")
        self._thread.start()

    def put(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if not self.wanted:
                continue
            try:
                data = self._decoder.decompress(chunk)
            except VerificationError as exc:
                self.error, self.wanted = exc, False
                continue
            if self._sink is not None:
                self._sink.feed(data)
                if not self._full and self._sink.satisfied:
                    self.wanted = False
        if self.wanted and self.error is None:
            try:
                self._decoder.finish()
            except VerificationError as exc:
                self.error = exc

    def finish(self) -> VerificationError | None:
        """Wait for the decoder; return what it found wrong, if anything."""
        self._queue.put(None)
        self._thread.join()
        return self.error


def _check_object(
    storage: Storage,
    manifest: Manifest,
    obj: StoredObject,
    checks: list[CheckResult],
    sink: _StructureSink | None,
    decode: bool,
    progress: Progress | None,
) -> None:
    key = naming.object_key(manifest.id, obj.name)
    decoding = (
        _Decoding(manifest.compression, sink, decode) if (decode or sink is not None) else None
    )
    broken: VerificationError | None = None
    reader: HashingReader | None = None
    try:
        with storage.open_read(key) as src:
            reader = HashingReader.of(src, obj, progress)
            while chunk := reader.read(CHUNK):
                if decoding is not None and decoding.wanted:
                    decoding.put(chunk)
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
        _fail(checks, "compression", f"{obj.name}: {broken}")


def check_backup(
    storage: Storage,
    manifest: Manifest,
    level: str = "full",
    pg_bin_dir: Path | None = None,
    progress: Progress | None = None,
) -> Verification:
    """Run every check on one stored copy and return the results (raises nothing for bad data).

    Storage failures while reading are reported as failed checks, not raised.
    """
    if manifest.kind == "base":  # a pg_basebackup tar: checked against its backup_manifest
        from pgkeeper.basebackup import verify_base

        return verify_base(storage, manifest, level, progress)
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
        if manifest.format == "directory":
            for obj in manifest.objects:
                _check_object(storage, manifest, obj, checks, None, False, progress)
            if not any(not c.ok for c in checks):
                checks.append(_directory_structure(storage, manifest, pg_restore))
        else:
            sink = _StructureSink(manifest.format, pg_restore)
            try:
                _check_object(
                    storage, manifest, manifest.objects[0], checks, sink, level == "full", progress
                )
                failed = any(not c.ok for c in checks)
                if not failed:
                    checks.append(CheckResult(name="checksum", ok=True, detail=manifest.sha256))
                    if manifest.compression != "none":
                        detail = "decoded end to end" if level == "full" else "header decoded"
                        checks.append(CheckResult(name="compression", ok=True, detail=detail))
                    checks.append(sink.result(complete=level == "full"))
            finally:
                sink.close()
        if manifest.format == "directory" and all(c.ok for c in checks):
            checks.insert(1, CheckResult(name="checksum", ok=True, detail="every object"))
    ok = all(c.ok for c in checks)
    return Verification(
        ok=ok, at=utcnow(), level="full" if level == "full" else "quick", checks=checks
    )


def _directory_structure(
    storage: Storage, manifest: Manifest, pg_restore: postgres.Client | None
) -> CheckResult:
    if pg_restore is None:
        return CheckResult(name="structure", ok=True, detail="not checked")
    folder = naming.data_name(manifest.id, manifest.format, manifest.compression)
    with tempfile.TemporaryDirectory(prefix="pgkeeper-verify-") as tmp:
        toc = Path(tmp) / "toc.dat"
        try:
            with storage.open_read(naming.object_key(manifest.id, f"{folder}/toc.dat")) as src:
                toc.write_bytes(src.read())
        except StorageError as exc:
            return CheckResult(name="structure", ok=False, detail=f"toc.dat unreadable: {exc}")
        out = subprocess.run(
            [pg_restore.argv0, "--list", tmp], capture_output=True, text=True, timeout=300
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
) -> Manifest:
    """Verify one copy, record the outcome on that copy's manifest, raise if it is bad."""
    result = check_backup(storage, manifest, level, settings.pg_bin_dir, progress)
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
