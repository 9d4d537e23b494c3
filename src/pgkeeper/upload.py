"""Upload: copy backups from the target that holds them to every offsite target, and prove it.

Per backup and offsite target, in order:
  1. skip it when the target already holds a manifest whose objects are all present
  2. write ``pending.json`` there
  3. stream each object across (resuming: an object already there with the right sha256 is not
     sent again); the sender hashes what it reads and the backend refuses to finalise an object
     whose bytes do not hash to the manifest's sha256
  4. prove each copy: the provider's own record of the sha256 (S3 metadata / checksum, GCS
     metadata) must equal the manifest's, or the object is read back and hashed
  5. write the manifest there (the commit marker), then remove ``pending.json``
A failure leaves no manifest on that target, so the copy is never listed; the next upload
resumes it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pgkeeper import catalog, naming
from pgkeeper.errors import PgkeeperError, VerificationError, is_transient
from pgkeeper.manifest import CheckResult, Manifest, StoredObject, Verification, utcnow
from pgkeeper.pipeline import Progress
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets
from pgkeeper.storage.base import CHUNK, sha256_of

log = logging.getLogger(__name__)


@dataclass
class UploadReport:
    """What one upload of one backup did, per offsite target."""

    backup_id: str
    source: str
    copied_to: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    transient: list[str] = field(default_factory=list)  # failed targets worth retrying

    @property
    def ok(self) -> bool:
        return not self.failed


def _remote_sha256(storage: Storage, key: str) -> str | None:
    return storage.remote_sha256(key) if storage.stored_checksums else None


def copy_is_complete(storage: Storage, manifest: Manifest) -> bool:
    """True when the target holds this backup's manifest and every object at its size."""
    theirs = catalog.read_manifest(storage, manifest.id)
    if theirs is None:
        return False
    present = {i.key: i.size for i in catalog.backup_objects(storage, manifest.id)}
    return all(
        present.get(naming.object_key(manifest.id, o.name)) == o.size for o in manifest.objects
    )


def _already_copied(dest: Storage, key: str, obj: StoredObject) -> bool:
    info = dest.stat(key)
    if info is None or info.size != obj.size:
        return False
    return _remote_sha256(dest, key) == obj.sha256


def _prove(dest: Storage, key: str, obj: StoredObject) -> str:
    """Check the stored copy's sha256; return how it was proven. Raise VerificationError."""
    remote = _remote_sha256(dest, key)
    how = "provider checksum"
    if remote is None:
        remote, _ = sha256_of(dest, key)
        how = "read back"
    if remote != obj.sha256:
        raise VerificationError(
            f"the copy of {obj.name} in {dest.url} does not match its manifest (checksum check "
            "failed); it will be sent again by the next upload",
            check="checksum",
        )
    return how


def _send(
    source: Storage, dest: Storage, manifest: Manifest, obj: StoredObject, progress: Progress | None
) -> None:
    key = naming.object_key(manifest.id, obj.name)
    # Cloud backends hash what they send and refuse to finalise an object whose bytes differ
    # from the declared sha256; hashing here too would cost a second pass of CPU per byte.
    digest = None if hasattr(dest, "remote_sha256") else hashlib.sha256()
    with (
        source.open_read(key) as src,
        dest.open_write(key, size_hint=obj.size, metadata={"sha256": obj.sha256}) as out,
    ):
        while chunk := src.read(CHUNK):
            if digest is not None:
                digest.update(chunk)
            out.write(chunk)
            if progress:
                progress(len(chunk))
        if digest is not None and digest.hexdigest() != obj.sha256:
            # Raised inside open_write: the object is never finalised on the offsite target.
            raise VerificationError(
                f"the source copy of {obj.name} in {source.url} does not match its manifest "
                "(checksum check failed); run 'pgkeeper verify' on it",
                check="checksum",
            )


