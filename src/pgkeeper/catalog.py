"""List, find, record and delete backups across storage targets, and total their usage.

Only manifests make a backup visible: a folder without ``manifest.json`` is an incomplete backup
(still being written, or left by a killed run) and is never listed as good. Deletion removes the
manifest first, so an interrupted delete leaves an incomplete folder that cleanup finishes.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pgkeeper import naming
from pgkeeper.errors import (
    BackupExistsError,
    BackupNotFoundError,
    PgkeeperError,
    StorageError,
    UsageError,
)
from pgkeeper.manifest import Manifest, utcnow
from pgkeeper.storage.base import ObjectInfo, Storage, get_bytes, put_bytes

if TYPE_CHECKING:
    from pgkeeper.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """One backup as the catalog sees it: its manifest and every target that holds it."""

    manifest: Manifest
    locations: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.manifest.id


def list_backups(storage: Storage) -> list[Manifest]:
    """Every complete backup on one target, newest first by recorded start time.

    A manifest that cannot be parsed is logged and skipped (it is not a good backup).
    """
    manifests: list[Manifest] = []
    for info in storage.list():
        parts = info.key.split("/")
        if len(parts) != 2 or parts[1] != naming.MANIFEST or naming.id_from_key(info.key) is None:
            continue
        try:
            manifest = Manifest.from_json(get_bytes(storage, info.key))
        except StorageError as exc:
            log.warning("skipping unreadable manifest %s in %s: %s", info.key, storage.url, exc)
            continue
        except ValueError as exc:
            log.warning("skipping malformed manifest %s in %s: %s", info.key, storage.url, exc)
            continue
        if manifest.id != parts[0]:
            log.warning("%s", inconsistent(storage, parts[0], manifest.id))
            continue
        manifests.append(manifest)
    manifests.sort(key=lambda m: m.started_at, reverse=True)
    return manifests


def inconsistent(storage: Storage, folder: str, recorded: str) -> str:
    """The one line saying a backup folder holds another backup's manifest (copied/renamed)."""
    return (
        f"folder {folder!r} in {storage.url} holds the manifest of backup {recorded!r} "
        "(copied or renamed?): it is ignored; move it back to its own name or remove it"
    )


def list_all(storages: Iterable[Storage]) -> list[Entry]:
    """Every complete backup on any target, newest first, with where each is stored.

    The record shown is the primary's (the first target holding it)."""
    entries: dict[str, Entry] = {}
    for storage in storages:
        for manifest in list_backups(storage):
            entry = entries.setdefault(manifest.id, Entry(manifest))
            entry.locations.append(storage.url)
    return sorted(entries.values(), key=lambda e: e.manifest.started_at, reverse=True)


def latest(
    entries: Iterable[Entry],
    database: str | None,
    server: str | None = None,
    *,
    usable: bool = False,
    where: str = "the storage targets",
) -> Manifest:
    """What ``latest`` means: the newest verified backup of ``database`` (``usable``: the newest
    not known to be bad, for restore tests), never another database's.

    ``server`` (``host:port`` of DATABASE_URL) narrows the choice to that server's backups.
    Without ``database``, the backups must all be of one database on one server. Anything
    ambiguous (several databases, the database only backed up from another server or
    imported) raises UsageError listing the candidates; nothing fitting raises
    BackupNotFoundError. A server's globals (kind ``globals``) are never a database's latest:
    only ``database`` ``*`` names them.
    """
    # Base backups (kind "base", the whole cluster, for PITR) are never anyone's `latest`.
    kind = "globals" if database == "*" else "dump"
    manifests = [e.manifest for e in entries if e.manifest.kind == kind]

    def fits(m: Manifest) -> bool:
        return not m.verification_failed if usable else m.verified

    word = "usable" if usable else "verified"
    if database is None:
        groups = sorted({(m.database, m.server) for m in manifests if fits(m)})
        if len(groups) > 1:
            shown = ", ".join(f"{db} on {srv}" for db, srv in groups[:6])
            more = f" and {len(groups) - 6} more" if len(groups) > 6 else ""
            raise UsageError(
                f"'latest' is ambiguous: {word} backups of {len(groups)} databases are stored "
                f"({shown}{more}); pass --database NAME or a backup id"
            )
        chosen = [m for m in manifests if fits(m)]
    else:
        chosen = [m for m in manifests if m.database == database and fits(m)]
        if server is not None and chosen:
            here = [m for m in chosen if m.server == server]
            if not here:
                others = sorted({m.server for m in chosen})
                raise UsageError(
                    f"no {word} backup of database {database!r} from {server}; there are "
                    f"backups of {database!r} from {', '.join(others[:6])} (restore one by its "
                    f"id, see 'pgkeeper list --database {database}')"
                )
            chosen = here
    if not chosen:
        of = f" of database {database!r}" if database is not None else ""
        pending = [m for m in manifests if m.verification is None
                   and (database is None or m.database == database)]  # fmt: skip
        hint = (
            f"{len(pending)} not verified yet: 'pgkeeper verify {pending[0].id}', or restore "
            "one by its id"
            if pending and not usable
            else "run 'pgkeeper backup', or 'pgkeeper list' to see what there is"
        )
        raise BackupNotFoundError(f"no {word} backup{of} in {where} ({hint})")
    return chosen[0]  # entries are newest first


