"""Point-in-time recovery: restore a base backup plus archived WAL to a moment, and the
archive's state (recoverable window, gaps, lag) for ``pitr status`` and the monitor.

``restore_pitr``, in order (each step's safety reason beside it):
  1. refuse a data folder that is not empty         -> never touches an existing cluster
  2. plan: the archive's timelines (from ``.history`` files), the segments the target needs
     from the base backup's start on, the first gap; the recoverable window (base backups'
     ends .. the last commit archived, read with ``pg_waldump``)
     -> a target outside the window, or behind a missing segment, is a one-line error
        naming the window or the segment, before anything is written
  3. choose the newest usable base backup that ends before the target (or ``--base``)
  4. extract it from the first target holding a good copy, hashing the stored bytes (an
     encrypted one is decrypted in the stream, with the identity)
     -> a copy failing its checksum is wiped and the next copy is tried
  5. write the recovery settings (``restore_command`` = wal-fetch, the target,
     ``recovery_target_action = promote``, ``archive_mode = off`` unless ``--archive``)
     and ``recovery.signal``
  6. with ``--start``: start the server and wait until recovery ended and it promoted;
     a server that stops (a FATAL in its log) is reported with that line
A scratch restore (the PITR restore test) is the same procedure into a temporary folder.

Encryption: an encrypted base backup, or an archive holding encrypted WAL, needs
BACKUP_ENCRYPTION_IDENTITY_FILE (``--identity``); without it, or with a key that is not a
recipient, step 2 stops with one line before anything is written. The restored server's
``restore_command`` (wal-fetch) decrypts with the same file, so it is passed on to the server's
environment and, when pgkeeper runs as root, checked to be readable by the server's user.

When pgkeeper runs as root (PostgreSQL refuses to), the restored files are handed to
``BACKUP_PITR_OS_USER`` and the server binaries run as that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import zstandard

from pgkeeper import catalog, crypto, naming, postgres, wal
from pgkeeper.errors import (
    BackupNotFoundError,
    IdentityError,
    PgkeeperError,
    RestoreError,
    StorageError,
    UsageError,
    VerificationError,
    WalGapError,
)
from pgkeeper.manifest import BaseBackupInfo, Manifest
from pgkeeper.pipeline import HashingReader
from pgkeeper.settings import Settings, env_file
from pgkeeper.storage import Storage
from pgkeeper.storage.base import CHUNK

RESTORE_LOG = "pgkeeper-restore.log"
RECOVERY_MARK = "# pgkeeper pitr restore"
_COMMIT_RE = re.compile(r"desc: (?:COMMIT|ABORT)\S* (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")
_LAST_TX_RE = re.compile(r"last completed transaction was at log time (\S+ \S+)")
_STOP_RE = re.compile(r"recovery stopping (?:before|after) .*")


# --- targets and timelines ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where recovery stops: a moment, a WAL position, or the end of the archive."""

    time: datetime | None = None
    lsn: str | None = None
    latest: bool = False
    timeline: str | None = None  # None/"latest", or a timeline number ("2", "00000002")

    def describe(self) -> str:
        if self.time is not None:
            return f"time {self.time.astimezone(UTC).isoformat()}"
        if self.lsn is not None:
            return f"lsn {self.lsn}"
        return "the end of the archive"

    def timeline_number(self) -> int | None:
        if self.timeline is None or self.timeline.strip().lower() in ("", "latest"):
            return None
        text = self.timeline.strip()
        try:
            return int(text, 16) if len(text) == 8 else int(text)
        except ValueError:
            raise UsageError(
                f"--timeline {text!r} is not a timeline (e.g. 1, 2 or latest)"
            ) from None