def copy_backup(
    source: Storage, dest: Storage, manifest: Manifest, progress: Progress | None = None
) -> Manifest:
    """Copy one backup to one target, prove it, and commit it with its manifest there."""
    catalog.write_pending(dest, manifest.id, manifest.database, manifest.server)
    proofs: list[str] = []
    for obj in manifest.objects:
        key = naming.object_key(manifest.id, obj.name)
        if _already_copied(dest, key, obj):
            proofs.append("provider checksum")
            continue
        _send(source, dest, manifest, obj, progress)
        proofs.append(_prove(dest, key, obj))
    checked = Verification(
        ok=True,
        at=utcnow(),
        level="quick",
        checks=[
            CheckResult(
                name="checksum",
                ok=True,
                detail=f"{len(manifest.objects)} object(s) match, by "
                + ", ".join(sorted(set(proofs))),
            )
        ],
    )
    # The copy's record says what was proven here; a full verify of it can run later.
    verification = checked if manifest.verified else manifest.verification
    copy = manifest.model_copy(update={"verification": verification})
    catalog.write_manifest(dest, copy)
    catalog.clear_pending(dest, manifest.id)
    return copy


def upload_backup(
    settings: Settings,
    backup_id: str,
    *,
    storages: Sequence[Storage] | None = None,
    progress: Progress | None = None,
) -> UploadReport:
    """Copy one backup to every target that lacks it (source: the first target holding it).

    Raises InvalidBackupIdError/BackupNotFoundError; per-target failures are collected in the
    report (and logged) so one unreachable bucket does not stop the others. A backup that
    failed verification is not uploaded.
    """
    storages = list(storages) if storages is not None else targets(settings)
    manifest, source = catalog.find(storages, backup_id)
    report = UploadReport(backup_id=backup_id, source=source.url)
    if manifest.verification_failed:
        for dest in storages:
            if dest is not source:
                report.failed[dest.url] = "not uploaded: the backup failed verification"
        return report
    for dest in storages:
        if dest is source:
            continue
        try:
            if copy_is_complete(dest, manifest):
                report.already_there.append(dest.url)
                continue
            copy_backup(source, dest, manifest, progress)
        except PgkeeperError as exc:
            log.info("upload of %s to %s failed: %s", backup_id, dest.url, exc)  # in the report
            report.failed[dest.url] = exc.message
            if is_transient(exc):
                report.transient.append(dest.url)
            continue
        report.copied_to.append(dest.url)
        log.info("uploaded %s to %s", backup_id, dest.url)
    if report.copied_to or report.already_there:
        _record_uploads(source, backup_id, report.copied_to + report.already_there)
    return report


def _record_uploads(source: Storage, backup_id: str, urls: list[str]) -> None:
    """Note on the source manifest where proven copies landed, so ``upload_missing`` does not
    send again a copy that offsite retention deleted on purpose."""
    try:
        current = catalog.read_manifest(source, backup_id)
        if current is None:
            return
        now = utcnow()
        uploads = {**current.uploads, **{url: current.uploads.get(url, now) for url in urls}}
        if uploads != current.uploads:
            catalog.write_manifest(source, current.model_copy(update={"uploads": uploads}))
    except PgkeeperError as exc:
        log.warning("could not record the uploads of %s: %s", backup_id, exc)


def upload_missing(
    settings: Settings, *, storages: Sequence[Storage] | None = None
) -> list[UploadReport]:
    """Upload every verified backup of the primary target that some offsite target has never
    received (``upload_backup`` skips targets that already hold it).

    A backup whose manifest records a proven copy on a target is not sent there again, even if
    that target's own retention has since deleted it (no upload/rotate churn). Unverified
    backups wait for their verification, unless verification is off (BACKUP_VERIFY=off).
    """
    storages = list(storages) if storages is not None else targets(settings)
    if len(storages) < 2:
        return []
    reports = []
    for manifest in catalog.list_backups(storages[0]):
        if manifest.verification_failed:
            continue
        if manifest.verification is None and settings.backup_verify != "off":
            continue  # its verification has not run yet: offsite retention would count it bad
        if all(dest.url in manifest.uploads for dest in storages[1:]):
            continue
        reports.append(upload_backup(settings, manifest.id, storages=storages))
    return reports


def clean_offsite(settings: Settings, *, storages: Sequence[Storage] | None = None) -> list[str]:
    """Abort orphan multipart uploads left by killed uploaders on S3 targets; return keys."""
    storages = list(storages) if storages is not None else targets(settings)
    aborted: list[str] = []
    for storage in storages:
        if not storage.orphan_uploads:
            continue
        try:
            aborted.extend(storage.abort_orphan_uploads(""))
        except PgkeeperError as exc:
            log.warning("could not clean orphan uploads in %s: %s", storage.url, exc)
    return aborted
