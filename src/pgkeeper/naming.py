"""The only place that formats and parses backup ids and storage keys.

A backup id is ``<name>_<UTC timestamp>``, e.g. ``auto_backup_2025-10-02T10-00-00Z``; when two
backups with one name start in the same second the later one carries milliseconds
(``..._2025-10-02T10-00-00.123Z``). Ids are sortable by time within a name, but ordering always
uses the manifest's recorded time, never the id.

Storage layout under a target's prefix, one folder per backup::

    <id>/manifest.json        the commit marker, written last, deleted first
    <id>/pending.json         written first, removed at commit: who is writing this backup
    <id>/<id>.dump.zst        custom format (zstd);  .dump.gz / .dump for gzip / none
    <id>/<id>.sql.zst         plain format (zstd);   .sql.gz / .sql
    <id>/<id>.dir/...         directory format: pg_dump's own files, compressed by pg_dump
    <id>/<id>.globals.sql.zst a server's globals (pg_dumpall --globals-only, plain SQL);
                              .globals.sql.gz / .globals.sql
    <id>/<id>.dump.zst.age    encrypted (age): the same names plus ``.age``, each file of a
                              directory backup too (``<id>.dir/toc.dat.age``)

and, outside every backup folder (so rotation never deletes it)::

    imports/<id>.json         a backup imported from a folder (``folder_import``): that file's
                              name and sha256, so a re-run never imports it again
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pgkeeper.errors import InvalidBackupIdError, UsageError

# \Z, not $: $ also matches before a trailing newline, which would let "id\n" through.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}\Z")
_TS = r"(?P<ts>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d{3})?Z)"
ID_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,62})_" + _TS + r"\Z")

MANIFEST = "manifest.json"
PENDING = "pending.json"
IMPORTS = "imports/"

FORMATS = ("custom", "plain", "directory")
COMPRESSIONS = ("zstd", "gzip", "none")

_EXT = {
    ("custom", "zstd"): ".dump.zst",
    ("custom", "gzip"): ".dump.gz",
    ("custom", "none"): ".dump",
    ("plain", "zstd"): ".sql.zst",
    ("plain", "gzip"): ".sql.gz",
    ("plain", "none"): ".sql",
    ("directory", "zstd"): ".dir",
    ("directory", "gzip"): ".dir",
    ("directory", "none"): ".dir",
    ("tar", "zstd"): ".tar.zst",
    ("tar", "gzip"): ".tar.gz",
    ("tar", "none"): ".tar",
}
# A server's globals (manifest kind "globals") are plain SQL from pg_dumpall --globals-only:
# named apart from a database's plain dump, which restores into a database, not a server.
_GLOBALS_EXT = {
    "zstd": ".globals.sql.zst",
    "gzip": ".globals.sql.gz",
    "none": ".globals.sql",
}


def validate_name(name: str) -> str:
    """Return ``name`` if it can start a backup id; raise UsageError otherwise."""
    if not NAME_RE.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise UsageError(
            f"backup name {shown!r} is not allowed "
            "(use 1-63 letters, digits, '_' or '-', starting with a letter or digit)"
        )
    return name


def validate_id(backup_id: str) -> str:
    """Return ``backup_id`` if it has the backup id shape; raise InvalidBackupIdError otherwise.

    This is the gate every user-supplied id passes before it reaches storage: nothing that
    fails it (a path, an empty string, a URL) is ever used to build a key.
    """
    if not isinstance(backup_id, str) or not ID_RE.match(backup_id):
        shown = backup_id if isinstance(backup_id, str) and len(backup_id) < 120 else "<id>"
        raise InvalidBackupIdError(
            f"{shown!r} is not a backup id (ids look like 'auto_backup_2025-10-02T10-00-00Z'; "
            "run 'pgkeeper list' to see them)"
        )
    return backup_id


def format_timestamp(when: datetime, millis: bool = False) -> str:
    when = when.astimezone(UTC)
    text = when.strftime("%Y-%m-%dT%H-%M-%S")
    if millis:
        text += f".{when.microsecond // 1000:03d}"
    return text + "Z"


def make_id(name: str, when: datetime, millis: bool = False) -> str:
    """Build a backup id from a name and a start time."""
    return f"{validate_name(name)}_{format_timestamp(when, millis)}"


def parse_id(backup_id: str) -> tuple[str, datetime]:
    """Split an id into its name and UTC start time."""
    match = ID_RE.match(validate_id(backup_id))
    if match is None:  # unreachable: validate_id accepted it
        raise InvalidBackupIdError(f"{backup_id!r} is not a backup id")
    ts = match.group("ts")
    fmt = "%Y-%m-%dT%H-%M-%S.%fZ" if "." in ts else "%Y-%m-%dT%H-%M-%SZ"
    return match.group("name"), datetime.strptime(ts, fmt).replace(tzinfo=UTC)


ENCRYPTED = ".age"


def extension(fmt: str, compression: str, kind: str = "dump", encrypted: bool = False) -> str:
    """The data file's extension: ``kind`` is the manifest's (``globals``: a server's roles and
    tablespaces, always plain SQL); an encrypted file adds ``.age`` (a directory backup's
    folder keeps ``.dir``: its files carry the suffix)."""
    base = _GLOBALS_EXT[compression] if kind == "globals" else _EXT[(fmt, compression)]
    return base + (ENCRYPTED if encrypted and fmt != "directory" else "")


def data_name(
    backup_id: str, fmt: str, compression: str, kind: str = "dump", encrypted: bool = False
) -> str:
    """The file (or folder, for directory format) name of a backup's data."""
    return validate_id(backup_id) + extension(fmt, compression, kind, encrypted)