@dataclass
class ArchiveView:
    """Every target's WAL of one system, merged (a fetch takes the first good copy)."""

    system_id: int
    archives: list[tuple[Storage, wal.Archive]]
    segment_size: int = wal.DEFAULT_SEGMENT_SIZE
    identity: crypto.Identity | None = None  # opens encrypted WAL

    def encrypted(self) -> int:
        """How many archived files (over every target) are encrypted."""
        return sum(a.encrypted() for _, a in self.archives)

    @property
    def names(self) -> set[str]:
        return {n for _, a in self.archives for n in a.files}

    def timelines(self) -> list[int]:
        return sorted({t for _, a in self.archives for t in a.timelines()})

    def segments(self, timeline: int) -> list[str]:
        return sorted({n for _, a in self.archives for n in a.segments(timeline)})

    def history(self, timeline: int) -> list[wal.TimelineSwitch]:
        for storage, archive in self.archives:
            if f"{timeline:08X}.history" in archive.files:
                return wal.read_history(storage, archive, timeline, self.identity)
        return []

    def modified(self, name: str) -> datetime | None:
        for _, archive in self.archives:
            copies = archive.files.get(name)
            if copies and copies[0].modified is not None:
                return copies[0].modified
        return None


def load_archive(
    storages: Sequence[Storage],
    system_id: int,
    segment_size: int,
    identity: crypto.Identity | None = None,
) -> ArchiveView:
    """List every target's WAL of ``system_id`` (a target that cannot be listed is skipped)."""
    archives = []
    for storage in storages:
        try:
            archives.append((storage, wal.list_archive(storage, system_id)))
        except StorageError:
            continue
    return ArchiveView(system_id, archives, segment_size, identity)


@dataclass(frozen=True)
class Span:
    """The segments one timeline contributes to a recovery: ``first`` .. ``last`` (numbers)."""

    timeline: int
    first: int
    last: int | None  # None: up to the newest archived


def path_to(view: ArchiveView, base_timeline: int, target_timeline: int | None) -> list[int]:
    """The timelines recovery walks from the base backup's to the target (oldest first).

    Raises UsageError when the target timeline does not descend from the base's."""
    chosen = target_timeline or max([base_timeline, *view.timelines()])
    if chosen == base_timeline:
        return [base_timeline]
    ancestors = [s.parent for s in view.history(chosen)]
    if base_timeline not in ancestors:
        # Latest by default: follow the newest timeline that descends from the base backup's.
        if target_timeline is None:
            for candidate in sorted(view.timelines(), reverse=True):
                if candidate > base_timeline and base_timeline in [
                    s.parent for s in view.history(candidate)
                ]:
                    return path_to(view, base_timeline, candidate)
            return [base_timeline]
        raise UsageError(
            f"timeline {chosen} does not descend from timeline {base_timeline} of the base "
            "backup (see 'pgkeeper pitr status'; choose --timeline or --base)"
        )
    index = ancestors.index(base_timeline)
    return [*ancestors[index:], chosen]


def spans(view: ArchiveView, timelines: list[int], start_lsn: int) -> list[Span]:
    """The segment ranges per timeline: a timeline's segments up to the one before its child
    begins (the child's first segment holds the parent's WAL up to the switch)."""
    size = view.segment_size
    result: list[Span] = []
    first = wal.segment_of(start_lsn, size)
    for position, timeline in enumerate(timelines):
        if position + 1 < len(timelines):
            child = timelines[position + 1]
            switch = next(s.lsn for s in view.history(child) if s.parent == timeline)
            boundary = wal.segment_of(switch, size)
            result.append(Span(timeline, first, boundary - 1))
            first = boundary
        else:
            result.append(Span(timeline, first, None))
    return result


@dataclass(frozen=True)
class Reach:
    """How far the archive reaches from a base backup along a timeline path."""

    last_segment: str | None  # the newest segment reached without a gap
    end_lsn: int  # end of that segment
    gap: str | None  # the first missing segment, if the archive goes on after it


def reach(view: ArchiveView, path: list[Span]) -> Reach:
    """Walk the needed segments in order; stop at the first one that is missing."""
    size = view.segment_size
    names = view.names
    last: str | None = None
    end = 0
    for span in path:
        archived = view.segments(span.timeline)
        newest = wal.segment_number(archived[-1], size) if archived else span.first - 1
        stop = span.last if span.last is not None else newest
        for number in range(span.first, stop + 1):
            name = wal.segment_name(span.timeline, number, size)
            if name not in names:
                later = span.last is not None or number < newest
                return Reach(last, end, name if later else None)
            last, end = name, (number + 1) * size
    return Reach(last, end, None)


