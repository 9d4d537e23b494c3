"""The WAL archive without a server: names and LSNs, keys outside the backup-id space, push and
fetch on a local folder (same bytes twice, other bytes refused, gaps, damage), retention's
pruning plan, and the spool that lets wal-push answer without loading pgkeeper."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from pgkeeper import catalog, crypto, naming, wal, wal_spool
from pgkeeper.entry import fast_wal_fetch, fast_wal_push
from pgkeeper.errors import (
    ArchiveError,
    IdentityError,
    UsageError,
    WalConflictError,
    WalGapError,
    WalMissingError,
)
from pgkeeper.storage import LocalStorage
from tests.support.pitr import segment_bytes

SYSTEM = 7715734109600166953
MIB = 1024 * 1024


def write_segment(folder: Path, segno: int, body: bytes = b"", timeline: int = 1) -> Path:
    name = wal.segment_name(timeline, segno)
    path = folder / name
    path.write_bytes(segment_bytes(SYSTEM, timeline, segno, body or os.urandom(4096)))
    return path


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "backups")


@pytest.fixture
def pg_wal(tmp_path: Path) -> Path:
    folder = tmp_path / "pg_wal"
    folder.mkdir()
    return folder


# --- names, LSNs, keys ------------------------------------------------------------------------


def test_lsn_round_trip_and_segment_arithmetic() -> None:
    """LSNs parse and print as PostgreSQL writes them; segment numbers follow 16 MiB segments."""
    assert wal.parse_lsn("0/2000028") == 0x2000028
    assert wal.format_lsn(0x1_0000_0028) == "1/28"
    assert wal.segment_name(1, 0x100) == "000000010000000100000000"
    assert wal.segment_number("000000010000000100000000") == 0x100
    assert wal.segment_of(wal.parse_lsn("0/2000028")) == 2
    with pytest.raises(UsageError):
        wal.parse_lsn("0/xyz")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("000000010000000000000002", "segment"),
        ("000000010000000000000002.partial", "partial"),
        ("000000010000000000000002.00000028.backup", "backup"),
        ("00000002.history", "history"),
    ],
)
def test_every_file_postgres_archives_is_a_wal_name(name: str, kind: str) -> None:
    """Segments, partial segments, backup and timeline history files are WAL names; the cheap
    check of the fast path agrees with the strict one."""
    assert wal.kind_of(name) == kind
    assert wal_spool.looks_like_wal(name)


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "00000001000000000000000g", "0000000100000000000000021", "x.history",
     "000000010000000000000002.backup", "", "RECOVERYXLOG"],
)  # fmt: skip
def test_anything_else_is_refused_before_it_becomes_a_key(name: str) -> None:
    """A path, a lowercase or short name, a bare .backup: refused by both checks."""
    with pytest.raises(UsageError):
        naming.validate_wal_name(name)
    assert not wal_spool.looks_like_wal(name)


def test_wal_keys_carry_the_checksum_and_stay_outside_backup_ids() -> None:
    """wal/<system>/<timeline>/<name>-<sha256>.zst parses back; the catalog never takes it
    for a backup (so listing, rotation and incomplete cleanup ignore it)."""
    sha = hashlib.sha256(b"x").hexdigest()
    key = naming.wal_key(SYSTEM, "000000020000000000000005", sha)
    assert key == f"wal/{SYSTEM}/00000002/000000020000000000000005-{sha}.zst"
    assert naming.parse_wal_key(key) == (SYSTEM, "000000020000000000000005", sha)
    assert naming.id_from_key(key) is None
    assert naming.parse_wal_key(f"wal/{SYSTEM}/00000002/.000000020000000000000005-x.tmp") is None
    assert naming.parse_wal_key(key.replace("/00000002/", "/00000001/")) is None


# --- push and fetch ------------------------------------------------------------------------------


def test_push_then_fetch_returns_the_same_bytes(
    storage: LocalStorage, pg_wal: Path, tmp_path: Path
) -> None:
    """A pushed segment is stored compressed under its checksum and fetched back byte-exact."""
    path = write_segment(pg_wal, 3)
    result = wal.push(storage, path)
    assert not result.already and result.stored < result.size
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "RECOVERYXLOG"
    got = wal.fetch([storage], path.name, out, system_id=SYSTEM)
    assert out.read_bytes() == path.read_bytes() and got.sha256 == result.sha256
    assert catalog.list_backups(storage) == []


def test_the_same_bytes_twice_succeed_other_bytes_are_refused(
    storage: LocalStorage, pg_wal: Path
) -> None:
    """Invariant 12: pushing the same segment again is a success that writes nothing; other
    bytes under the name raise WalConflictError and the archived copy stays as it was."""
    path = write_segment(pg_wal, 4, b"first")
    first = wal.push(storage, path)
    assert wal.push(storage, path).already
    write_segment(pg_wal, 4, b"second")
    with pytest.raises(WalConflictError, match="other contents"):
        wal.push(storage, path)
    assert wal.archived_copies(storage, SYSTEM, path.name) == {first.sha256: first.key}


def test_a_segment_is_checked_against_its_own_header(storage: LocalStorage, pg_wal: Path) -> None:
    """A file whose first page belongs to another segment (recycled, copied) is not archived
    under this name; nor is a file without a WAL header."""
    other = write_segment(pg_wal, 9)
    wrong = pg_wal / wal.segment_name(1, 10)
    other.rename(wrong)
    with pytest.raises(ArchiveError, match="not segment"):
        wal.push(storage, wrong)
    wrong.write_bytes(b"\0" * MIB)
    with pytest.raises(ArchiveError, match="header"):
        wal.push(storage, wrong)
    assert list(storage.list("wal/")) == []


def test_history_files_need_the_system_identifier(storage: LocalStorage, pg_wal: Path) -> None:
    """A history file carries no header: it is archived under the system given."""
    path = pg_wal / "00000002.history"
    path.write_text("1\t0/3000000\tno recovery target specified\n")
    with pytest.raises(UsageError, match="system identifier"):
        wal.push(storage, path)
    wal.push(storage, path, system_id=SYSTEM)
    archive = wal.list_archive(storage, SYSTEM)
    assert archive.histories() == ["00000002.history"]
    assert wal.read_history(storage, archive, 2) == [wal.TimelineSwitch(1, 0x3000000)]


def test_fetch_missing_gap_and_damage(storage: LocalStorage, pg_wal: Path, tmp_path: Path) -> None:
    """Past the archive's end: WalMissingError (recovery's normal end). A hole with archived
    segments on both sides: WalGapError naming it. A copy that no longer decodes to its
    checksum: WalGapError, and nothing is left at the destination."""
    for segno in (1, 2, 4):
        wal.push(storage, write_segment(pg_wal, segno))
    out = tmp_path / "RECOVERYXLOG"
    with pytest.raises(WalMissingError):
        wal.fetch([storage], wal.segment_name(1, 5), out, system_id=SYSTEM)
    with pytest.raises(WalGapError, match="000000010000000000000003"):
        wal.fetch([storage], wal.segment_name(1, 3), out, system_id=SYSTEM)
    key = next(iter(wal.archived_copies(storage, SYSTEM, wal.segment_name(1, 2)).values()))
    stored = storage.local_path(key)
    assert stored is not None
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    with pytest.raises(WalGapError, match="could not be restored"):
        wal.fetch([storage], wal.segment_name(1, 2), out, system_id=SYSTEM)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".RECOVERY")] == []


def test_fetch_falls_back_to_the_next_target(tmp_path: Path, pg_wal: Path) -> None:
    """A segment the primary lost is fetched from the offsite copy, which ``copy`` proved."""
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    path = write_segment(pg_wal, 7)
    result = wal.push(primary, path)
    assert wal.copy(primary, offsite, result.key) is True
    assert wal.copy(primary, offsite, result.key) is False  # already there
    primary.delete(result.key)
    got = wal.fetch([primary, offsite], path.name, tmp_path / "out", system_id=SYSTEM)
    assert got.source == offsite.url and (tmp_path / "out").read_bytes() == path.read_bytes()


def test_upload_missing_copies_only_what_offsite_lacks(tmp_path: Path, pg_wal: Path) -> None:
    """The catch-up upload copies each archived file once per offsite target."""
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    for segno in (1, 2):
        wal.push(primary, write_segment(pg_wal, segno))
    assert wal.upload_missing([primary, offsite]).copied == {offsite.url: 2}
    assert wal.upload_missing([primary, offsite]).copied == {offsite.url: 0}
    assert sorted(wal.list_archive(offsite, SYSTEM).files) == sorted(
        wal.list_archive(primary, SYSTEM).files
    )


# --- the archive as a whole ----------------------------------------------------------------------


def test_gaps_are_named_by_their_first_and_last_missing_segment() -> None:
    names = [wal.segment_name(1, n) for n in (1, 2, 5, 6, 8)]
    assert wal.gaps(names) == [
        (wal.segment_name(1, 3), wal.segment_name(1, 4)),
        (wal.segment_name(1, 7), wal.segment_name(1, 7)),
    ]


def test_prune_plan_keeps_what_the_oldest_kept_base_backup_needs(
    storage: LocalStorage, pg_wal: Path
) -> None:
    """Retention removes segments wholly before the oldest kept base backup's start, on every
    timeline, never a history file, and nothing at all while no base backup is kept."""
    for segno in range(1, 7):
        wal.push(storage, write_segment(pg_wal, segno))
    wal.push(storage, write_segment(pg_wal, 3, timeline=2))
    history = pg_wal / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    wal.push(storage, history, system_id=SYSTEM)
    archive = wal.list_archive(storage, SYSTEM)
    assert wal.prune_plan(archive, []) == []
    start = 4 * 16 * MIB + 0x28  # a base backup starting inside segment 4
    doomed = {f.name for f in wal.prune_plan(archive, [start, 5 * 16 * MIB])}
    assert doomed == {*(wal.segment_name(1, n) for n in (1, 2, 3)), wal.segment_name(2, 3)}
    assert wal.remove(storage, wal.prune_plan(archive, [start])) == 4
    left = wal.list_archive(storage, SYSTEM)
    kept = {"00000002.history", *(wal.segment_name(1, n) for n in (4, 5, 6))}
    assert set(left.files) == kept


def test_parse_history_skips_comments() -> None:
    text = "# comment\n1\t0/3000000\tno recovery target specified\n\n2\t0/5000060\tbefore x\n"
    assert wal.parse_history(text) == [wal.TimelineSwitch(1, 0x3000000),
                                       wal.TimelineSwitch(2, 0x5000060)]  # fmt: skip


# --- the spool and the fast path -----------------------------------------------------------------


def test_an_acknowledgement_is_bound_to_the_bytes_it_covers(pg_wal: Path) -> None:
    """wal-push's fast path consumes the pusher's .ok for these very bytes (exit 0) and
    nothing else: a stale .ok (the file changed since) is removed and does not count."""
    path = write_segment(pg_wal, 2)
    (pg_wal / "archive_status").mkdir()
    spool = Path(wal_spool.spool_of(path))
    spool.mkdir(mode=0o700)
    (spool / wal_spool.SYNC).touch()  # synchronous mode: the fast path starts no pusher
    wal_spool.write_status(spool, path.name, wal_spool.OK, wal_spool.fingerprint(path) + "\n")
    assert fast_wal_push(["--env-file", "/nonexistent", "wal-push", str(path)]) == 0
    assert not (spool / (path.name + wal_spool.OK)).exists()
    wal_spool.write_status(spool, path.name, wal_spool.OK, "1 2 3\n")
    assert fast_wal_push(["wal-push", str(path)]) is None  # a stale .ok: the full CLI
    assert not (spool / (path.name + wal_spool.OK)).exists()


@pytest.mark.parametrize(
    "argv",
    [["--debug", "wal-push", "x"], ["wal-fetch", "a", "b"], ["list"], ["wal-push"],
     ["wal-push", "pg_wal/not-a-segment"]],
)  # fmt: skip
def test_the_fast_path_leaves_everything_else_to_the_cli(argv: list[str]) -> None:
    assert fast_wal_push(argv) is None


def test_the_fast_path_imports_no_pgkeeper_settings_or_sdk(tmp_path: Path) -> None:
    """What makes it fast: answering a wal-push imports neither pydantic, typer nor an SDK."""
    import subprocess
    import sys

    code = (
        "import sys; from pgkeeper.entry import fast_wal_push;"
        "fast_wal_push(['wal-push', 'pg_wal/000000010000000000000001']);"
        "bad = [m for m in ('pydantic', 'typer', 'boto3', 'zstandard', 'pgkeeper.settings')"
        " if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stderr


def test_wal_fetch_fast_path_takes_a_prefetched_segment_or_a_fresh_missing(
    pg_wal: Path,
) -> None:
    """wal-fetch's fast path renames a prefetched (already verified) segment into place (exit
    0) and answers 1 from a fresh 'not in the archive' marker; anything else (no prefetcher,
    a stale marker) goes to the full CLI."""
    folder = Path(wal_spool.prefetch_of(pg_wal / "RECOVERYXLOG"))
    folder.mkdir(parents=True, mode=0o700)
    folder.parent.chmod(0o700)
    name = wal.segment_name(1, 5)
    (folder / name).write_bytes(b"verified bytes")
    dest = pg_wal / "RECOVERYXLOG"
    assert fast_wal_fetch(["wal-fetch", "--system-id", "1", name, str(dest)]) == 0
    assert dest.read_bytes() == b"verified bytes" and not (folder / name).exists()
    history = "00000002.history"
    wal_spool.write_status(folder, history, wal_spool.MISSING, "\n")
    assert fast_wal_fetch(["--env-file", "x", "wal-fetch", history, str(dest)]) == 1
    old = time.time() - 60
    os.utime(folder / (history + wal_spool.MISSING), (old, old))
    assert fast_wal_fetch(["wal-fetch", history, str(dest)]) is None
    assert fast_wal_fetch(["wal-fetch", wal.segment_name(1, 6), str(dest)]) is None


def test_synchronous_mode_archives_in_the_wal_push_process(
    tmp_path: Path, pg_wal: Path
) -> None:
    """BACKUP_WAL_ASYNC=false: wal-push's full path archives the file itself (no pusher) and
    leaves the sync-mode marker, so later fast paths start no pusher for nothing."""
    from pgkeeper import wal_async
    from pgkeeper.settings import load_settings

    (pg_wal / "archive_status").mkdir()
    (pg_wal / wal_spool.SPOOL).mkdir(mode=0o700)
    path = write_segment(pg_wal, 6)
    settings = load_settings(_env_file=None, backup_dir=str(tmp_path / "backups"),
                             backup_wal_async=False)  # fmt: skip
    result = wal_async.archive(settings, path)
    assert result is not None and not result.already
    assert (pg_wal / wal_spool.SPOOL / wal_spool.SYNC).exists()
    assert fast_wal_push(["wal-push", str(path)]) is None
    stored = wal.archived_copies(LocalStorage(tmp_path / "backups"), SYSTEM, path.name)
    assert list(stored) == [result.sha256]


# --- encryption (BACKUP_ENCRYPTION_RECIPIENTS) ----------------------------------------------------

MARKER = b"PGK-WAL-MARKER-7f3c1e"  # planted in segment bodies: must never reach a target
AGE_MAGIC = b"age-encryption.org/v1\n"


def age_key(folder: Path, name: str = "key") -> tuple[crypto.Identity, crypto.Recipients]:
    """An age key pair: the identity file (as age-keygen writes it) loaded, and its recipient."""
    from pyrage import x25519

    key = x25519.Identity.generate()
    path = folder / f"{name}.txt"
    path.write_text(f"# public key: {key.to_public()}\n{key}\n")
    return crypto.Identity.load(path), crypto.Recipients.parse(str(key.to_public()))


def marked_segment(folder: Path, segno: int, timeline: int = 1) -> Path:
    body = (MARKER + b" row data, compressible " * 40) * 200 + os.urandom(2048)
    return write_segment(folder, segno, body, timeline)


def stored_bytes(storage: LocalStorage, key: str) -> bytes:
    path = storage.local_path(key)
    assert path is not None
    return path.read_bytes()


def test_encrypted_push_stores_an_age_file_that_only_the_identity_opens(
    storage: LocalStorage, pg_wal: Path, tmp_path: Path
) -> None:
    """With recipients a segment is stored as an age file (key ending .zst.age, no plaintext:
    the marker planted in it is nowhere in the stored bytes) under the plaintext's sha256;
    fetch with the identity returns it byte-exact; without one, or with a key that is not a
    recipient, fetch raises IdentityError and writes nothing."""
    identity, recipients = age_key(tmp_path)
    other, _ = age_key(tmp_path, "other")
    path = marked_segment(pg_wal, 3)
    result = wal.push(storage, path, recipients=recipients)
    assert result.key.endswith(".zst.age") and not result.already
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    raw = stored_bytes(storage, result.key)
    assert raw.startswith(AGE_MAGIC) and MARKER not in raw
    assert hashlib.sha256(raw).hexdigest() == result.stored_sha256
    (archived,) = wal.list_archive(storage, SYSTEM).files[path.name]
    assert archived.encrypted and archived.sha256 == result.sha256
    out = tmp_path / "RECOVERYXLOG"
    for wrong, said in ((None, "needs the private key"), (other, "none of its keys")):
        with pytest.raises(IdentityError, match=said):
            wal.fetch([storage], path.name, out, system_id=SYSTEM, identity=wrong)
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".RECOVERY")] == []
    got = wal.fetch([storage], path.name, out, system_id=SYSTEM, identity=identity)
    assert out.read_bytes() == path.read_bytes() and got.sha256 == result.sha256


def test_encrypted_same_bytes_twice_succeed_other_bytes_are_refused(
    storage: LocalStorage, pg_wal: Path, tmp_path: Path
) -> None:
    """Age encryption is randomised (two encryptions of one segment differ), yet pushing the
    same segment again succeeds without writing: the name records the plaintext's sha256.
    Other bytes under the name are refused and the archived copy stays as it was."""
    _, recipients = age_key(tmp_path)
    path = marked_segment(pg_wal, 4)
    first = wal.push(storage, path, recipients=recipients)
    before = stored_bytes(storage, first.key)
    again = wal.push(storage, path, recipients=recipients)
    assert again.already and again.key == first.key
    assert stored_bytes(storage, first.key) == before
    write_segment(pg_wal, 4, b"other contents")
    with pytest.raises(WalConflictError, match="other contents"):
        wal.push(storage, path, recipients=recipients)
    assert wal.archived_copies(storage, SYSTEM, path.name) == {first.sha256: first.key}


def test_a_mixed_archive_restores_with_the_identity(
    storage: LocalStorage, pg_wal: Path, tmp_path: Path
) -> None:
    """Encryption turned on mid-way: segments archived before stay plain, later ones (and the
    history file) are age files; with the identity every one is fetched and the history read;
    a plain segment needs no identity at all, even when the configured key file is unreadable
    (it is loaded only for an encrypted file)."""
    identity, recipients = age_key(tmp_path)
    plain = [wal.push(storage, write_segment(pg_wal, n)) for n in (1, 2)]
    history = pg_wal / "00000002.history"
    history.write_text("1\t0/2000000\tno recovery target specified\n")
    wal.push(storage, history, system_id=SYSTEM, recipients=recipients)
    sealed = [wal.push(storage, marked_segment(pg_wal, n), recipients=recipients) for n in (3, 4)]
    archive = wal.list_archive(storage, SYSTEM)
    assert archive.encrypted() == 3 and not any(r.key.endswith(".age") for r in plain)
    for n, result in zip((3, 4), sealed, strict=True):
        out = tmp_path / f"seg{n}"
        wal.fetch([storage], wal.segment_name(1, n), out, system_id=SYSTEM, identity=identity)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == result.sha256
    assert wal.read_history(storage, archive, 2, identity) == [wal.TimelineSwitch(1, 0x2000000)]

    def unreadable() -> crypto.Identity | None:
        return crypto.Identity.load(tmp_path / "no-such-key.txt")

    out = tmp_path / "seg1"
    wal.fetch([storage], wal.segment_name(1, 1), out, system_id=SYSTEM, identity=unreadable)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == plain[0].sha256
    with pytest.raises(IdentityError, match="cannot be read"):
        wal.fetch([storage], wal.segment_name(1, 3), out, system_id=SYSTEM, identity=unreadable)


def test_a_plain_segment_pushed_again_with_encryption_on_is_already_archived(
    storage: LocalStorage, pg_wal: Path, tmp_path: Path
) -> None:
    """The same bytes archived before encryption was turned on: a success, no second copy."""
    _, recipients = age_key(tmp_path)
    path = write_segment(pg_wal, 5)
    first = wal.push(storage, path)
    again = wal.push(storage, path, recipients=recipients)
    assert again.already and again.key == first.key
    assert list(wal.archived_copies(storage, SYSTEM, path.name).values()) == [first.key]


def test_encrypted_wal_is_copied_offsite_without_the_key(
    tmp_path: Path, pg_wal: Path
) -> None:
    """The backup host holds no identity, yet offsite copies of encrypted WAL are proven as far
    as that goes: the stored sha256 the pusher recorded (or the source's provider keeps), the
    age header and length. A damaged source is not copied; the copy fetched with the identity
    is byte-exact."""
    identity, recipients = age_key(tmp_path)
    primary, offsite = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    good = marked_segment(pg_wal, 7)
    result = wal.push(primary, good, recipients=recipients)
    assert wal.copy(primary, offsite, result.key, result.stored_sha256) is True
    assert stored_bytes(offsite, result.key) == stored_bytes(primary, result.key)
    primary.delete(result.key)
    out = tmp_path / "out"
    wal.fetch([primary, offsite], good.name, out, system_id=SYSTEM, identity=identity)
    assert out.read_bytes() == good.read_bytes()

    bad = wal.push(primary, marked_segment(pg_wal, 8), recipients=recipients)
    path = primary.local_path(bad.key)
    assert path is not None
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same length, same header: only the sha256 tells
    path.write_bytes(bytes(damaged))
    with pytest.raises(ArchiveError, match="damaged"):
        wal.copy(primary, offsite, bad.key, bad.stored_sha256)
    path.write_bytes(b"garbage" + bytes(damaged[7:]))  # without a sha256: the header tells
    with pytest.raises(ArchiveError, match="age header"):
        wal.copy(primary, offsite, bad.key)
    assert wal.archived_copies(offsite, SYSTEM, wal.segment_name(1, 8)) == {}


def test_with_encryption_on_the_full_path_archives_an_age_file(
    tmp_path: Path, pg_wal: Path
) -> None:
    """Invariant 10: wal-push's own path (BACKUP_WAL_ASYNC=false, as the pusher does) encrypts
    to BACKUP_ENCRYPTION_RECIPIENTS; the planted marker is nowhere on the target."""
    from pgkeeper import wal_async
    from pgkeeper.settings import load_settings

    _, recipients = age_key(tmp_path)
    path = marked_segment(pg_wal, 8)
    settings = load_settings(_env_file=None, backup_dir=str(tmp_path / "backups"),
                             backup_wal_async=False,
                             backup_encryption_recipients=recipients.keys[0].text)  # fmt: skip
    result = wal_async.archive(settings, path)
    assert result is not None and result.key.endswith(".age")
    for stored in (tmp_path / "backups").rglob("*"):
        if stored.is_file():
            assert MARKER not in stored.read_bytes()


def test_the_pusher_exits_when_its_env_file_changes(tmp_path: Path, pg_wal: Path) -> None:
    """A busy server never leaves the pusher idle: a change of its env file (encryption turned
    on, say) makes it exit, so the next wal-push starts one with the new settings."""
    from pgkeeper import wal_async
    from pgkeeper.settings import load_settings

    env = tmp_path / "pgkeeper.env"
    env.write_text(f"BACKUP_DIR={tmp_path / 'backups'}\n")
    settings = load_settings(_env_file=env)
    (pg_wal / "archive_status").mkdir()
    pusher = wal_async.Pusher(settings, pg_wal, [LocalStorage(tmp_path / "backups")], env)
    assert not pusher.settings_changed()
    _, recipients = age_key(tmp_path)
    env.write_text(env.read_text() + f"BACKUP_ENCRYPTION_RECIPIENTS={recipients.keys[0].text}\n")
    assert pusher.settings_changed()
    started = time.monotonic()
    pusher.run()  # returns at once instead of serving until idle
    assert time.monotonic() - started < settings.backup_wal_pusher_idle
