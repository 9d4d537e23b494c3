"""Import a folder of the seed's backups (``pgkeeper import --from-dir DIR``), each one keeping its
original name and time.

The seed's backup service writes ``<name>_<YYYY-MM-DDTHH-MM-SS>.sql.gz`` (plain SQL, gzip; ``.sql``
when not compressed), the time in UTC (JavaScript's ``toISOString()`` with ``:`` and ``.`` made
``-``: milliseconds and a trailing ``Z`` are accepted too). Such a file becomes the backup
``<name>_<YYYY-MM-DDTHH-MM-SS>Z`` whose manifest starts and finishes at that time, so listings
and retention treat it by its real age. Each goes through ``importing.import_stream``:
recognised by content, stored as it is (same bytes, same sha256), verified fully (a dump with
psql meta-commands is refused), listed with trigger ``import``.

Every file of the folder gets one outcome (seed files oldest first, then the others):

    imported           stored and verified
    already imported   this file's bytes are, or were, backup ``<id>`` (see below)
    skipped            not named like a seed backup (a README, a folder)
    failed             named like one, but not importable: not a dump, corrupt, unreadable,
                       a time that is no date, a name no id can start with, or its id taken
                       by other bytes (never overwritten)

**Already imported** is decided by the file's id and sha256, so a re-run imports nothing twice:
a backup with that id on any target whose data has the file's sha256; or, on the primary, the
import record ``imports/<id>.json`` naming the same sha256: the backup was imported before and
has since been deleted (by rotation, or by hand), and is not brought back. Delete that record to
import the file again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pgkeeper import catalog, naming
from pgkeeper.errors import BackupExistsError, NotADumpError, StorageError, UsageError
from pgkeeper.importing import import_stream
from pgkeeper.manifest import Manifest, utcnow
from pgkeeper.pipeline import Progress
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK, get_bytes, put_bytes

SEED_FILE = re.compile(
    r"^(?P<name>.+)_(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2})(?:[.-](?P<ms>\d{3}))?Z?"
    r"(?P<ext>\.sql\.gz|\.sql)\Z"
)
SHAPE = "<name>_<YYYY-MM-DDTHH-MM-SS>.sql.gz"
Status = Literal["imported", "already imported", "skipped", "failed"]
ProgressFor = Callable[[Path, int], AbstractContextManager[Progress | None]]


@dataclass(frozen=True)
class SeedFile:
    """A file named like one of the seed's backups: its name and time (UTC)."""

    path: Path
    name: str
    at: datetime

    @property
    def backup_id(self) -> str:
        return naming.make_id(self.name, self.at, millis=bool(self.at.microsecond))


def seed_file(path: Path) -> SeedFile | None:
    """The seed backup a file name stands for; None when it is not named like one.

    Raises UsageError when it is named like one but its time is no date or its name cannot
    start a backup id."""
    match = SEED_FILE.match(path.name)
    if match is None:
        return None
    try:
        at = datetime.strptime(match.group("ts"), "%Y-%m-%dT%H-%M-%S").replace(tzinfo=UTC)
    except ValueError:
        raise UsageError(f"its time {match.group('ts')} is not a date") from None
    if match.group("ms"):
        at = at.replace(microsecond=int(match.group("ms")) * 1000)
    return SeedFile(path, naming.validate_name(match.group("name")), at)


@dataclass
class FileOutcome:
    file: str
    status: Status
    reason: str = ""
    backup_id: str | None = None
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "status": self.status, "reason": self.reason,
                "id": self.backup_id, "size": self.size}  # fmt: skip