def last_commit(
    view: ArchiveView, newest: str, pg_bin_dir: Path | None, look_back: int = 8
) -> datetime | None:
    """The newest commit (or abort) time in the archive at or before segment ``newest``,
    read with pg_waldump from up to ``look_back`` segments; None when none has one."""
    waldump = postgres.find_client("pg_waldump", pg_bin_dir)
    storages = [s for s, _ in view.archives]
    size = view.segment_size
    number = wal.segment_number(newest, size)
    timeline = wal.timeline_of(newest)
    env = {**os.environ, "TZ": "UTC"}
    with tempfile.TemporaryDirectory(prefix="pgkeeper-waldump-") as tmp:
        for back in range(look_back):
            name = wal.segment_name(timeline, number - back, size)
            if name not in view.names:
                return None
            path = Path(tmp) / name
            wal.fetch(storages, name, path, system_id=view.system_id, identity=view.identity)
            out = subprocess.run(
                [waldump.argv0, "--rmgr=Transaction", str(path)],
                capture_output=True, text=True, env=env, timeout=120,
            )  # fmt: skip
            path.unlink()
            stamps = _COMMIT_RE.findall(out.stdout)
            if stamps:
                return datetime.fromisoformat(stamps[-1]).replace(tzinfo=UTC)
    return None


# --- choosing the base backup ------------------------------------------------------------------


def base_backups(storages: Sequence[Storage]) -> list[Manifest]:
    """Usable base backups on any target (not known to be bad), newest first."""
    return [
        e.manifest
        for e in catalog.list_all(storages)
        if e.manifest.kind == "base" and e.manifest.base is not None
        and not e.manifest.verification_failed
    ]  # fmt: skip


def _window_text(bases: list[Manifest], end_time: datetime | None, end_lsn: int) -> str:
    oldest = min(bases, key=lambda m: base_end(m))
    until = f"{fmt_time(end_time)} (last commit archived)" if end_time else "no archived commit"
    return (
        f"reachable: {fmt_time(base_end(oldest))} (end of base backup {oldest.id}) .. {until}, "
        f"by LSN {base_info(oldest).stop_lsn} .. {wal.format_lsn(end_lsn)}"
    )


def fmt_time(when: datetime | None) -> str:
    return when.astimezone(UTC).isoformat(sep=" ", timespec="seconds") if when else "-"


def base_info(manifest: Manifest) -> BaseBackupInfo:
    assert manifest.base is not None  # noqa: S101 - base_backups only returns kind base
    return manifest.base


def base_end(manifest: Manifest) -> datetime:
    return base_info(manifest).stopped_at


@dataclass
class Plan:
    """What a restore will do: the base backup, the target, and the archive that serves it."""

    base: Manifest
    target: Target
    view: ArchiveView
    timelines: list[int]
    reach: Reach
    end_time: datetime | None
    identity: crypto.Identity | None = None  # opens the base backup and the WAL, if encrypted


