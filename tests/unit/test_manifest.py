"""The backup record: its JSON form round-trips, and its public shape is the seed's, secret-free."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from pgkeeper import naming
from pgkeeper.manifest import (
    CheckResult,
    Manifest,
    RestoreTest,
    StoredObject,
    Verification,
)

STARTED = datetime(2025, 10, 2, 10, 0, 0, 250000, tzinfo=UTC)
BACKUP_ID = naming.make_id("auto_backup", STARTED)
SECRET = "pgk-manifest-secret-pw"  # a password that must never reach a manifest


def _manifest(**overrides: object) -> Manifest:
    relative = naming.data_name(BACKUP_ID, "custom", "zstd")
    fields: dict[str, object] = {
        "id": BACKUP_ID,
        "name": "auto_backup",
        "database": "shop",
        "server": "db.example:5432",
        "server_version": "15.8",
        "pg_dump_version": "15.8",
        "format": "custom",
        "compression": "zstd",
        "compression_level": 3,
        "objects": [StoredObject(name=relative, size=1234, sha256="ab" * 32)],
        "size": 1234,
        "raw_size": 5678,
        "started_at": STARTED,
        "finished_at": STARTED + timedelta(seconds=3),
        "trigger": "schedule:daily",
        "options": {"schema_only": False, "tables": ["public.a"], "encoding": "UTF8"},
        "table_counts": {"public.a": 3, '"Odd ""name"""."ü"': 0},
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_json_round_trip_is_lossless() -> None:
    """to_json then from_json gives an equal record, timestamps and nested results included."""
    manifest = _manifest(
        verification=Verification(
            ok=True, at=STARTED, checks=[CheckResult(name="checksum", ok=True, detail="x")]
        ),
        restore_tests=[
            RestoreTest(ok=False, at=STARTED, duration_seconds=1.5, server="s:1",
                        mismatches=["public.a: 3 != 2"])
        ],
        pinned=True,
    )
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.started_at == STARTED
    assert again.started_at.tzinfo is not None


def test_to_json_is_json_with_a_trailing_newline() -> None:
    """The stored form is plain JSON (readable with jq), newline-terminated."""
    raw = _manifest().to_json()
    assert raw.endswith(b"\n")
    data = json.loads(raw)
    assert data["id"] == BACKUP_ID
    assert data["objects"][0]["sha256"] == "ab" * 32


def test_to_public_has_the_seed_fields() -> None:
    """The front doors' JSON carries id, filename, size, timestamp, database, compressed, sha256."""
    public = _manifest().to_public()
    assert public["id"] == BACKUP_ID
    assert public["filename"] == BACKUP_ID + ".dump.zst"
    assert public["size"] == 1234
    assert public["timestamp"] == "2025-10-02T10:00:00.250000Z"
    assert datetime.fromisoformat(public["timestamp"]) == STARTED
    assert public["database"] == "shop"
    assert public["compressed"] is True
    assert public["sha256"] == "ab" * 32
    assert list(public)[:7] == [
        "id", "filename", "size", "timestamp", "database", "compressed", "sha256",
    ]
    json.dumps(public)  # serialisable as it is


def test_to_public_uncompressed_is_not_compressed() -> None:
    """`compressed` is false exactly when the compression is none."""
    relative = naming.data_name(BACKUP_ID, "plain", "none")
    manifest = _manifest(
        format="plain",
        compression="none",
        objects=[StoredObject(name=relative, size=1, sha256="cd" * 32)],
    )
    public = manifest.to_public()
    assert public["compressed"] is False
    assert public["filename"] == BACKUP_ID + ".sql"


def test_directory_sha256_is_a_digest_of_every_object() -> None:
    """For many objects, sha256 is the digest of the sorted `sha  name` list, order-independent."""
    objects = [
        StoredObject(name="d.dir/toc.dat", size=1, sha256="11" * 32),
        StoredObject(name="d.dir/3001.dat.gz", size=2, sha256="22" * 32),
    ]
    a = _manifest(format="directory", compression="gzip", objects=objects)
    b = _manifest(format="directory", compression="gzip", objects=list(reversed(objects)))
    expected = hashlib.sha256(
        f"{'22' * 32}  d.dir/3001.dat.gz\n{'11' * 32}  d.dir/toc.dat".encode()
    ).hexdigest()
    assert a.sha256 == b.sha256 == expected
    assert a.filename == BACKUP_ID + ".dir"


def test_manifest_has_no_field_for_a_secret() -> None:
    """No field of the record can hold a password or key: server is host:port only."""
    names = set(Manifest.model_fields)
    for forbidden in ("password", "url", "database_url", "secret", "token", "dsn", "conninfo"):
        assert forbidden not in names
    public = _manifest().to_public()
    assert not {k for k in public if "password" in k or "secret" in k or "token" in k}


def test_no_secret_reaches_the_json_of_a_record_built_normally() -> None:
    """A record built from the usual fields never contains the source's password."""
    manifest = _manifest()
    assert SECRET.encode() not in manifest.to_json()
    assert SECRET not in json.dumps(manifest.to_public())


@pytest.mark.parametrize(
    ("verification", "state"),
    [(None, "unverified"), (True, "verified"), (False, "corrupt")],
)
def test_state_follows_the_last_verification(verification: bool | None, state: str) -> None:
    """state is unverified/verified/corrupt after no, a passing, or a failing verification."""
    v = None if verification is None else Verification(ok=verification, at=STARTED)
    manifest = _manifest(verification=v)
    assert manifest.state == state
    assert manifest.to_public()["state"] == state
    assert manifest.verified is (verification is True)
    assert manifest.verification_failed is (verification is False)


def test_unknown_format_is_rejected() -> None:
    """A manifest with a format pgkeeper does not know does not validate."""
    raw = json.loads(_manifest().to_json())
    raw["format"] = "zip"
    with pytest.raises(ValidationError):
        Manifest.from_json(json.dumps(raw).encode())


def test_last_restore_test_is_the_newest() -> None:
    """last_restore_test is the last one appended, or None."""
    assert _manifest().last_restore_test is None
    tests = [
        RestoreTest(ok=True, at=STARTED, duration_seconds=1, server="s"),
        RestoreTest(ok=False, at=STARTED + timedelta(days=1), duration_seconds=1, server="s"),
    ]
    assert _manifest(restore_tests=tests).last_restore_test == tests[1]