@dataclass
class FolderImport:
    """What an import of a folder did with each of its files."""

    folder: str
    target: str
    files: list[FileOutcome] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def ok(self) -> bool:
        """No file named like a seed backup failed (skipped odd names are fine)."""
        return self.count("failed") == 0

    def summary(self) -> str:
        return (
            f"{self.count('imported')} imported, {self.count('already imported')} already "
            f"imported, {self.count('skipped')} skipped, {self.count('failed')} failed "
            f"({len(self.files)} files in {self.folder}; into {self.target})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "target": self.target,
            "ok": self.ok,
            "imported": self.count("imported"),
            "alreadyImported": self.count("already imported"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "files": [f.to_dict() for f in self.files],
        }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _import_record(storage: Storage, backup_id: str) -> dict[str, Any] | None:
    key = naming.import_record_key(backup_id)
    if storage.stat(key) is None:
        return None
    try:
        record = json.loads(get_bytes(storage, key))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _file_sha256(manifest: Manifest) -> str | None:
    """The sha256 of the file a backup was imported from: recorded at import (the stored bytes
    differ when encryption is on), else its one stored object's (stored as it came)."""
    recorded = manifest.options.get("imported_sha256")
    if isinstance(recorded, str):
        return recorded
    return manifest.objects[0].sha256 if len(manifest.objects) == 1 else None


def _already(storages: list[Storage], seed: SeedFile) -> FileOutcome | None:
    """The outcome when this file's id is, or was, a backup; None when it is new."""
    backup_id = seed.backup_id
    existing: Manifest | None = None
    for storage in storages:
        if (existing := catalog.read_manifest(storage, backup_id)) is not None:
            break
    record = _import_record(storages[0], backup_id)
    if existing is None and record is None:
        return None
    digest = _sha256(seed.path)
    if existing is not None:
        if _file_sha256(existing) == digest:
            return FileOutcome(seed.path.name, "already imported", f"already imported as "
                               f"{backup_id}", backup_id, existing.size)  # fmt: skip
        return FileOutcome(
            seed.path.name, "failed",
            f"backup {backup_id} already exists with other content (sha256 differs): not "
            "overwritten", backup_id,
        )  # fmt: skip
    if record is not None and record.get("sha256") == digest:
        return FileOutcome(
            seed.path.name, "already imported",
            f"imported before as {backup_id} and deleted since (rotation or delete): not "
            f"imported again (delete {naming.import_record_key(backup_id)} in "
            f"{storages[0].url} to import it again)", backup_id,
        )  # fmt: skip
    return None  # a record of other bytes under this name: this file is new


def _import_one(
    settings: Settings,
    storages: list[Storage],
    seed: SeedFile,
    database: str | None,
    progress: ProgressFor,
) -> FileOutcome:
    name = seed.path.name
    try:
        if (known := _already(storages, seed)) is not None:
            return known
        size = seed.path.stat().st_size
        digest = _sha256(seed.path)  # the file's own: encryption changes the stored bytes
        with seed.path.open("rb") as handle, progress(seed.path, size) as bar:
            manifest = import_stream(
                settings, handle.read, name=seed.name, storage=storages[0], progress=bar,
                at=seed.at, database=database,
                source={"imported_from": name, "imported_sha256": digest},
            )  # fmt: skip
    except (NotADumpError, BackupExistsError) as exc:
        return FileOutcome(name, "failed", exc.message, seed.backup_id)
    except OSError as exc:
        return FileOutcome(name, "failed", f"cannot read it: {exc.strerror or exc}")
    record = {"file": name, "sha256": digest, "at": utcnow().isoformat()}
    put_bytes(storages[0], naming.import_record_key(manifest.id), json.dumps(record).encode())
    return FileOutcome(name, "imported", f"verified, database {manifest.database}", manifest.id,
                       manifest.size)  # fmt: skip


def import_folder(
    settings: Settings,
    folder: Path,
    *,
    database: str | None = None,
    progress: ProgressFor | None = None,
    told: Callable[[FileOutcome], None] | None = None,
    storages: list[Storage] | None = None,
) -> FolderImport:
    """Import every seed backup in ``folder`` onto the primary target (see the module
    docstring); ``database`` names the database plain dumps are of (they do not say).
    ``progress`` gives each file's progress bar, ``told`` hears each outcome as it is known.

    Raises UsageError when ``folder`` is not a readable folder, StorageError when a target
    fails (every file imported until then is a complete backup; a re-run goes on from there).
    """
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder (give the folder of the seed's backups)")
    if database is not None and not database.strip():
        raise UsageError("--database is empty (give the name of the database the dumps are of)")
    storages = storages if storages is not None else targets(settings)
    try:
        paths = sorted(folder.iterdir())
    except OSError as exc:
        raise StorageError(f"cannot read {folder}: {exc.strerror} (check its permissions)") from exc
    result = FolderImport(str(folder), storages[0].url)
    seeds: list[SeedFile] = []
    others: list[FileOutcome] = []
    for path in paths:
        if not path.is_file():
            others.append(FileOutcome(path.name, "skipped", "not a regular file"))
            continue
        try:
            seed = seed_file(path)
        except UsageError as exc:
            others.append(FileOutcome(path.name, "failed", exc.message))
            continue
        if seed is None:
            others.append(FileOutcome(path.name, "skipped", f"not named like a seed backup "
                                      f"({SHAPE})"))  # fmt: skip
        else:
            seeds.append(seed)
    each = progress or (lambda path, size: nullcontext(None))
    for seed in sorted(seeds, key=lambda s: (s.at, s.name)):
        result.files.append(_import_one(settings, storages, seed, database, each))
        if told:
            told(result.files[-1])
    for other in others:
        result.files.append(other)
        if told:
            told(other)
    return result