def latest_backup(
    settings: Settings,
    storages: list[Storage],
    database: str | None = None,
    *,
    usable: bool = False,
) -> Manifest:
    """``latest`` for the configured database: ``database`` (``--database``) or DATABASE_URL's,
    from DATABASE_URL's server when it is set (see ``latest``)."""
    server = None
    if settings.database_url is not None and settings.database_url.get_secret_value():
        from pgkeeper.postgres import ConnInfo  # lazy: listing needs no psycopg

        conn = ConnInfo.parse(settings.database_url.get_secret_value())
        server = conn.server
        database = database or conn.dbname
    where = ", ".join(s.url for s in storages) or "no storage target"
    return latest(list_all(storages), database, server, usable=usable, where=where)


def read_manifest(storage: Storage, backup_id: str) -> Manifest | None:
    """The manifest of one backup on one target, or None when that target lacks it."""
    key = naming.manifest_key(backup_id)
    if storage.stat(key) is None:
        return None
    try:
        manifest = Manifest.from_json(get_bytes(storage, key))
    except ValueError:
        raise StorageError(
            f"the manifest of backup {backup_id!r} in {storage.url} is malformed "
            f"(run 'pgkeeper verify {backup_id}' against another copy, or delete the backup)"
        ) from None
    if manifest.id != backup_id:  # never serve a copied or renamed folder under the wrong id
        log.warning("%s", inconsistent(storage, backup_id, manifest.id))
        return None
    return manifest


def find(storages: Iterable[Storage], backup_id: str) -> tuple[Manifest, Storage]:
    """The first target (in order, primary first) that holds a complete copy of ``backup_id``.

    Raises InvalidBackupIdError for a malformed id, BackupNotFoundError when no target has it.
    """
    naming.validate_id(backup_id)
    storages = list(storages)
    for storage in storages:
        manifest = read_manifest(storage, backup_id)
        if manifest is not None:
            return manifest, storage
    where = ", ".join(s.url for s in storages) or "no storage target"
    raise BackupNotFoundError(f"backup {backup_id!r} not found in {where} (run 'pgkeeper list')")


def write_manifest(storage: Storage, manifest: Manifest) -> None:
    """Write (or atomically replace) a backup's manifest: the commit marker."""
    put_bytes(storage, naming.manifest_key(manifest.id), manifest.to_json())


def backup_objects(storage: Storage, backup_id: str) -> list[ObjectInfo]:
    return list(storage.list(naming.backup_prefix(backup_id)))


def delete_backup(storage: Storage, backup_id: str) -> None:
    """Delete one backup from one target: the manifest first, then every other object."""
    naming.validate_id(backup_id)
    storage.delete(naming.manifest_key(backup_id))
    for info in backup_objects(storage, backup_id):
        storage.delete(info.key)


def write_pending(storage: Storage, backup_id: str, database: str, server: str) -> None:
    """Mark a backup as being written (who and since when), before any data object."""
    body = {"id": backup_id, "database": database, "server": server, "since": utcnow().isoformat()}
    put_bytes(storage, naming.pending_key(backup_id), json.dumps(body).encode())


def reserve_id(
    storage: Storage, name: str, database: str, server: str, attempts: int = 20
) -> tuple[str, datetime]:
    """Pick a new backup id on a target and claim it by creating its ``pending.json``.

    Two runs with one name in the same second (two databases, one default name) get two ids:
    the later one carries milliseconds. Raises StorageError when no id can be claimed.
    """
    for attempt in range(attempts):
        started = utcnow()
        backup_id = naming.make_id(name, started, millis=attempt > 0)
        if any(True for _ in storage.list(naming.backup_prefix(backup_id))):
            continue
        body = {
            "id": backup_id,
            "database": database,
            "server": server,
            "since": started.isoformat(),
            "token": secrets.token_hex(8),
        }
        if storage.create_exclusive(naming.pending_key(backup_id), json.dumps(body).encode()):
            return backup_id, started
        time.sleep(0.002)
    raise StorageError(f"could not claim a new backup id for {name!r} in {storage.url} (retry)")


