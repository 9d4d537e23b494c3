"""A base backup's tar checked against its backup_manifest in the stream (pg_verifybackup's
checks): every listed file at its size and SHA-256, nothing unlisted, the manifest's own
checksum, and the WAL range it names."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from pgkeeper.basebackup import TarCheck, check_against_manifest
from pgkeeper.errors import VerificationError

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