def plan(
    settings: Settings, storages: Sequence[Storage], target: Target, base_id: str | None = None
) -> Plan:
    """Choose the base backup and check the archive serves the target; see the module
    docstring. Raises UsageError (target outside the window), WalGapError (a missing segment
    on the way), BackupNotFoundError (no base backup), IdentityError (encrypted WAL or base
    backup without an identity that opens it)."""
    identity = crypto.configured_identity(settings)
    bases = base_backups(storages)
    if base_id is not None:
        manifest, _ = catalog.find(storages, base_id)
        if manifest.kind != "base" or manifest.base is None:
            raise UsageError(
                f"backup {base_id!r} is a dump, not a base backup (see 'pgkeeper list': "
                "base backups have format tar and database '*')"
            )
        bases = [m for m in bases if m.base and m.base.system_identifier
                 == manifest.base.system_identifier] or [manifest]  # fmt: skip
    if not bases:
        where = ", ".join(s.url for s in storages) or "no storage target"
        raise BackupNotFoundError(
            f"no usable base backup in {where} (run 'pgkeeper base-backup' first)"
        )
    systems = sorted({base_info(m).system_identifier for m in bases})
    if len(systems) > 1:
        servers = {s: sorted({m.server for m in bases if base_info(m).system_identifier == s})
                   for s in systems}  # fmt: skip
        shown = ", ".join(f"{s} ({', '.join(servers[s])})" for s in systems)
        raise UsageError(
            f"base backups of {len(systems)} database systems are stored ({shown}): "
            "pass --base ID to choose one"
        )
    newest = bases[0]
    info = base_info(newest)
    view = load_archive(storages, info.system_identifier, info.wal_segment_size, identity)
    if identity is None and view.encrypted():
        raise IdentityError(
            f"the WAL archive of database system {info.system_identifier} holds "
            f"{view.encrypted()} encrypted (age) files: a point-in-time restore needs the "
            "private key (set BACKUP_ENCRYPTION_IDENTITY_FILE or pass --identity FILE)"
        )
    wanted = target.timeline_number()

    def reach_from(manifest: Manifest) -> tuple[list[int], Reach]:
        timelines = path_to(view, base_info(manifest).timeline, wanted)
        return timelines, reach(
            view, spans(view, timelines, wal.parse_lsn(base_info(manifest).start_lsn))
        )

    # The window's end: from the newest base backup (the longest stretch it can reach).
    timelines, far = reach_from(newest)
    end_time = (
        last_commit(view, far.last_segment, settings.pg_bin_dir) if far.last_segment else None
    )
    window = _window_text(bases, end_time, far.end_lsn)
    lsn = wal.parse_lsn(target.lsn) if target.lsn is not None else None
    if far.gap is not None and (target.latest or (lsn is not None and lsn > far.end_lsn)
                                or (target.time is not None and end_time is not None
                                    and target.time > end_time)):  # fmt: skip
        raise WalGapError(
            f"WAL segment {far.gap} is missing from the archive, so recovery cannot go past "
            f"LSN {wal.format_lsn(far.end_lsn)}; {window}"
        )
    if lsn is not None and lsn > far.end_lsn:
        raise UsageError(f"lsn {target.lsn} is past the end of the archive; {window}")
    if target.time is not None and (end_time is None or target.time > end_time):
        raise UsageError(f"{target.describe()} is past the end of the archive; {window}")

    def fits(manifest: Manifest) -> bool:
        info = base_info(manifest)
        if target.time is not None:
            return bool(info.stopped_at <= target.time)
        if lsn is not None:
            return wal.parse_lsn(info.stop_lsn) <= lsn
        return True

    for manifest in [m for m in bases if base_id is None or m.id == base_id]:
        if not fits(manifest):
            continue
        try:
            timelines, got = reach_from(manifest)
        except UsageError:
            continue
        if got.end_lsn <= wal.parse_lsn(base_info(manifest).stop_lsn):
            continue  # its own WAL is not (all) archived: it cannot become consistent
        crypto.identity_for(settings, manifest, "a point-in-time restore from it")
        return Plan(manifest, target, view, timelines, got, end_time, identity)
    if base_id is not None:
        raise UsageError(
            f"base backup {base_id} ends after {target.describe()} (or its WAL is not "
            f"archived): {window}"
        )
    raise UsageError(f"{target.describe()} is before the end of every usable base backup; {window}")


# --- extracting ---------------------------------------------------------------------------------


def _check_member(member: tarfile.TarInfo) -> str:
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or not parts:
        raise VerificationError(f"unsafe path {name!r} in the base backup", check="structure")
    if not (member.isfile() or member.isdir()):
        raise VerificationError(
            f"{name!r} in the base backup is a {'link' if member.issym() else 'special file'}: "
            "refusing to extract it",
            check="structure",
        )
    return name