def backup_prefix(backup_id: str) -> str:
    return validate_id(backup_id) + "/"


def manifest_key(backup_id: str) -> str:
    return backup_prefix(backup_id) + MANIFEST


def pending_key(backup_id: str) -> str:
    return backup_prefix(backup_id) + PENDING


def object_key(backup_id: str, relative: str) -> str:
    """Key of one data object of a backup, ``relative`` being the manifest's object name."""
    if relative.startswith("/") or ".." in relative.split("/") or not relative:
        raise InvalidBackupIdError(f"object name {relative!r} in backup {backup_id!r} is unsafe")
    return backup_prefix(backup_id) + relative


def import_record_key(backup_id: str) -> str:
    """Where the primary target records that ``backup_id`` was imported from a folder."""
    return IMPORTS + validate_id(backup_id) + ".json"


def id_from_key(key: str) -> str | None:
    """The backup id a storage key belongs to, or None for keys outside the layout."""
    head = key.split("/", 1)[0]
    return head if ID_RE.match(head) else None


# --- the WAL archive (point-in-time recovery) ----------------------------------------------------
#
# WAL files live outside the backup-id key space ("wal" never has the shape of an id, so the
# catalog, rotation's plan and incomplete-backup cleanup never take them for backups)::
#
#     wal/<system identifier>/<timeline>/<WAL file name>-<sha256 of its bytes>.zst[.age]
#
# ``.age`` marks a file encrypted to BACKUP_ENCRYPTION_RECIPIENTS; the sha256 is always of the
# WAL file's own (plaintext) bytes, so an identical push is recognised without the private key
# (age encryption is randomised: two encryptions of one file never match), as pgBackRest names
# its encrypted WAL by the plaintext's checksum.
#
# The system identifier (decimal, from the cluster's pg_control) keeps two clusters' archives
# apart: their segment names collide, their contents never match. The checksum is part of the
# name, so it is recorded atomically with the object, and an object under a name can only ever
# hold the bytes that hash to it: a second push of different bytes gets a different key, which
# the archive refuses (see ``pgkeeper.wal``) instead of overwriting anything.

WAL_ROOT = "wal"
WAL_NAME_RE = re.compile(
    r"^(?:(?P<segment>[0-9A-F]{24})(?P<suffix>\.partial|\.[0-9A-F]{8}\.backup)?"
    r"|(?P<history>[0-9A-F]{8})\.history)\Z"
)
_WAL_KEY_RE = re.compile(
    r"^wal/(?P<system>\d{1,20})/(?P<timeline>[0-9A-F]{8})/"
    r"(?P<name>[0-9A-F][0-9A-Fa-z.]{7,40})-(?P<sha256>[0-9a-f]{64})\.zst(?:\.age)?\Z"
)


def validate_wal_name(name: str) -> str:
    """Return ``name`` if it is a WAL file name PostgreSQL archives (a segment, a ``.partial``
    segment, a ``.backup`` history file or a timeline ``.history`` file); raise UsageError."""
    if not isinstance(name, str) or not WAL_NAME_RE.match(name):
        shown = name if isinstance(name, str) and len(name) < 80 else "<name>"
        raise UsageError(
            f"{shown!r} is not a WAL file name (expected e.g. 000000010000000000000002 or "
            "00000002.history: pass %f / %p as PostgreSQL gives them)"
        )
    return name


def wal_timeline(name: str) -> str:
    """The timeline part (8 hex digits) of a WAL file name."""
    return validate_wal_name(name)[:8]


def wal_system_prefix(system_id: int) -> str:
    return f"{WAL_ROOT}/{int(system_id)}/"


def wal_timeline_prefix(system_id: int, timeline: str) -> str:
    if not re.fullmatch(r"[0-9A-F]{8}", timeline):
        raise UsageError(f"{timeline!r} is not a timeline (8 hex digits, e.g. 00000002)")
    return f"{wal_system_prefix(system_id)}{timeline}/"


def wal_name_prefix(system_id: int, name: str) -> str:
    """The prefix every stored copy of WAL file ``name`` starts with (one per checksum)."""
    return f"{wal_timeline_prefix(system_id, wal_timeline(name))}{name}-"


def wal_key(system_id: int, name: str, sha256: str, encrypted: bool = False) -> str:
    """The key of WAL file ``name`` whose bytes hash to ``sha256`` (``.age`` when encrypted)."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return f"{wal_name_prefix(system_id, name)}{sha256}.zst" + (ENCRYPTED if encrypted else "")


def wal_key_encrypted(key: str) -> bool:
    """Whether an archive key names an encrypted (age) WAL file."""
    return key.endswith(ENCRYPTED)


def parse_wal_key(key: str) -> tuple[int, str, str] | None:
    """``(system id, WAL file name, sha256)`` of an archive key; None for any other key
    (temporary upload names, foreign files)."""
    match = _WAL_KEY_RE.match(key)
    if match is None or not WAL_NAME_RE.match(match.group("name")):
        return None
    if match.group("name")[:8] != match.group("timeline"):
        return None
    return int(match.group("system")), match.group("name"), match.group("sha256")
