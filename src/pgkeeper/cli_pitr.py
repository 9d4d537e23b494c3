"""Point-in-time recovery commands of the ``pgkeeper`` CLI: ``wal-push``, ``wal-fetch``,
``base-backup`` and ``pitr restore|status``; registered on the main app by ``register``.

``wal-push`` and ``wal-fetch`` are what PostgreSQL runs (``archive_command``,
``restore_command``), so their exit codes speak PostgreSQL's language: wal-push exits 0 only
once the file is durably archived; wal-fetch exits 0 with the file in place, 1 (silently) for
a file the archive does not have, which is how recovery finds the end of the archive, and 126
for everything else (a gap, a damaged copy, an unreachable target, a bad setting, an encrypted
file without an identity that opens it), because
PostgreSQL aborts recovery for an exit code above 125 instead of ending it early and promoting
a cluster that lacks data.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from pgkeeper.cli import (
    IdentityOpt,
    JsonOpt,
    handle_errors,
    human_size,
    print_json,
    print_table,
    progress_bar,
    settings_from_env,
)
from pgkeeper.errors import PgkeeperError, UsageError, WalMissingError
from pgkeeper.storage import targets

FETCH_ABORT = 126  # > 125: PostgreSQL stops recovery instead of treating the file as missing

pitr_app = typer.Typer(
    name="pitr",
    help="Point-in-time recovery: restore to a moment, and the archive's recoverable window.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add the point-in-time recovery commands to the main ``pgkeeper`` application."""
    app.command("wal-push")(wal_push)
    app.command("wal-fetch")(wal_fetch)
    app.command("base-backup")(base_backup)
    app.add_typer(pitr_app)


SystemIdOpt = Annotated[
    int | None,
    typer.Option(
        "--system-id",
        help="Database system identifier (default: from the data folder's pg_control).",
    ),
]


@handle_errors
def wal_push(
    path: Annotated[Path, typer.Argument(help="The WAL file (%p in archive_command).")],
    system_id: SystemIdOpt = None,
) -> None:
    """Archive one WAL file (archive_command); exit 0 only once it is durably stored."""
    from pgkeeper import crypto, wal, wal_async

    settings = settings_from_env()
    if system_id is not None:
        recipients = crypto.recipients_of(settings)
        primary = targets(settings)[0]
        wal.push(primary, path, system_id=system_id, level=settings.backup_wal_compression_level,
                 recipients=recipients)  # fmt: skip
        return
    wal_async.archive(settings, path)


def wal_fetch(
    name: Annotated[str, typer.Argument(help="The WAL file name (%f in restore_command).")],
    path: Annotated[Path, typer.Argument(help="Where to put it (%p in restore_command).")],
    system_id: SystemIdOpt = None,
) -> None:
    """Restore one WAL file from the archive (restore_command); an encrypted one is decrypted
    with BACKUP_ENCRYPTION_IDENTITY_FILE."""
    from pgkeeper import crypto, wal
    from pgkeeper.cli import _state

    try:
        settings = settings_from_env()
        if system_id is None:
            system_id = wal.system_id_from_control(Path.cwd())
        if len(name) == 24 and (path.parent / "archive_status").is_dir():
            # Recovery asks for the next segments one by one: fetch them ahead, in the
            # background, so the next wal-fetch is one rename (see pgkeeper.wal_spool).
            # Started first: its start-up overlaps this fetch.
            from pgkeeper import wal_spool
            from pgkeeper.wal_prefetch import start_prefetcher

            lock = Path(wal_spool.prefetch_of(path)) / wal_spool.FETCH_LOCK
            if not wal_spool.pusher_running_at(lock):
                start_prefetcher(path, name, system_id)
        # Read when an encrypted file is met; unreadable then: 126, saying why.
        identity = crypto.identity_loader(settings)
        wal.fetch(targets(settings), name, path, system_id=system_id, identity=identity)
    except WalMissingError:
        raise typer.Exit(1) from None  # the end of the archive: PostgreSQL asks, never an error
    except PgkeeperError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(FETCH_ABORT) from None
    except Exception as exc:  # the same reason: an unknown failure must stop recovery
        if _state["debug"]:
            raise
        typer.echo(f"error: unexpected {type(exc).__name__} fetching {name}", err=True)
        raise typer.Exit(FETCH_ABORT) from None