def extract(
    storage: Storage, manifest: Manifest, dest: Path, identity: crypto.Identity | None = None
) -> None:
    """Extract a stored base backup into the empty folder ``dest``, checking the stored bytes'
    sha256 (and decrypting an encrypted one with ``identity``); raises VerificationError (and
    leaves ``dest`` empty) when they do not match, IdentityError when ``identity`` is None or
    cannot open an encrypted one (before anything is extracted)."""
    obj = manifest.objects[0]
    if manifest.compression != "zstd":
        raise VerificationError(f"base backup {manifest.id} is not zstd-compressed")
    if manifest.encryption is not None and identity is None:
        raise IdentityError(
            f"base backup {manifest.id!r} is encrypted (age): restoring it needs its private key "
            "(set BACKUP_ENCRYPTION_IDENTITY_FILE or pass --identity FILE)"
        )
    with storage.open_read(naming.object_key(manifest.id, obj.name)) as src:
        reader = HashingReader.of(src, obj)
        plain: crypto.DecryptingReader | None = None
        if manifest.encryption is not None and identity is not None:
            plain = crypto.DecryptingReader(reader.read, identity)
        stream = zstandard.ZstdDecompressor().stream_reader(
            plain or reader,  # type: ignore[arg-type]  # any object with read() will do
            read_size=CHUNK,
            read_across_frames=True,
        )
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as archive:
                for member in archive:
                    _extract_member(archive, member, dest)
            while stream.read(CHUNK):  # the tar's padding, to the end of the stored object
                pass
            _stop(plain)
            reader.drain()
            reader.check()
        except IdentityError:
            _stop(plain)
            _empty(dest)
            raise
        except (VerificationError, tarfile.TarError, zstandard.ZstdError, OSError) as exc:
            _stop(plain)  # the stored bytes are read in this thread from here on
            _empty(dest)
            reader.drain()
            reader.check()  # damaged stored bytes explain a broken stream: say so
            if isinstance(exc, VerificationError):
                raise
            raise VerificationError(f"the base backup's tar is unreadable ({exc})",
                                    check="structure") from exc  # fmt: skip
        finally:
            _stop(plain)


def _stop(plain: crypto.DecryptingReader | None) -> None:
    if plain is not None:
        plain.close()  # idempotent: sets its stop flag and joins its thread


def _extract_member(archive: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    name = _check_member(member)
    path = dest.joinpath(*PurePosixPath(name).parts)
    if member.isdir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = archive.extractfile(member)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        while handle is not None and (chunk := handle.read(CHUNK)):
            out.write(chunk)


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()


# --- recovery settings and the server -----------------------------------------------------------


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def pgkeeper_command(settings: Settings) -> str:
    """The pgkeeper executable a restored server's restore_command runs."""
    if settings.backup_pitr_pgkeeper:
        return settings.backup_pitr_pgkeeper
    argv0 = Path(sys.argv[0])
    if argv0.name == "pgkeeper" and argv0.exists():
        return str(argv0.absolute())
    beside = Path(sys.executable).with_name("pgkeeper")
    return str(beside) if beside.exists() else "pgkeeper"


def recovery_settings(
    settings: Settings, plan_: Plan, port: int | None, keep_archiving: bool
) -> str:
    """The lines appended to the restored cluster's postgresql.auto.conf."""
    command = [pgkeeper_command(settings)]
    chosen = env_file()
    if chosen is not None:
        command += ["--env-file", str(chosen)]
    command += ["wal-fetch", "--system-id", str(plan_.view.system_id), '"%f"', '"%p"']
    quoted = " ".join(c if c.startswith('"') else _shell(c) for c in command)
    target = plan_.target
    lines = [
        f"{RECOVERY_MARK}: {target.describe()}, base backup {plan_.base.id}",
        f"restore_command = {_quote(quoted)}",
        "recovery_target_action = 'promote'",
    ]
    if target.time is not None:
        lines.append(f"recovery_target_time = {_quote(target.time.astimezone(UTC).isoformat())}")
    if target.lsn is not None:
        lines.append(f"recovery_target_lsn = {_quote(target.lsn)}")
    wanted = target.timeline_number()
    lines.append(f"recovery_target_timeline = {_quote(str(wanted) if wanted else 'latest')}")
    if not keep_archiving:
        lines.append("archive_mode = off  # a restored copy must not archive into the original's")
    if port is not None:
        lines.append(f"port = {int(port)}")
    return "\n".join(lines) + "\n"


def _shell(word: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./=:@%+-]+", word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _as_owner(argv: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *argv] if owner else argv


def server_user(settings: Settings) -> str | None:
    """The user to run the server as: BACKUP_PITR_OS_USER when running as root, else none."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(settings.backup_pitr_os_user)
    except KeyError:
        raise UsageError(
            f"pgkeeper runs as root and BACKUP_PITR_OS_USER={settings.backup_pitr_os_user!r} "
            "does not exist: PostgreSQL refuses to run as root (run as the postgres user)"
        ) from None
    return settings.backup_pitr_os_user


def _hand_over(folder: Path, owner: str | None) -> None:
    """Give a restored folder to the server's user (only when running as root)."""
    if owner is None:
        return
    user = pwd.getpwnam(owner)
    for root, dirs, files in os.walk(folder):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in files + dirs:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def server_env(settings: Settings) -> dict[str, str]:
    """The environment a restored server (and so its restore_command) gets: ours, plus the
    storage settings as variables, so wal-fetch finds the archive without an env file.
    Secrets travel only in the environment, never in argv or a file."""
    env = dict(os.environ)
    values = {
        "BACKUP_DIR": settings.backup_dir,
        "BACKUP_TARGETS": ",".join(settings.backup_targets),
        "AWS_S3_BUCKET": settings.aws_s3_bucket,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": (
            settings.aws_secret_access_key.get_secret_value()
            if settings.aws_secret_access_key else None
        ),
        "BACKUP_S3_PREFIX": settings.backup_s3_prefix,
        "BACKUP_S3_ENDPOINT_URL": settings.backup_s3_endpoint_url,
        "BACKUP_S3_REGION": settings.backup_s3_region,
        "GCS_BUCKET": settings.gcs_bucket,
        "GCS_KEYFILE": str(settings.gcs_keyfile) if settings.gcs_keyfile else None,
        "BACKUP_GCS_PREFIX": settings.backup_gcs_prefix,
        # not a secret: the path of the key that decrypts encrypted WAL (wal-fetch)
        "BACKUP_ENCRYPTION_IDENTITY_FILE": (
            str(Path(settings.backup_encryption_identity_file).absolute())
            if settings.backup_encryption_identity_file else None
        ),
    }  # fmt: skip
    for name, value in values.items():
        if value:
            env[name] = str(value)
    for name in [k for k in env if k.startswith("PG") and k != "PG_BIN_DIR"]:
        env.pop(name)  # libpq variables of ours must not redirect the server's tools
    return env


