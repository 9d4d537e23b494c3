"""The backup record: a pydantic model and its JSON form, stored as ``<id>/manifest.json``.

The manifest is the commit marker of a backup: it is written after every data object is durable
and it is deleted before any data object. It never holds a secret: the server is recorded as
``host:port`` and the database by name only.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from pgkeeper import naming

MANIFEST_VERSION = 1


class StoredObject(BaseModel):
    """One data object of a backup: its name relative to the backup folder, size and sha256."""

    name: str
    size: int
    sha256: str


class CheckResult(BaseModel):
    name: str
    ok: bool
    detail: str = ""
    skipped: bool = Field(
        default=False,
        description="true: not checked, and the detail says why; never a failure (ok is true)",
    )


class Verification(BaseModel):
    """The outcome of the newest ``verify`` of this backup."""

    ok: bool
    at: datetime
    level: Literal["full", "quick"] = "full"
    checks: list[CheckResult] = Field(default_factory=list)
    decrypted: bool | None = Field(
        default=None,
        description="encrypted backups: whether this verification decrypted the data (it needs "
        "the identity); False: checksum, age header and length only",
    )


class Encryption(BaseModel):
    """How a backup is encrypted: age, to these recipients (fingerprints, never keys)."""

    method: Literal["age"] = "age"
    recipients: list[dict[str, str]] = Field(
        default_factory=list,
        description="each recipient's type (x25519, ssh-ed25519, ssh-rsa) and SHA256 "
        "fingerprint; empty for an imported age file (its recipients are not known)",
    )


class RestoreTest(BaseModel):
    """The outcome of one restore test of this backup against a staging server."""

    ok: bool
    at: datetime
    duration_seconds: float
    server: str
    tables_compared: int = 0
    mismatches: list[str] = Field(default_factory=list)
    checks: list[CheckResult] = Field(default_factory=list)
    missing_roles: list[str] = Field(
        default_factory=list,
        description="roles the backup names (owners, grantees) that the staging server lacks",
    )
    untested: list[str] = Field(
        default_factory=list,
        description="what the restore left out because of missing_roles ('ownership', "
        "'grants'): not tested, and no failure; the rest was tested",
    )

    @property
    def untested_note(self) -> str:
        """``grants not tested: staging (host:port) has no role shop_app`` ('' when nothing
        was left out)."""
        return untested_note(self.untested, self.missing_roles, self.server)


def untested_note(untested: list[str], missing_roles: list[str], server: str) -> str:
    """One line: what a restore test left out, because staging ``server`` lacks which roles."""
    if not untested:
        return ""
    plural = "s" if len(missing_roles) > 1 else ""
    return (
        f"{' and '.join(untested)} not tested: staging ({server}) has no role{plural} "
        f"{', '.join(missing_roles)}"
    )


class BaseBackupInfo(BaseModel):
    """What a base backup (``kind: base``, point-in-time recovery) needs besides its data: where
    in the WAL it starts and stops, and which cluster it is of."""

    system_identifier: int = Field(description="the cluster's pg_control system identifier")
    timeline: int
    start_lsn: str
    stop_lsn: str
    start_wal: str = Field(description="the first WAL segment a restore needs")
    stop_wal: str = Field(description="the WAL segment that makes it consistent")
    wal_segment_size: int = 16 * 1024 * 1024
    checkpoint_lsn: str = ""
    stopped_at: datetime = Field(description="the earliest moment a restore can target")
    files: int = Field(default=0, description="files in its backup_manifest")
    data_directory: str = Field(default="", description="the source server's data folder")


class Manifest(BaseModel):
    """Everything known about one complete backup."""

    manifest_version: int = MANIFEST_VERSION
    id: str
    name: str
    database: str
    server: str = Field(description="host:port of the source server, never credentials")
    server_version: str = ""
    pg_dump_version: str = ""
    kind: Literal["dump", "globals", "base"] = Field(
        default="dump",
        description="dump: one database (pg_dump); globals: a server's roles, memberships, "
        "role settings and tablespaces (pg_dumpall --globals-only), database '*'; base: "
        "pg_basebackup of the whole cluster for point-in-time recovery, database '*'",
    )
    format: Literal["custom", "plain", "directory", "tar"]
    compression: Literal["zstd", "gzip", "none"]
    compression_level: int | None = None
    encryption: Encryption | None = None
    objects: list[StoredObject]
    size: int
    raw_size: int | None = Field(default=None, description="bytes pg_dump wrote, uncompressed")
    started_at: datetime
    finished_at: datetime
    trigger: str = "manual"
    flow_run_id: str | None = Field(
        default=None, description="the Prefect flow run that made this backup, if one did"
    )
    status: Literal["complete"] = "complete"
    options: dict[str, Any] = Field(default_factory=dict)
    table_counts: dict[str, int] | None = None
    verification: Verification | None = None
    restore_tests: list[RestoreTest] = Field(default_factory=list)
    pinned: bool = False
    keep_until: datetime | None = Field(
        default=None,
        description="rotation never deletes it before this time (safety backups before a restore)",
    )
    uploads: dict[str, datetime] = Field(
        default_factory=dict, description="offsite target URL -> when a proven copy landed there"
    )
    pgkeeper_version: str = ""
    base: BaseBackupInfo | None = Field(
        default=None, description="for kind 'base': its WAL range, timeline and cluster"
    )

    # -- derived views -------------------------------------------------------------------------
    @property
    def filename(self) -> str:
        return naming.data_name(
            self.id, self.format, self.compression, self.kind,
            encrypted=self.encryption is not None,
        )  # fmt: skip

    @property
    def sha256(self) -> str:
        """The checksum of the single data object; for directory backups, of the TOC entry list."""
        if len(self.objects) == 1:
            return self.objects[0].sha256
        import hashlib

        ordered = sorted(self.objects, key=lambda o: o.name)
        joined = "\n".join(f"{o.sha256}  {o.name}" for o in ordered)
        return hashlib.sha256(joined.encode()).hexdigest()

    @property
    def verified(self) -> bool:
        """Its last verification passed and its last restore test (if any) did not fail."""
        return self.verification is not None and self.verification.ok and not self.restore_failed

    @property
    def verification_failed(self) -> bool:
        """Known bad: its last verification or its last restore test failed. Such a backup
        never counts for retention, is never ``latest``, and is not copied offsite."""
        return (self.verification is not None and not self.verification.ok) or self.restore_failed

    @property
    def restore_failed(self) -> bool:
        """Its last restore test failed (the restore itself, a row count or a check): the
        backup did not restore to what was dumped. (Staging being down is never recorded.)"""
        last = self.last_restore_test
        return last is not None and not last.ok

    @property
    def failed_at(self) -> datetime | None:
        """When the check that found it bad ran (for retention's grace period)."""
        if self.restore_failed and self.last_restore_test is not None:
            return self.last_restore_test.at
        if self.verification is not None and not self.verification.ok:
            return self.verification.at
        return None

    @property
    def last_restore_test(self) -> RestoreTest | None:
        return self.restore_tests[-1] if self.restore_tests else None

    @property
    def state(self) -> str:
        """One word for listings: verified, unverified, corrupt or restore-failed."""
        if self.restore_failed:
            return "restore-failed"
        if self.verification is None:
            return "unverified"
        return "verified" if self.verification.ok else "corrupt"

    def to_public(self) -> dict[str, Any]:
        """The JSON shape of the front doors: the seed's fields first, then the full record."""
        data = self.model_dump(mode="json")
        public: dict[str, Any] = {
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "timestamp": self.started_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "database": self.database,
            "compressed": self.compression != "none",
            "sha256": self.sha256,
            "state": self.state,
            "encrypted": self.encryption is not None,
        }
        for key, value in data.items():
            public.setdefault(key, value)
        return public

    def to_json(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        return cls.model_validate_json(raw)


def utcnow() -> datetime:
    return datetime.now(UTC)
