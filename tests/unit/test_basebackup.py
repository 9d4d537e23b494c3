"""A base backup's tar checked against its backup_manifest in the stream (pg_verifybackup's
checks): every listed file at its size and SHA-256, nothing unlisted, the manifest's own
checksum, and the WAL range it names; an encrypted one verified and extracted with its identity,
and checked as far as that goes without it."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pgkeeper import crypto, naming
from pgkeeper.basebackup import TarCheck, check_against_manifest, verify_base
from pgkeeper.errors import IdentityError, VerificationError
from pgkeeper.manifest import Manifest, StoredObject, utcnow
from pgkeeper.pipeline import compress_stream
from pgkeeper.pitr import extract
from pgkeeper.storage import LocalStorage

FILES = {"PG_VERSION": b"15\n", "global/pg_control": bytes(range(256)) * 32, "base/1/1": b""}


def manifest(files: dict[str, bytes], start: str = "0/2000028", end: str = "0/2000100") -> bytes:
    entries = ",\n".join(
        json.dumps({"Path": p, "Size": len(d), "Checksum-Algorithm": "SHA256",
                    "Checksum": hashlib.sha256(d).hexdigest()})
        for p, d in files.items()
    )  # fmt: skip
    body = (
        '{ "PostgreSQL-Backup-Manifest-Version": 1,\n"Files": [\n' + entries + "\n],\n"
        f'"WAL-Ranges": [\n{{ "Timeline": 1, "Start-LSN": "{start}", "End-LSN": "{end}" }}\n],\n'
    ).encode()
    return body + f'"Manifest-Checksum": "{hashlib.sha256(body).hexdigest()}"}}\n'.encode()


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def checked(raw: bytes, chunk: int = 1000) -> TarCheck:
    check = TarCheck()
    for at in range(0, len(raw), chunk):
        check.feed(raw[at : at + chunk])
    check.finish()
    return check


def test_a_matching_tar_passes_and_gives_the_wal_range() -> None:
    facts = check_against_manifest(checked(tar_of({**FILES, "backup_manifest": manifest(FILES)})))
    assert (facts.files, facts.timeline, facts.start_lsn, facts.stop_lsn) == (
        3, 1, 0x2000028, 0x2000100
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("flip", "SHA-256"),
        ("drop", "not in the backup"),
        ("extra", "not in backup_manifest"),
        ("manifest", "its own checksum"),
        ("none", "no backup_manifest"),
    ],
)
def test_every_difference_from_the_manifest_is_named(change: str, message: str) -> None:
    """A flipped byte, a missing or an unlisted file, an edited manifest, no manifest."""
    files = dict(FILES)
    listed = manifest(FILES)
    if change == "flip":
        files["global/pg_control"] = b"\x01" + files["global/pg_control"][1:]
    elif change == "drop":
        del files["PG_VERSION"]
    elif change == "extra":
        files["base/1/999"] = b"x"
    elif change == "manifest":
        listed = listed.replace(b'"Size": 3', b'"Size": 4')
    if change != "none":
        files["backup_manifest"] = listed
    with pytest.raises(VerificationError, match=message):
        check_against_manifest(checked(tar_of(files)))


def test_a_truncated_tar_is_a_structure_failure() -> None:
    raw = tar_of({**FILES, "backup_manifest": manifest(FILES)})
    with pytest.raises(VerificationError):
        check_against_manifest(checked(raw[: len(raw) // 3]))


# --- encrypted base backups ---------------------------------------------------------------------


def _stored_base(tmp_path: Path, recipients: crypto.Recipients) -> tuple[LocalStorage, Manifest]:
    """A base backup's tar stored as pgkeeper stores it with encryption on: tar -> zstd -> age."""
    storage = LocalStorage(tmp_path / "backups")
    backup_id = "base_2026-01-01T00-00-00Z"
    relative = naming.data_name(backup_id, "tar", "zstd", encrypted=True)
    raw = tar_of({**FILES, "backup_manifest": manifest(FILES)})
    with storage.open_write(naming.object_key(backup_id, relative)) as out:
        result = compress_stream(io.BytesIO(raw).read, out, "zstd", 2, recipients=recipients)
    now = utcnow()
    return storage, Manifest(
        kind="base", id=backup_id, name="base", database="*", server="db:5432", format="tar",
        compression="zstd", objects=[StoredObject(name=relative, size=result.size,
                                                  sha256=result.sha256)],
        size=result.size, started_at=now, finished_at=now,
        encryption=crypto.encryption_record(recipients),
    )  # fmt: skip


def _key(tmp_path: Path, name: str) -> tuple[crypto.Identity, crypto.Recipients]:
    from pyrage import x25519

    key = x25519.Identity.generate()
    path = tmp_path / f"{name}.txt"
    path.write_text(f"{key}\n")
    return crypto.Identity.load(path), crypto.Recipients.parse(str(key.to_public()))


def test_an_encrypted_base_backup_verifies_fully_with_the_identity_and_sealed_without(
    tmp_path: Path,
) -> None:
    """With the identity: decrypted, decoded, the tar against its backup_manifest. Without it
    (the backup host): sha256, age header and length only, recorded as not decrypted. A key
    that is not a recipient is an IdentityError, never a failed verification."""
    identity, recipients = _key(tmp_path, "key")
    other, _ = _key(tmp_path, "other")
    storage, stored = _stored_base(tmp_path, recipients)
    full = verify_base(storage, stored, "full", identity=identity)
    names = {c.name: c.ok for c in full.checks}
    assert full.ok and full.decrypted is True
    assert names == {"objects": True, "checksum": True, "decryption": True,
                     "compression": True, "backup_manifest": True}  # fmt: skip
    sealed = verify_base(storage, stored, "full")
    assert sealed.ok and sealed.decrypted is False
    assert {c.name for c in sealed.checks} == {"objects", "checksum", "encryption", "decryption"}
    assert "not decrypted" in next(c.detail for c in sealed.checks if c.name == "decryption")
    with pytest.raises(IdentityError):
        verify_base(storage, stored, "full", identity=other)
    path = storage.local_path(naming.object_key(stored.id, stored.objects[0].name))
    assert path is not None
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    for key in (identity, None):
        result = verify_base(storage, stored, "full", identity=key)
        assert not result.ok and [c.name for c in result.checks if not c.ok] == ["checksum"]


def test_an_encrypted_base_backup_extracts_only_with_its_identity(tmp_path: Path) -> None:
    """pitr restore's extraction decrypts in the stream; without the identity, or with a key
    that is not a recipient, it raises IdentityError and the folder stays empty."""
    identity, recipients = _key(tmp_path, "key")
    other, _ = _key(tmp_path, "other")
    storage, stored = _stored_base(tmp_path, recipients)
    dest = tmp_path / "data"
    dest.mkdir()
    for key in (None, other):
        with pytest.raises(IdentityError):
            extract(storage, stored, dest, key)
        assert list(dest.iterdir()) == []
    extract(storage, stored, dest, identity)
    assert (dest / "global" / "pg_control").read_bytes() == FILES["global/pg_control"]
    assert (dest / "PG_VERSION").read_bytes() == b"15\n"