READY = "database system is ready to accept connections"


def start_server(
    settings: Settings, data_dir: Path, owner: str | None, timeout: float = 3600.0
) -> str:
    """Start a restored cluster and wait until recovery ended and it promoted; returns what
    its log says it recovered to. Raises RestoreError with the log's FATAL line."""
    from pgkeeper.pipeline import pid_alive

    pg_ctl = postgres.find_client("pg_ctl", settings.pg_bin_dir)
    log_path = data_dir / RESTORE_LOG
    argv = _as_owner([pg_ctl.argv0, "start", "-W", "-D", str(data_dir), "-l", str(log_path)], owner)
    done = subprocess.run(
        argv, env=server_env(settings), cwd=data_dir, capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise RestoreError(
            f"pg_ctl could not start the restored server: {said[-1] if said else '?'} "
            f"(log: {log_path})"
        )
    deadline = time.monotonic() + timeout
    seen_pid = False
    while True:
        text = _read(log_path)
        pid = _postmaster_pid(data_dir)
        seen_pid = seen_pid or pid is not None
        if not (data_dir / "recovery.signal").exists() and READY in text:
            return _recovered_to(text)
        dead = (pid is None and (seen_pid or "FATAL" in text)) or (
            pid is not None and not pid_alive(pid)
        )
        if dead:
            raise RestoreError(f"the restored server stopped: {_fatal(text)} (log: {log_path})")
        if time.monotonic() > deadline:
            raise RestoreError(f"recovery did not finish within {timeout:.0f}s (log: {log_path})")
        time.sleep(0.1)


def _postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def stop_server(settings: Settings, data_dir: Path, owner: str | None) -> None:
    """Fast shutdown of a restored cluster (immediate if that fails); idempotent."""
    if not (data_dir / "postmaster.pid").exists():
        return
    pg_ctl = postgres.find_client("pg_ctl", settings.pg_bin_dir)
    for mode in ("fast", "immediate"):
        argv = _as_owner([pg_ctl.argv0, "stop", "-D", str(data_dir), "-m", mode, "-w", "-t", "60"],
                         owner)  # fmt: skip
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            done = subprocess.run(argv, capture_output=True, timeout=70, cwd="/")
            if done.returncode == 0 or not (data_dir / "postmaster.pid").exists():
                return


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _fatal(text: str) -> str:
    lines = [line for line in text.splitlines() if "FATAL" in line or "error:" in line]
    if not lines:
        return "no FATAL line in its log"
    line = lines[-1]
    return line.split("FATAL:", 1)[-1].strip() if "FATAL:" in line else line.strip()


def _recovered_to(text: str) -> str:
    stop = _STOP_RE.findall(text)
    last = _LAST_TX_RE.findall(text)
    parts = []
    if stop:
        parts.append(stop[-1])
    if last:
        parts.append(f"last transaction at {last[-1]}")
    return "; ".join(parts) or "end of the archive"


# --- the procedure -------------------------------------------------------------------------------


@dataclass
class PitrResult:
    """What a PITR restore did."""

    data_dir: str
    base_id: str
    target: str
    timelines: list[int]
    wal_until: str  # the LSN the archive serves without a gap
    started: bool = False
    port: int | None = None
    recovered_to: str = ""
    duration_seconds: float = 0.0
    start_command: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def summary(self) -> str:
        lines = [
            f"restored base backup {self.base_id} into {self.data_dir} for {self.target} "
            f"(timeline {' -> '.join(map(str, self.timelines))}, WAL archived to "
            f"{self.wal_until})"
        ]
        if self.started:
            lines.append(
                f"the server runs on port {self.port} and recovered ({self.recovered_to}) in "
                f"{self.duration_seconds:.1f}s; stop it with: pg_ctl -D {self.data_dir} stop"
            )
        else:
            lines.append(f"start it with: {self.start_command}")
        lines += self.notes
        return "\n".join(lines)


def _prepare_folder(to: Path) -> Path:
    folder = to.absolute()
    if folder.exists():
        if not folder.is_dir() or folder.is_symlink():
            raise UsageError(f"{folder} is not a folder (give a new or empty folder as --to)")
        if any(folder.iterdir()):
            running = (
                " (it holds a running cluster)" if (folder / "postmaster.pid").exists() else ""
            )
            raise UsageError(
                f"{folder} is not empty{running}: pitr restore only builds a new data folder "
                "(give an empty or new folder as --to)"
            )
    else:
        folder.mkdir(mode=0o700, parents=True)
    folder.chmod(0o700)
    return folder


def _finish_folder(folder: Path, lines: str) -> list[str]:
    notes = []
    if not (folder / "postgresql.conf").exists():
        (folder / "postgresql.conf").write_text(
            "# written by pgkeeper pitr restore: the source kept its configuration elsewhere "
            "(e.g. /etc/postgresql)\n"
        )
        notes.append("the backup had no postgresql.conf (kept elsewhere on the source): an "
                     "empty one was written; add your settings")  # fmt: skip
    if not (folder / "pg_hba.conf").exists():
        (folder / "pg_hba.conf").write_text("local all all peer\n")
        notes.append("the backup had no pg_hba.conf: one allowing local peer logins was written")
    if not (folder / "pg_ident.conf").exists():
        (folder / "pg_ident.conf").write_text("")
    with (folder / "postgresql.auto.conf").open("a") as conf:
        conf.write("\n" + lines)
    for stale in ("standby.signal", "postmaster.pid", "postmaster.opts"):
        with contextlib.suppress(FileNotFoundError):
            (folder / stale).unlink()
    (folder / "pg_wal").mkdir(mode=0o700, exist_ok=True)
    (folder / "pg_wal" / "archive_status").mkdir(mode=0o700, exist_ok=True)
    (folder / "recovery.signal").write_text("")
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o600)
    return notes