@dataclass
class Reservation:
    """A backup id claimed on a target (its ``pending.json`` written), being written."""

    storage: Storage
    backup_id: str
    started: datetime
    manifest: Manifest | None = None

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest, the commit marker: only now is the backup listed."""
        if manifest.id != self.backup_id:
            raise StorageError(f"manifest of {manifest.id!r} committed as {self.backup_id!r}")
        write_manifest(self.storage, manifest)
        self.manifest = manifest


def claim_id(
    storage: Storage, name: str, at: datetime, database: str, server: str
) -> tuple[str, datetime]:
    """Claim exactly the id ``<name>_<at>`` (a backup made elsewhere at ``at``, imported now),
    as ``reserve_id`` claims a new one. Raises BackupExistsError when anything holds it."""
    backup_id = naming.make_id(name, at, millis=bool(at.microsecond))
    body = {"id": backup_id, "database": database, "server": server,
            "since": utcnow().isoformat(), "token": secrets.token_hex(8)}  # fmt: skip
    taken = any(True for _ in storage.list(naming.backup_prefix(backup_id)))
    if taken or not storage.create_exclusive(
        naming.pending_key(backup_id), json.dumps(body).encode()
    ):
        raise BackupExistsError(
            f"backup {backup_id!r} already exists in {storage.url} (or is being written): it "
            "is not overwritten"
        )
    return backup_id, at


@contextmanager
def new_backup(
    storage: Storage, name: str, database: str, server: str, *, at: datetime | None = None
) -> Iterator[Reservation]:
    """The one way a backup comes to exist (pgkeeper's own dumps and imports alike): reserve
    an id (``reserve_id``; with ``at``, exactly the one of that time, ``claim_id``), let the
    block write the objects under it and ``commit`` the manifest last, then drop
    ``pending.json``. On any exception, or a block that never
    committed, everything written under the id is removed before the error propagates (best
    effort: what a crash leaves is cleaned by the next backup, see ``clean_incomplete``)."""
    if at is None:
        backup_id, started = reserve_id(storage, name, database, server)
    else:  # raises before the try: an id that is taken is someone else's, never discarded
        backup_id, started = claim_id(storage, name, at, database, server)
    reservation = Reservation(storage, backup_id, started)
    try:
        yield reservation
        if reservation.manifest is None:
            raise StorageError(f"backup {backup_id} was written but never committed (a bug)")
    except BaseException:
        discard(storage, backup_id)
        raise
    clear_pending(storage, backup_id)


def discard(storage: Storage, backup_id: str) -> None:
    """Best-effort removal of a failed backup's objects, ``pending.json`` last (until then the
    folder says whose it was; the next backup finishes the job if this fails)."""
    try:
        for info in backup_objects(storage, backup_id):
            if info.key != naming.pending_key(backup_id):
                storage.delete(info.key)
        local = storage.local_path(naming.backup_prefix(backup_id))
        if local is not None and local.is_dir():
            shutil.rmtree(local, ignore_errors=True)  # what pg_dump -Fd left under a temp name
        storage.delete(naming.pending_key(backup_id))
    except (PgkeeperError, OSError) as exc:
        log.warning("could not remove the partial backup %s: %s", backup_id, exc)


def clear_pending(storage: Storage, backup_id: str) -> None:
    storage.delete(naming.pending_key(backup_id))


@dataclass(frozen=True)
class Incomplete:
    """A backup folder without a manifest."""

    backup_id: str
    database: str | None
    server: str | None
    since: datetime | None
    keys: tuple[str, ...]


def _incomplete(storage: Storage) -> Iterator[Incomplete]:
    by_id: dict[str, list[ObjectInfo]] = {}
    for info in storage.list():
        backup_id = naming.id_from_key(info.key)
        if backup_id is not None:
            by_id.setdefault(backup_id, []).append(info)
    for backup_id, infos in sorted(by_id.items()):
        keys = tuple(i.key for i in infos)
        if naming.manifest_key(backup_id) in keys:
            continue
        database = server = None
        since = max((i.modified for i in infos if i.modified), default=None)
        if naming.pending_key(backup_id) in keys:
            try:
                pending = json.loads(get_bytes(storage, naming.pending_key(backup_id)))
                database, server = pending.get("database"), pending.get("server")
                since = datetime.fromisoformat(pending["since"])
            except (StorageError, ValueError, KeyError, TypeError):
                pass
        yield Incomplete(backup_id, database, server, since, keys)


def list_incomplete(storage: Storage) -> list[Incomplete]:
    """Backup folders on a target that have no manifest (in progress or abandoned)."""
    return list(_incomplete(storage))


def clean_incomplete(
    storage: Storage,
    database: str | None,
    server: str | None,
    grace: timedelta = timedelta(hours=24),
    now: datetime | None = None,
) -> list[str]:
    """Remove incomplete backups that are certainly abandoned; return their ids.

    Safe to call while holding the backup lock of ``database`` on ``server``: folders that a
    run of that same database left are removed at once (the lock proves no such run is alive);
    any other folder only once it is older than ``grace``.
    """
    now = now or utcnow()
    removed: list[str] = []
    for item in _incomplete(storage):
        mine = database is not None and item.database == database and item.server == server
        stale = item.since is not None and now - item.since > grace
        if not (mine or stale):
            continue
        remove_incomplete(storage, item)
        log.info("removed incomplete backup %s from %s", item.backup_id, storage.url)
        removed.append(item.backup_id)
    return removed


def remove_incomplete(storage: Storage, item: Incomplete) -> None:
    """Delete an incomplete backup's objects, ``pending.json`` last: until the folder is gone
    it still says whose it was. Raises the backend's StorageError (e.g. Object Lock)."""
    pending = naming.pending_key(item.backup_id)
    for key in item.keys:
        if key != pending:
            storage.delete(key)
    storage.delete(pending)

