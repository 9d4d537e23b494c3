"""Re-encrypt an existing backup to the current recipients (``pgkeeper rekey ID``).

Changing BACKUP_ENCRYPTION_RECIPIENTS applies to new backups; ``rekey`` brings an old one along
(a key retired or lost on the restore side, a new one added), and encrypts a backup made before
encryption was turned on. The procedure, in order (each step's safety reason beside it):
  1. the current recipients, and the identity when the backup is encrypted, proven to open it
                                              -> nothing is written with the wrong key
  2. a new backup id on the primary target (same name; the manifest keeps the original's times,
     row counts, restore tests and pin, so retention and ``latest`` treat it as the original)
  3. every object: stored bytes (sha256 checked) -> decrypt -> encrypt -> sha256 -> storage;
     the plaintext never touches disk
  4. verify the new copy (decrypted when the identity opens it, else header and length), then
     write its manifest (the commit marker; ``catalog.new_backup`` removes a copy that failed),
     and copy it to each offsite target that held the old one, proven by checksum
                                        -> a new verified copy exists wherever the old one was
  5. only then delete the old backup (manifest first) from each target holding the new copy;
     a target the copy could not reach keeps the old backup, and the result says so
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from pgkeeper import catalog, crypto, naming
from pgkeeper.errors import ConfigError, PgkeeperError
from pgkeeper.manifest import Manifest, StoredObject, utcnow
from pgkeeper.pipeline import HashingReader, Progress
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.upload import copy_backup
from pgkeeper.verify import verify_copy

log = logging.getLogger(__name__)


@dataclass
class RekeyResult:
    """What ``rekey_backup`` did."""

    old_id: str
    new_id: str
    recipients: list[dict[str, str]]
    stored_in: list[str] = field(default_factory=list)  # targets holding the new copy
    removed_from: list[str] = field(default_factory=list)  # targets the old one was deleted from
    problems: list[str] = field(default_factory=list)  # targets where the old one was kept

    @property
    def ok(self) -> bool:
        return not self.problems


def _reencrypt(
    source: Storage,
    old: Manifest,
    obj: StoredObject,
    dest: Storage,
    new_id: str,
    identity: crypto.Identity | None,
    recipients: crypto.Recipients,
    progress: Progress | None,
) -> StoredObject:
    """One object, re-encrypted to ``recipients``: the new object's record."""
    name = obj.name.replace(old.id, new_id, 1)
    if old.encryption is None:
        name = name + crypto.SUFFIX  # a file of a directory backup, or the whole dump
    stored_digest = hashlib.sha256()
    size = 0
    with (
        source.open_read(naming.object_key(old.id, obj.name)) as src,
        dest.open_write(naming.object_key(new_id, name)) as out,
    ):
        reader = HashingReader.of(src, obj, progress)
        plain = (
            crypto.DecryptingReader(reader.read, identity) if identity is not None else None
        )
        try:

            def read(n: int) -> bytes:
                return plain.read(n) if plain is not None else reader.read(n)

            def emit(block: bytes) -> None:
                nonlocal size
                stored_digest.update(block)
                out.write(block)
                size += len(block)

            crypto.encrypt_stream(read, emit, recipients)
        finally:
            if plain is not None:
                plain.close()
        reader.check()  # the old bytes were the manifest's: else nothing is committed
    return StoredObject(name=name, size=size, sha256=stored_digest.hexdigest())


def rekey_backup(
    settings: Settings,
    backup_id: str,
    *,
    storages: list[Storage] | None = None,
    progress: Progress | None = None,
) -> RekeyResult:
    """Re-encrypt backup ``backup_id`` to BACKUP_ENCRYPTION_RECIPIENTS as a new verified copy,
    then delete the old one (see the module docstring).

    Raises ConfigError when no recipients are set, IdentityError when an encrypted backup has
    no identity that opens it, InvalidBackupIdError/BackupNotFoundError, VerificationError when
    the old copy is damaged or the new one fails verification (the old one is then kept and the
    new one removed), StorageError. Targets the new copy could not reach are in ``problems``.
    """
    recipients = crypto.recipients_of(settings)
    if recipients is None:
        raise ConfigError(
            "BACKUP_ENCRYPTION_RECIPIENTS is not set: rekey encrypts to the current recipients "
            "(set it to the public keys the backup should be readable with)"
        )
    storages = storages if storages is not None else targets(settings)
    naming.validate_id(backup_id)
    old, source = catalog.find(storages, backup_id)
    identity = crypto.identity_for(settings, old, "rekeying it")
    if identity is not None:
        crypto.check_identity(source, old, identity)
    primary = storages[0]
    name = naming.parse_id(old.id)[0]
    with catalog.new_backup(primary, name, old.database, old.server) as reservation:
        new_id = reservation.backup_id
        log.info("rekey of %s from %s into %s on %s", old.id, source.url, new_id, primary.url)
        objects = [
            _reencrypt(source, old, obj, primary, new_id, identity, recipients, progress)
            for obj in old.objects
        ]
        new = old.model_copy(
            update={
                "id": new_id,
                "objects": objects,
                "size": sum(o.size for o in objects),
                "encryption": crypto.encryption_record(recipients),
                "verification": None,
                "uploads": {},
                "options": {**old.options, "rekeyed_from": old.id, "rekeyed_at": str(utcnow())},
            }
        )
        level = "full" if settings.backup_verify != "quick" else "quick"
        # Verified before its manifest exists: a bad copy is never listed, and is removed. (An
        # identity held here that the new recipients exclude verifies it without decrypting.)
        new = verify_copy(settings, primary, new, level=level, record=False)
        reservation.commit(new)
    result = RekeyResult(old.id, new_id, recipients.fingerprints(), stored_in=[primary.url])
    holders = [s for s in storages if catalog.read_manifest(s, old.id) is not None]
    for target in holders:
        if target is not primary:
            try:
                copy_backup(primary, target, new, progress)
                result.stored_in.append(target.url)
            except PgkeeperError as exc:
                result.problems.append(
                    f"{target.url}: the new copy could not be stored ({exc}); the old backup "
                    f"{old.id} was kept there (copy the new one with 'pgkeeper upload {new_id}', "
                    f"then 'pgkeeper delete {old.id}')"
                )
                continue
        catalog.delete_backup(target, old.id)
        result.removed_from.append(target.url)
    return result


__all__ = ["RekeyResult", "rekey_backup"]