def restore_pitr(
    settings: Settings,
    target: Target,
    to: Path,
    *,
    base_id: str | None = None,
    port: int | None = None,
    start: bool = False,
    keep_archiving: bool = False,
    scratch: bool = False,
    storages: Sequence[Storage],
) -> PitrResult:
    """Build a data folder recovered to ``target``; see the module docstring.

    ``scratch`` (restore tests) makes the copy private: no TCP listener, its socket in the
    data folder, and local connections trusted (``pg_hba.conf`` replaced): only this user can
    reach it, without the source's passwords.

    Raises UsageError (bad folder, target outside the window), WalGapError (a missing
    segment on the way), BackupNotFoundError, VerificationError (every copy of the base backup
    is damaged), RestoreError (the started server stopped; its FATAL line).
    """
    started = time.monotonic()
    owner = server_user(settings) if start or os.geteuid() == 0 else None
    chosen = plan(settings, storages, target, base_id)
    copies = _copies(storages, chosen.base.id)
    _check_identity(chosen, copies, owner)
    folder = _prepare_folder(to)
    last_error: PgkeeperError | None = None
    for copy_manifest, storage in copies:
        try:
            extract(storage, copy_manifest, folder, chosen.identity)
            last_error = None
            break
        except (VerificationError, StorageError) as exc:
            last_error = exc
    if last_error is not None:
        raise last_error
    lines = recovery_settings(settings, chosen, port, keep_archiving)
    if scratch:
        lines += f"listen_addresses = ''\nunix_socket_directories = {_quote(str(folder))}\n"
        (folder / "pg_hba.conf").write_text("local all all trust\n")
    notes = _finish_folder(folder, lines)
    _hand_over(folder, owner)
    start_argv = ["pg_ctl", "start", "-D", str(folder), "-l", str(folder / RESTORE_LOG)]
    result = PitrResult(
        data_dir=str(folder),
        base_id=chosen.base.id,
        target=target.describe(),
        timelines=chosen.timelines,
        wal_until=wal.format_lsn(chosen.reach.end_lsn),
        port=port,
        start_command=" ".join(_as_owner(start_argv, owner)),
        notes=notes,
    )
    if env_file() is None and start is False:
        result.notes.append(
            "restore_command reads the storage settings from the server's environment (no "
            "--env-file was given): start it where BACKUP_DIR and the credentials are set"
        )
    if start:
        _prefetch_first(settings, folder, chosen, owner)
        result.recovered_to = start_server(settings, folder, owner)
        result.started = True
    result.duration_seconds = time.monotonic() - started
    return result