@handle_errors
def base_backup(
    name: Annotated[
        str | None, typer.Option(help="Backup name (default BACKUP_BASE_NAME).")
    ] = None,
    no_upload: Annotated[
        bool, typer.Option("--no-upload", help="Do not copy to offsite targets.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Take a base backup of the whole cluster (pg_basebackup), check it, list it as 'base'."""
    from pgkeeper.basebackup import run_base_backup

    settings = settings_from_env()
    storages = targets(settings)
    with progress_bar("base backup") as progress:
        manifest = run_base_backup(
            settings, storages=storages, name=name, trigger="cli", progress=progress
        )
    if settings.backup_verify != "off":
        from pgkeeper.verify import verify_backup

        with progress_bar("verify", manifest.size) as progress:
            manifest = verify_backup(
                settings,
                manifest.id,
                storages=[storages[0]],
                level=settings.backup_verify,
                progress=progress,
            )
    locations = [storages[0].url]
    failed: dict[str, str] = {}
    if not no_upload and len(storages) > 1:
        from pgkeeper.upload import upload_backup

        report = upload_backup(settings, manifest.id, storages=storages)
        locations += report.copied_to + report.already_there
        failed = report.failed
    if as_json:
        print_json({**manifest.to_public(), "locations": locations})
    else:
        base = manifest.base
        assert base is not None  # noqa: S101 - run_base_backup records it
        typer.echo(
            f"base backup {manifest.id}: {human_size(manifest.size)}, timeline "
            f"{base.timeline}, WAL {base.start_lsn} .. {base.stop_lsn}, in "
            f"{', '.join(locations)}"
        )
    if failed:
        where = ", ".join(f"{url}: {why}" for url, why in failed.items())
        raise PgkeeperError(
            f"base backup {manifest.id} made, but the upload failed ({where}); retry with "
            f"'pgkeeper upload {manifest.id}'"
        )


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        raise UsageError(
            f"--time {text!r} is not a timestamp (use e.g. '2026-03-01 14:30:00+00' or "
            "'2026-03-01T14:30:00Z')"
        ) from None
    if when.tzinfo is None:
        raise UsageError(
            f"--time {text!r} has no timezone: add one (e.g. '+00' or 'Z') so it names one moment"
        )
    return when.astimezone(UTC)


@pitr_app.command("restore")
@handle_errors
def pitr_restore(
    to: Annotated[Path, typer.Option("--to", help="New data folder (must be empty or absent).")],
    time: Annotated[
        str | None, typer.Option("--time", help="Recover to this moment (with a timezone).")
    ] = None,
    lsn: Annotated[str | None, typer.Option("--lsn", help="Recover to this WAL position.")] = None,
    latest: Annotated[bool, typer.Option("--latest", help="Recover everything archived.")] = False,
    base: Annotated[
        str | None, typer.Option("--base", help="Base backup id (default: the best one).")
    ] = None,
    timeline: Annotated[
        str | None,
        typer.Option("--timeline", help="Timeline to follow (default: latest), e.g. 1."),
    ] = None,
    start: Annotated[
        bool, typer.Option("--start", help="Start the server and wait until it recovered.")
    ] = False,
    port: Annotated[int | None, typer.Option("--port", help="Port of the restored server.")] = None,
    archive: Annotated[
        bool,
        typer.Option(
            "--archive",
            help="Keep archive_mode on in the restored cluster (it becomes a new primary).",
        ),
    ] = False,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a new data folder recovered to a moment (--time), a WAL position (--lsn) or the
    end of the archive (--latest); --start also starts it. An encrypted base backup or WAL is
    decrypted with the identity, which the restored server's restore_command reads too."""
    from pgkeeper.pitr import Target, restore_pitr

    chosen = [flag for flag, given in (("--time", time), ("--lsn", lsn), ("--latest", latest))
              if given]  # fmt: skip
    if len(chosen) != 1:
        raise UsageError("give exactly one of --time, --lsn or --latest")
    if start and port is None:
        raise UsageError("--start needs --port (a free port for the restored server)")
    target = Target(
        time=_parse_time(time) if time else None,
        lsn=lsn,
        latest=latest,
        timeline=timeline,
    )
    settings = settings_from_env(
        backup_encryption_identity_file=identity.absolute() if identity else None
    )
    result = restore_pitr(
        settings,
        target,
        to,
        base_id=base,
        port=port,
        start=start,
        keep_archiving=archive,
        storages=targets(settings),
    )
    if as_json:
        print_json(result.to_dict())
        return
    typer.echo(result.summary())


@pitr_app.command("status")
@handle_errors
def pitr_status(as_json: JsonOpt = False) -> None:
    """The recoverable window per timeline, gaps in the WAL sequence, and the archive lag."""
    from pgkeeper.pitr_status import archive_status

    settings = settings_from_env()
    report = archive_status(settings, targets(settings))
    if as_json:
        print_json(report.to_dict())
        return
    rows: list[dict[str, Any]] = report.as_table()
    if not rows:
        typer.echo("no WAL archive and no base backup in " + ", ".join(report.targets))
    else:
        print_table(rows, list(rows[0]))
    for line in report.notes:
        typer.echo(line)
    if not report.ok:
        sys.stdout.flush()
        raise PgkeeperError(report.verdict())