def _check_identity(
    chosen: Plan, copies: list[tuple[Manifest, Storage]], owner: str | None
) -> None:
    """Before anything is written: the identity opens the encrypted base backup (its header
    and first chunk), and the server's user can read it when the WAL it replays is encrypted
    (its restore_command decrypts with the same file). Raises IdentityError."""
    identity = chosen.identity
    if identity is None:
        return  # plan() made sure nothing encrypted is needed
    manifest, storage = copies[0]
    if manifest.encryption is not None:
        # A damaged or unreachable copy: extraction reports it, or takes the next copy.
        with contextlib.suppress(VerificationError, StorageError):
            crypto.check_identity(storage, manifest, identity)
    if owner is not None and chosen.view.encrypted():
        readable = subprocess.run(
            ["runuser", "-u", owner, "--", "test", "-r", str(identity.path.absolute())],
            capture_output=True, timeout=30,
        )  # fmt: skip
        if readable.returncode != 0:
            raise IdentityError(
                f"identity file {identity.path.absolute()} is not readable by {owner}, who runs "
                "the restored server's restore_command (wal-fetch decrypts the WAL with it): "
                f"let {owner} read it (e.g. chgrp {owner} FILE and chmod 640 FILE, with every "
                "folder above it searchable) or give a copy that user can read"
            )


def _prefetch_first(settings: Settings, folder: Path, chosen: Plan, owner: str | None) -> None:
    """Start the WAL prefetcher before the server, from the base backup's first segment, with
    the server's pgkeeper, so even the first restore_command finds its segment fetched."""
    from pgkeeper.wal_prefetch import start_prefetcher

    python = Path(pgkeeper_command(settings)).with_name("python")
    if not python.exists():
        return  # the server's pgkeeper is not a venv script: its first wal-fetch starts one
    info = base_info(chosen.base)
    first = wal.segment_number(info.start_wal, info.wal_segment_size)
    after = wal.segment_name(info.timeline, max(first - 1, 0), info.wal_segment_size)
    start_prefetcher(
        folder / "pg_wal" / "RECOVERYXLOG",
        after,
        chosen.view.system_id,
        python=str(python),
        owner=owner,
        env=server_env(settings),
    )


def _copies(storages: Sequence[Storage], backup_id: str) -> list[tuple[Manifest, Storage]]:
    found = []
    for storage in storages:
        try:
            manifest = catalog.read_manifest(storage, backup_id)
        except StorageError:
            continue
        if manifest is not None:
            found.append((manifest, storage))
    if not found:
        raise BackupNotFoundError(f"base backup {backup_id!r} is on no target")
    return found


__all__ = ["Plan", "Target", "base_backups", "plan", "restore_pitr"]
