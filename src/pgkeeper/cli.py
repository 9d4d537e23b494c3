"""The ``pgkeeper`` command line: a front door over the core, usable without a Prefect server.

Exit codes: 0 ok, 1 failure, 2 bad usage or input. Errors are one line on stderr (``--debug``
adds the traceback). Progress bars go to stderr on a terminal only; ``--json`` prints
machine-readable records on stdout.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from pgkeeper import catalog, naming
from pgkeeper.errors import IdentityError, PgkeeperError, UsageError
from pgkeeper.manifest import Manifest
from pgkeeper.pipeline import Progress
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import Storage, targets

if TYPE_CHECKING:
    from pgkeeper.server_globals import GlobalsRestore

try:  # recent typer vendors click; older ones use the click package
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _click_exceptions  # type: ignore[no-redef]

app = typer.Typer(
    name="pgkeeper",
    help="Automated PostgreSQL backups: backup, verify, upload, rotate, restore, restore-test.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])
_state: dict[str, Any] = {"debug": False}
log = logging.getLogger("pgkeeper")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _quiet_stdout() -> None:
    """stdout's reader went away (a closed pipe is a normal end): point stdout at /dev/null so
    nothing more (the interpreter's last flush included) complains about it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def handle_errors(func: F) -> F:
    """Turn the project's errors into one-line messages and exit codes at the boundary."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PgkeeperError as exc:
            if _state["debug"]:
                raise
            _fail(exc.message, exc.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted: partial output removed", err=True)
            raise typer.Exit(130) from None
        except BrokenPipeError:
            _quiet_stdout()  # `pgkeeper list | head -1`: the reader has all it wants
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # the last line of defence: still one line, never a secret
            if _state["debug"]:
                raise
            from pgkeeper.postgres import redact_url

            text = redact_url(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _fail(f"unexpected {type(exc).__name__}: {text} (rerun with --debug for details)", 1)
        return None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    env_file: Annotated[
        Path | None,
        typer.Option("--env-file", help="Read settings from this file instead of ./.env."),
    ] = None,
) -> None:
    _state["debug"] = debug
    if env_file is not None:  # archive_command runs in the server's environment, not yours
        from pgkeeper.settings import use_env_file

        try:
            use_env_file(env_file)
        except PgkeeperError as exc:
            _fail(exc.message, exc.exit_code)
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def settings_from_env(**overrides: Any) -> Settings:
    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


# --- output helpers -----------------------------------------------------------------------------


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def human_age(when: datetime, now: datetime | None = None) -> str:
    seconds = int(((now or datetime.now(UTC)) - when).total_seconds())
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds // span}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="fold")
    for row in rows:
        table.add_row(*(str(row.get(c, "")) for c in columns))
    if sys.stdout.isatty():
        console = Console()
        console.on_broken_pipe = _broken_pipe  # type: ignore[method-assign]  # rich would exit 1
        console.print(table)
        return
    # Piped output keeps whole ids (a pipe has no width to fit) and no trailing padding.
    console = Console(width=400, no_color=True)
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _broken_pipe() -> None:
    raise BrokenPipeError  # handled like any closed stdout: a normal end (handle_errors)


@contextmanager
def progress_bar(label: str, total: int | None = None) -> Iterator[Progress | None]:
    """A bytes-and-rate progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress

    with RichProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        transient=True,
        console=__import__("rich.console").console.Console(stderr=True),
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _print_manifest(manifest: Manifest, locations: list[str] | None = None) -> None:
    rows = [
        ("id", manifest.id),
        ("database", f"{_database_of(manifest)} on {manifest.server}"),
        ("format", f"{manifest.format}, {manifest.compression}"),
        ("size", f"{human_size(manifest.size)} ({manifest.size} bytes)"),
        ("started", manifest.started_at.isoformat()),
        ("took", f"{(manifest.finished_at - manifest.started_at).total_seconds():.1f}s"),
        ("state", manifest.state),
        ("sha256", manifest.sha256),
        ("trigger", manifest.trigger),
    ]
    if manifest.kind == "globals":
        passwords = manifest.options.get("role_passwords", True)
        rows.append(("role passwords", "included" if passwords else "not included (no superuser)"))
    if manifest.encryption is not None:
        who = ", ".join(f"{r['type']} {r['fingerprint']}" for r in manifest.encryption.recipients)
        rows.append(("encrypted", f"age, to {who or 'recipients not recorded (imported)'}"))
    if manifest.pinned:
        rows.append(("pinned", "yes"))
    if manifest.table_counts is not None:
        rows.append(("tables", f"{len(manifest.table_counts)} (row counts recorded)"))
    if manifest.last_restore_test is not None:
        test = manifest.last_restore_test
        rows.append(
            (
                "restore test",
                f"{'passed' if test.ok else 'FAILED'} {test.at:%Y-%m-%d %H:%M}Z, "
                f"{test.duration_seconds:.1f}s"
                + (f"; {test.untested_note}" if test.untested_note else ""),
            )
        )
    if locations:
        rows.append(("stored in", ", ".join(locations)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:<{width}}  {value}")


def _database_of(manifest: Manifest) -> str:
    """How listings name what a backup holds: its database, or ``(globals)`` for a server's."""
    return "(globals)" if manifest.kind == "globals" else manifest.database


def _resolve_id(
    backup_id: str, storages: list[Storage], settings: Settings, database: str | None = None
) -> str:
    """A validated id; ``latest`` is the newest verified backup of the configured database
    (``--database``, else DATABASE_URL's), never another database's."""
    if backup_id == "latest":
        return catalog.latest_backup(settings, storages, database).id
    return naming.validate_id(backup_id)


DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database",
        "-d",
        help="Which database 'latest' means (default: DATABASE_URL's).",
    ),
]


def _interval(settings: Settings) -> timedelta | None:
    """The longest gap of the backup schedules (None with BACKUP_MAX_AGE set or nothing
    scheduled): computed by the schedules' own arithmetic only when needed (it costs ~1 s)."""
    if settings.backup_max_age or not settings.backup_enabled:
        return None
    from deployments.schedules import backup_interval

    return backup_interval(settings)
IdentityOpt = Annotated[
    Path | None,
    typer.Option(
        "--identity",
        "-i",
        help="age (or OpenSSH) private key file for encrypted backups "
        "(default: BACKUP_ENCRYPTION_IDENTITY_FILE).",
    ),
]


def max_age_of(settings: Settings) -> timedelta | None:
    """A database's RPO: BACKUP_MAX_AGE, else its backup schedule's longest gap + 1 h."""
    from pgkeeper.monitor import expectations

    return expectations(settings, _interval(settings)).max_age


def _database_settings(settings: Settings, database: str | None) -> Settings:
    """The settings of ``--database NAME`` from the inventory (its URL and overrides)."""
    if database is None:
        return settings
    from pgkeeper.inventory import load_inventory

    return load_inventory(settings, expand=False).lookup(database).settings


# --- commands -----------------------------------------------------------------------------------


@app.command()
@handle_errors
def backup(
    name: Annotated[str | None, typer.Option(help="Backup name (the id's prefix).")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Database to back up (default: DATABASE_URL).")
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", "-F", help="custom (default), plain or directory.")
    ] = None,
    compression: Annotated[
        str | None, typer.Option("--compression", "-C", help="zstd (default), gzip or none.")
    ] = None,
    level: Annotated[int | None, typer.Option(help="Compression level.")] = None,
    schema_only: Annotated[bool, typer.Option("--schema-only", help="Only the schema.")] = False,
    data_only: Annotated[bool, typer.Option("--data-only", help="Only the data.")] = False,
    table: Annotated[
        list[str] | None, typer.Option("--table", "-t", help="Only tables matching (repeatable).")
    ] = None,
    exclude_table: Annotated[
        list[str] | None, typer.Option("--exclude-table", "-T", help="Skip tables (repeatable).")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", help="pg_dump -j for the directory format.")
    ] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification.")] = False,
    no_upload: Annotated[
        bool, typer.Option("--no-upload", help="Do not copy to offsite targets.")
    ] = False,
    no_rotate: Annotated[
        bool, typer.Option("--no-rotate", help="Do not apply retention afterwards.")
    ] = False,
    all_databases: Annotated[
        bool,
        typer.Option("--all", help="Every database of the inventory, and its servers' globals."),
    ] = False,
    database: Annotated[
        str | None,
        typer.Option("--database", "-d", help="An inventory database (name or name@host:port)."),
    ] = None,
    globals_: Annotated[
        bool,
        typer.Option(
            "--globals",
            help="Back up a server's globals instead (roles, memberships, role settings, "
            "tablespaces: pg_dumpall --globals-only): --database-url's, -d NAME's or "
            "DATABASE_URL's server.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Back up the database now: dump, verify, copy offsite, rotate (pgkeeper.procedure)."""
    from pgkeeper.backup import BackupOptions
    from pgkeeper.procedure import take_backup

    settings = settings_from_env()
    if globals_:
        dump_only = {"--format": format, "--compression": compression, "--level": level,
                     "--schema-only": schema_only, "--data-only": data_only, "--table": table,
                     "--exclude-table": exclude_table, "--jobs": jobs,
                     "--all": all_databases}  # fmt: skip
        given = [flag for flag, value in dump_only.items() if value]
        if given:
            raise UsageError(
                f"{', '.join(given)} do not apply to --globals (a server's globals are plain "
                "SQL, compressed with BACKUP_COMPRESSION; --all backs up every '*' server's)"
            )
        if database is not None and database_url is not None:
            raise UsageError("give --database (from the inventory) or --database-url, not both")
        settings = _database_settings(settings, database)  # -d NAME: that database's server
        _backup_globals(settings, name, database_url, no_verify, no_upload, no_rotate, as_json)
        return
    if all_databases:
        chosen = [name, database_url, format, compression, level, table, exclude_table, jobs]
        if database is not None or any(v is not None for v in chosen) or schema_only or data_only:
            raise UsageError(
                "--all backs up each database as the inventory says: set format, compression "
                "and filters per database in BACKUP_INVENTORY, or back up one with --database"
            )
        _backup_fleet(settings, no_verify, no_upload, no_rotate, as_json)
        return
    if database is not None and database_url is not None:
        raise UsageError("give --database (from the inventory) or --database-url, not both")
    settings = _database_settings(settings, database)
    options = BackupOptions(
        name=name,
        database_url=database_url,
        format=format,
        compression=compression,
        compression_level=level,
        schema_only=schema_only,
        data_only=data_only,
        tables=table or (),
        exclude_tables=exclude_table or (),
        jobs=jobs,
        trigger="cli",
    )
    run = take_backup(
        settings,
        options,
        storages=targets(settings),  # built once: a cloud target builds an SDK client
        verify_level="off" if no_verify else None,
        upload_offsite=not no_upload,
        rotate_after=not no_rotate,
        progress_for=progress_bar,
    )
    if as_json:
        print_json({**run.manifest.to_public(), "locations": run.locations})
    else:
        _print_manifest(run.manifest, run.locations)
    run.raise_for_problems()


def _backup_globals(
    settings: Settings,
    name: str | None,
    server_url: str | None,
    no_verify: bool,
    no_upload: bool,
    no_rotate: bool,
    as_json: bool,
) -> None:
    """``backup --globals``: the server's globals through the same steps as a database."""
    from pgkeeper.server_globals import take_globals

    run = take_globals(
        settings,
        server_url,
        storages=targets(settings),
        name=name,
        trigger="cli",
        verify_level="off" if no_verify else None,
        upload_offsite=not no_upload,
        rotate_after=not no_rotate,
        progress_for=progress_bar,
    )
    if as_json:
        print_json({**run.manifest.to_public(), "locations": run.locations})
    else:
        _print_manifest(run.manifest, run.locations)
    run.raise_for_problems()


def _backup_fleet(
    settings: Settings, no_verify: bool, no_upload: bool, no_rotate: bool, as_json: bool
) -> None:
    """``pgkeeper backup --all``: the fleet within its concurrency limits (pgkeeper.fleet)."""
    from pgkeeper import fleet
    from pgkeeper.inventory import load_inventory

    inventory = load_inventory(settings)
    total = len(inventory.enabled) + len(inventory.servers)

    def done(outcome: fleet.Outcome) -> None:
        if as_json:
            return
        if outcome.ok and outcome.manifest is not None:
            m = outcome.manifest
            typer.echo(f"ok      {outcome.key}  {m.id}  {human_size(m.size)}  "
                       f"{outcome.seconds:.1f}s")  # fmt: skip
        else:
            why = outcome.error or "the upload failed"
            typer.echo(f"FAILED  {outcome.key}  {why}")

    if not as_json:
        typer.echo(f"backing up {total} databases and server globals from {inventory.source}")
    run = fleet.backup_all(
        settings, inventory, verify_level="off" if no_verify else None,
        upload=not no_upload, rotate_after=not no_rotate, on_done=done,
    )  # fmt: skip
    if as_json:
        print_json([
            {"key": o.key, "database": o.database, "server": o.server, "ok": o.ok,
             "error": o.error, "backup": o.manifest.to_public() if o.manifest else None,
             "seconds": round(o.seconds, 3)}
            for o in run.outcomes
        ])  # fmt: skip
    else:
        ok = len(run.outcomes) - len(run.failed)
        typer.echo(f"{ok} of {len(run.outcomes)} backed up")
    run.raise_for_problems()


@app.command()
@handle_errors
def upload(
    backup_id: Annotated[
        str | None, typer.Argument(help="Backup id; default: every backup missing offsite.")
    ] = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy backups to the offsite targets (S3, GCS) and prove each copy by checksum."""
    from pgkeeper.upload import clean_offsite, upload_backup, upload_missing

    settings = settings_from_env()
    storages = targets(settings)
    if len(storages) < 2:
        raise UsageError(
            "no offsite target is configured (set AWS_S3_BUCKET, GCS_BUCKET or BACKUP_TARGETS)"
        )
    clean_offsite(settings, storages=storages)
    if backup_id is not None:
        with progress_bar("upload") as progress:
            reports = [
                upload_backup(
                    settings,
                    _resolve_id(backup_id, storages, settings, database),
                    storages=storages,
                    progress=progress,
                )
            ]
    else:
        reports = upload_missing(settings, storages=storages)
    if as_json:
        print_json([r.__dict__ for r in reports])
    else:
        if not reports:
            typer.echo("every backup is already on every offsite target")
        for r in reports:
            for url in r.copied_to:
                typer.echo(f"uploaded {r.backup_id} to {url}")
            for url in r.already_there:
                typer.echo(f"{r.backup_id} already in {url}")
    failures = [f"{r.backup_id} -> {url}: {why}" for r in reports for url, why in r.failed.items()]
    if failures:
        _fail("upload failed: " + "; ".join(failures), 1)


@app.command("list")
@handle_errors
def list_(
    database: Annotated[
        str | None, typer.Option("--database", "-d", help="Only this database's backups.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List every complete backup, newest first, with size, age, format and state."""
    settings = settings_from_env()
    storages = targets(settings)
    entries = catalog.list_all(storages)
    if database is not None:
        entries = [e for e in entries if e.manifest.database == database]
    total = sum(e.manifest.size for e in entries)
    if as_json:
        print_json(
            {
                "backups": [{**e.manifest.to_public(), "locations": e.locations} for e in entries],
                "total": len(entries),
                "totalSize": total,
            }
        )
        return
    if not entries:
        typer.echo(f"no backups in {', '.join(s.url for s in storages)}")
        return
    now = datetime.now(UTC)
    rows = [
        {
            "id": e.id,
            "database": _database_of(e.manifest),
            "size": human_size(e.manifest.size),
            "age": human_age(e.manifest.started_at, now),
            "format": f"{e.manifest.format}/{e.manifest.compression}"
            + ("/age" if e.manifest.encryption is not None else ""),
            "state": e.manifest.state + (" pinned" if e.manifest.pinned else ""),
            "restore test": (
                "-"
                if e.manifest.last_restore_test is None
                else ("passed" if e.manifest.last_restore_test.ok else "FAILED")
            ),
            "stored in": ", ".join(e.locations),
        }
        for e in entries
    ]
    print_table(rows, list(rows[0]))
    typer.echo(f"\n{len(entries)} backups, {human_size(total)} in total")


@app.command()
@handle_errors
def show(
    backup_id: Annotated[str, typer.Argument(help="Backup id (or 'latest').")],
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one backup's record."""
    settings = settings_from_env()
    storages = targets(settings)
    backup_id = _resolve_id(backup_id, storages, settings, database)
    manifest, _ = catalog.find(storages, backup_id)  # raises the not-found error
    locations = [s.url for s in storages if catalog.read_manifest(s, backup_id) is not None]
    entry = catalog.Entry(manifest, locations)
    if as_json:
        print_json({**entry.manifest.to_public(), "locations": entry.locations})
    else:
        _print_manifest(entry.manifest, entry.locations)


@app.command()
@handle_errors
def verify(
    backup_id: Annotated[str, typer.Argument(help="Backup id (or 'latest').")],
    quick: Annotated[bool, typer.Option("--quick", help="Checksums and header only.")] = False,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
    identity: IdentityOpt = None,
) -> None:
    """Re-read a backup and check its checksum, compression stream and dump structure."""
    from pgkeeper.verify import verify_copy

    settings = settings_from_env(backup_encryption_identity_file=identity)
    storages = targets(settings)
    backup_id = _resolve_id(backup_id, storages, settings, database)
    manifest, storage = catalog.find(storages, backup_id)
    with progress_bar("verify", manifest.size) as progress:
        try:
            manifest = verify_copy(
                settings, storage, manifest, level="quick" if quick else "full", progress=progress,
                identity_required=True,
            )  # fmt: skip
        except IdentityError:
            raise  # the key, not the backup: nothing was recorded
        except PgkeeperError:
            if as_json:  # the failed verification was recorded on that copy's manifest
                found = catalog.read_manifest(storage, backup_id)
                recorded = found.verification if found is not None else None
                print_json(recorded.model_dump(mode="json") if recorded else {})
            raise
    assert manifest.verification is not None  # noqa: S101 - verify_backup records it
    if as_json:
        print_json(manifest.verification.model_dump(mode="json"))
        return
    for check in manifest.verification.checks:
        typer.echo(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<12} {check.detail}")
    if manifest.verification.decrypted is False:
        typer.echo(
            f"backup {backup_id} is good as far as can be told without its private key: it was "
            "NOT decrypted (set BACKUP_ENCRYPTION_IDENTITY_FILE or pass --identity FILE to "
            "verify it fully)"
        )
        return
    typer.echo(f"backup {backup_id} is good")


@app.command()
@handle_errors
def restore(
    backup_id: Annotated[str, typer.Argument(help="Backup id, or 'latest' (newest verified).")],
    target_url: Annotated[
        str | None,
        typer.Option(
            help="Database to restore into (default: a new <db>_restored_<time>); for a "
            "globals backup, the server (default: DATABASE_URL's)."
        ),
    ] = None,
    confirm: Annotated[
        str | None, typer.Option(help="Name of the target database, to replace its data.")
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            "-j",
            help="Connections loading the data and building indexes (default "
            "BACKUP_RESTORE_JOBS, 2; 1: one pg_restore fed by the stream).",
        ),
    ] = None,
    no_safety_backup: Annotated[
        bool, typer.Option("--no-safety-backup", help="Do not back up the target first.")
    ] = False,
    no_owner: Annotated[
        bool,
        typer.Option(
            "--no-owner",
            help="Leave the backup's owners out (objects and the database are owned by the "
            "restoring user), as pg_restore --no-owner: for a server without the roles.",
        ),
    ] = False,
    no_privileges: Annotated[
        bool,
        typer.Option(
            "--no-privileges",
            help="Leave the backup's grants out (GRANT/REVOKE, default privileges, the "
            "database's access), as pg_restore --no-privileges.",
        ),
    ] = False,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
    identity: IdentityOpt = None,
) -> None:
    """Restore a backup; a failed restore leaves the target as it was."""
    from pgkeeper.restore import LeaveOut, restore_backup

    settings = settings_from_env(backup_encryption_identity_file=identity)
    storages = targets(settings)
    resolved = _resolve_id(backup_id, storages, settings, database)
    manifest, _ = catalog.find(storages, resolved)
    with progress_bar("restore", manifest.size) as progress:
        result = restore_backup(
            settings,
            resolved,
            target_url,
            confirm=confirm,
            jobs=jobs,
            safety_backup=not no_safety_backup,
            storages=storages,
            progress=progress,
            leave_out=LeaveOut(owner=no_owner, privileges=no_privileges),
        )
    from pgkeeper.server_globals import GlobalsRestore

    if isinstance(result, GlobalsRestore):
        _report_globals(result, as_json)
        return
    if as_json:
        print_json(result.__dict__)
        return
    typer.echo(
        f"restored {result.backup_id} into {result.target} in {result.duration_seconds:.1f}s"
    )
    if result.safety_backup_id:
        typer.echo(f"the previous contents are in backup {result.safety_backup_id}")


def _report_globals(result: GlobalsRestore, as_json: bool) -> None:
    """A globals restore's report: one line per role, membership, setting, tablespace, skip;
    exit 1 when the server refused a statement the rules meant to apply."""
    if as_json:
        print_json(result.to_dict())
    else:
        typer.echo(
            f"restored the globals of {result.backup_id} into {result.target} in "
            f"{result.duration_seconds:.1f}s (from {result.source})"
        )
        for line in result.lines():
            typer.echo(f"  {line}")
    if not result.ok:
        _fail(f"{len(result.failed)} statement(s) of the globals failed (see the report)", 1)


@app.command()
@handle_errors
def delete(backup_id: Annotated[str, typer.Argument(help="Backup id.")]) -> None:
    """Delete a backup from every target (its manifest first)."""
    settings = settings_from_env()
    naming.validate_id(backup_id)
    storages = targets(settings)
    holding = [s for s in storages if catalog.read_manifest(s, backup_id) is not None]
    if not holding:
        catalog.find(storages, backup_id)  # raises the not-found error
    for storage in holding:
        catalog.delete_backup(storage, backup_id)
    typer.echo(f"deleted {backup_id} from {', '.join(s.url for s in holding)}")


@app.command()
@handle_errors
def download(
    backup_id: Annotated[str, typer.Argument(help="Backup id (or 'latest').")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="File to write ('-' for stdout).")
    ] = None,
    decompress: Annotated[
        bool, typer.Option("--decompress", help="Write the raw dump, not the stored bytes.")
    ] = False,
    database: DatabaseOpt = None,
    identity: IdentityOpt = None,
) -> None:
    """Write a backup's stored file (verified against its checksum) to a local file."""
    from pgkeeper import crypto
    from pgkeeper.download import download_name, write_backup

    settings = settings_from_env(backup_encryption_identity_file=identity)
    storages = targets(settings)
    backup_id = _resolve_id(backup_id, storages, settings, database)
    manifest, storage = catalog.find(storages, backup_id)
    name = download_name(manifest, decompress)
    key = None
    if decompress:  # an encrypted backup: the key opens it, before any output is created
        key = crypto.identity_for(settings, manifest, "download --decompress")
        if key is not None:
            crypto.check_identity(storage, manifest, key)
    if output is not None and str(output) == "-":
        write_backup(storage, manifest, sys.stdout.buffer, decompress=decompress, identity=key)
        return
    path = output or Path(name)
    if path.is_dir():
        path = path / name
    if path.exists():
        raise UsageError(f"{path} already exists (remove it or choose another --output)")
    partial = path.with_name(f".{path.name}.part")
    try:
        # 0600: a backup holds every row of the database, whatever the umask says.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, progress_bar("download", manifest.size) as progress:
            write_backup(
                storage, manifest, out, decompress=decompress, progress=progress, identity=key
            )
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    typer.echo(f"wrote {path}")


@app.command("import")
@handle_errors
def import_(
    file: Annotated[
        Path | None, typer.Argument(help="A pg_dump file: custom, plain, tar, directory tar.")
    ] = None,
    name: Annotated[str, typer.Option(help="Backup name for the id.")] = "imported",
    from_dir: Annotated[
        Path | None,
        typer.Option(
            "--from-dir",
            help="A folder of the seed's backups (<name>_<YYYY-MM-DDTHH-MM-SS>.sql.gz): each "
            "is imported keeping its name and time.",
        ),
    ] = None,
    database: Annotated[
        str | None, typer.Option(help="The database the dumps are of (plain SQL does not say).")
    ] = None,
    as_json: JsonOpt = False,
    identity: IdentityOpt = None,
) -> None:
    """Bring an external dump in as a backup (detected by content; verified), or a folder of
    the seed's backups with --from-dir."""
    from pgkeeper.importing import import_file

    settings = settings_from_env(backup_encryption_identity_file=identity)
    if from_dir is not None:
        if file is not None:
            raise UsageError("give a dump FILE or --from-dir DIR, not both")
        _import_folder(settings, from_dir, database, as_json)
        return
    if file is None:
        raise UsageError("give a dump FILE to import, or --from-dir DIR (see 'pgkeeper import "
                         "--help')")  # fmt: skip
    if not file.exists():
        raise UsageError(f"{file} does not exist (check the path)")
    with progress_bar("import", file.stat().st_size if file.is_file() else None) as progress:
        manifest = import_file(settings, file, name=name, progress=progress, database=database)
    if as_json:
        print_json(manifest.to_public())
    else:
        _print_manifest(manifest)


def _import_folder(settings: Settings, folder: Path, database: str | None, as_json: bool) -> None:
    """``import --from-dir``: one line per file as it is done, then the summary."""
    from pgkeeper.folder_import import FileOutcome, import_folder

    labels = {"imported": "imported", "already imported": "already", "skipped": "skipped",
              "failed": "FAILED"}  # fmt: skip

    def told(outcome: FileOutcome) -> None:
        arrow = f" -> {outcome.backup_id}" if outcome.status == "imported" else ""
        typer.echo(f"{labels[outcome.status]:<8}  {outcome.file}{arrow}: {outcome.reason}")

    report = import_folder(
        settings, folder, database=database,
        progress=lambda path, size: progress_bar(path.name, size),
        told=None if as_json else told,
    )  # fmt: skip
    if as_json:
        print_json(report.to_dict())
    else:
        typer.echo(report.summary())
    if not report.ok:
        _fail(f"{report.count('failed')} of the files named like backups could not be imported "
              "(see above); the others are in place", 1)  # fmt: skip


@app.command("restore-test")
@handle_errors
def restore_test(
    backup_id: Annotated[
        str | None, typer.Argument(help="Backup id (default: the newest backup).")
    ] = None,
    staging_url: Annotated[
        str | None,
        typer.Option(help="Server to restore on (default: STAGING_DATABASE_URL)."),
    ] = None,
    checks_dir: Annotated[
        Path | None, typer.Option(help="Folder of .sql checks (default: BACKUP_CHECKS_DIR).")
    ] = None,
    database: DatabaseOpt = None,
    as_json: JsonOpt = False,
    identity: IdentityOpt = None,
) -> None:
    """Restore a backup into a scratch database, compare row counts, run checks, drop it."""
    from pgkeeper.restore_test import failed_summary, headline, run_restore_test

    settings = settings_from_env(backup_encryption_identity_file=identity)
    resolved = None if backup_id in (None, "latest") else naming.validate_id(backup_id)
    result = run_restore_test(
        settings,
        resolved,
        staging_url,
        checks_dir or settings.backup_checks_dir,
        database=database,
    )
    if as_json:
        print_json(result.model_dump(mode="json"))
    else:
        typer.echo(headline(result))
        for mismatch in result.mismatches:
            typer.echo(f"  mismatch: {mismatch}")
        for check in result.checks:
            mark = "skip" if check.skipped else "ok  " if check.ok else "FAIL"
            typer.echo(f"  {mark} {check.name} {check.detail}")
    if not result.ok:
        _fail(failed_summary(result, resolved or "the newest backup"), 1)


@app.command()
@handle_errors
def rekey(
    backup_id: Annotated[str, typer.Argument(help="Backup id (or 'latest').")],
    database: DatabaseOpt = None,
    identity: IdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-encrypt a backup to BACKUP_ENCRYPTION_RECIPIENTS as a new verified copy, then delete
    the old one (an unencrypted backup gets encrypted)."""
    from pgkeeper.rekey import rekey_backup

    settings = settings_from_env(backup_encryption_identity_file=identity)
    storages = targets(settings)
    resolved = _resolve_id(backup_id, storages, settings, database)
    manifest, _ = catalog.find(storages, resolved)
    with progress_bar("rekey", manifest.size) as progress:
        result = rekey_backup(settings, resolved, storages=storages, progress=progress)
    if as_json:
        print_json(result.__dict__)
    else:
        shown = ", ".join(f"{r['type']} {r['fingerprint']}" for r in result.recipients)
        typer.echo(f"rekeyed {result.old_id} as {result.new_id}, encrypted to {shown}")
        typer.echo(f"stored in {', '.join(result.stored_in)}")
        if result.removed_from:
            typer.echo(f"removed {result.old_id} from {', '.join(result.removed_from)}")
    if result.problems:
        _fail("; ".join(result.problems), 1)


@app.command()
@handle_errors
def rotate(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; change nothing.")
    ] = False,
    database: Annotated[
        str | None,
        typer.Option("--database", "-d", help="Only this database (name or name@host:port)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the retention policy on every target (or show its plan with --dry-run); each
    database of the inventory by its own retention settings."""
    from pgkeeper.fleet import group_policy
    from pgkeeper.inventory import configured
    from pgkeeper.rotate import policies_from_settings
    from pgkeeper.rotate import rotate as run_rotate

    settings = settings_from_env()
    storages = targets(settings)
    inventory = configured(settings)
    only = None
    if database is not None:
        if inventory is not None:
            only = inventory.lookup(database).key
        elif "@" in database:
            only = database
        else:
            raise UsageError(
                f"--database {database}: no inventory to find its server in (name it as "
                "name@host:port, or set DATABASE_URL / BACKUP_DATABASES / BACKUP_INVENTORY)"
            )
    report = run_rotate(
        storages, policies_from_settings(settings, storages), dry_run=dry_run,
        group_policy=group_policy(inventory, storages) if inventory else None, only=only,
    )  # fmt: skip
    if as_json:
        typer.echo(report.to_json())
    else:
        # Per target: where, its policy, then one row per backup (the artifact has them all).
        rows = report.as_table()
        for target in report.targets:
            typer.echo(f"target: {target.url}\npolicy: {target.policy}")
            mine = [r for r in rows if r["target"] == target.url]
            columns = ["backup", "state", "size", "action", "reasons"]
            if mine:
                print_table(mine, columns)
            typer.echo("")
        typer.echo(report.summary())
    if not report.ok:
        _fail("rotation failed on some target (see above); nothing listed was lost", 1)


@app.command("inventory")
@handle_errors
def inventory_(as_json: JsonOpt = False) -> None:
    """Every database of the inventory: schedule, newest verified backup and its age, size,
    newest restore test, and whether it is within its RPO (the max age)."""
    from pgkeeper.fleet import status
    from pgkeeper.inventory import load_inventory

    settings = settings_from_env()
    inventory = load_inventory(settings)
    manifests = [e.manifest for e in catalog.list_all(targets(settings))]
    rows = status(inventory, manifests, max_age_of)
    now = datetime.now(UTC)
    if as_json:
        print_json({"source": inventory.source, "databases": [r.to_public(now) for r in rows],
                    "unreachable": inventory.errors})  # fmt: skip
    else:
        table = [
            {
                "database": r.database,
                "server": r.server,
                "schedule": r.schedule if r.enabled else "disabled",
                "newest verified": r.newest_verified or "-",
                "age": human_age(r.verified_at, now) if r.verified_at else "-",
                "size": human_size(r.size) if r.size is not None else "-",
                "restore test": (
                    f"{r.restore_test} {human_age(r.restore_tested_at, now)}"
                    if r.restore_tested_at
                    else "-"
                ),
                "within RPO": {True: "yes", False: "NO", None: "-"}[r.within_rpo(now)],
            }
            for r in rows
        ]
        if table:
            print_table(table, list(table[0]))
        for server, why in inventory.errors.items():
            typer.echo(f"cannot list the databases of {server}: {why}", err=True)
    if any(r.within_rpo(now) is False for r in rows) or inventory.errors:
        raise typer.Exit(1)


@app.command()
@handle_errors
def pin(backup_id: Annotated[str, typer.Argument(help="Backup id.")]) -> None:
    """Pin a backup: rotation never deletes it."""
    from pgkeeper.rotate import pin as pin_backup

    settings = settings_from_env()
    where = pin_backup(targets(settings), naming.validate_id(backup_id))
    typer.echo(f"pinned {backup_id} in {', '.join(where)}")


@app.command()
@handle_errors
def unpin(backup_id: Annotated[str, typer.Argument(help="Backup id.")]) -> None:
    """Unpin a backup: rotation may delete it again."""
    from pgkeeper.rotate import unpin as unpin_backup

    settings = settings_from_env()
    where = unpin_backup(targets(settings), naming.validate_id(backup_id))
    typer.echo(f"unpinned {backup_id} in {', '.join(where)}")


@app.command()
@handle_errors
def usage(as_json: JsonOpt = False) -> None:
    """Storage used by complete backups, per target and in total."""
    from pgkeeper.retention import parse_size
    from pgkeeper.rotate import usage_report

    settings = settings_from_env()
    warn = settings.backup_usage_warn_bytes
    report = usage_report(
        targets(settings),
        parse_size(warn, "BACKUP_USAGE_WARN_BYTES") if warn else None,
    )
    if as_json:
        typer.echo(report.to_json())
        return
    rows = report.as_table()
    print_table(rows, list(rows[0]))


@app.command()
@handle_errors
def monitor(as_json: JsonOpt = False) -> None:
    """Run every health check, print them, tell new and resolved problems; exit 1 on a problem."""
    from pgkeeper import monitor as health
    from pgkeeper.alerts import Route, report_health
    from pgkeeper.postgres import ConnInfo
    from pgkeeper.prefect_api import PrefectLink
    from pgkeeper.retention import parse_duration
    from pgkeeper.rotate import policies_from_settings

    settings = settings_from_env()
    route = Route.of(settings)  # a malformed BACKUP_NOTIFY_URLS fails now, in one line
    storages = targets(settings)
    expect = health.expectations(settings, _interval(settings))
    database = server = None
    if settings.database_url is not None and settings.database_url.get_secret_value():
        source = ConnInfo.parse(settings.require_database_url())
        database, server = source.dbname, source.server
    link = route.prefect if route.prefect.api_url else PrefectLink.from_environment()
    scheduler = None
    if link.api_url and settings.backup_enabled:
        silence = parse_duration(
            settings.backup_scheduler_max_silence, "BACKUP_SCHEDULER_MAX_SILENCE"
        )
        scheduler = link.scheduler_check(silence.total_seconds())
    policies = policies_from_settings(settings, storages)
    fleet, unreachable = health.fleet_scope(
        settings, lambda own: health.expectations(own, _interval(own))
    )
    reports = health.monitor_each(
        storages,
        expect,
        database=database,
        server=server,
        usage_warn_bytes={url: p.usage_warn_bytes for url, p in policies.items()},
        scheduler=scheduler,
        fleet=fleet,
        unreachable=unreachable,
    )
    from pgkeeper.pitr_status import archive_report

    archive = archive_report(settings, storages)  # point-in-time recovery, when archiving
    if archive is not None:
        reports.append(archive)
    report_health(settings, storages[0], reports, route=route)
    failed = [r for r in reports if not r.ok]
    if as_json:
        print_json({"ok": not failed, "reports": [r.to_dict() for r in reports]})
    else:
        rows = [{"subject": r.subject, **row} for r in reports for row in r.as_table()]
        print_table(rows, ["subject", "check", "status", "detail"])
    if failed:
        count = sum(len(r.failed) for r in failed)
        _fail(f"{count} check(s) failed: " + "; ".join(r.summary() for r in failed), 1)


@app.command()
@handle_errors
def metrics(
    textfile: Annotated[
        Path | None,
        typer.Option(help="Write pgkeeper.prom into this node_exporter textfile directory."),
    ] = None,
) -> None:
    """Prometheus metrics of every database and target (stdout, or a textfile for node_exporter)."""
    from pgkeeper.metrics import render, write_textfile
    from pgkeeper.redaction import secrets_of

    settings = settings_from_env()
    storages = targets(settings)
    if textfile is None:
        sys.stdout.buffer.write(render(storages, secrets_of(settings)))
        return
    if not textfile.is_dir():
        raise UsageError(f"{textfile} is not a directory (give node_exporter's textfile folder)")
    typer.echo(f"wrote {write_textfile(storages, textfile, secrets_of(settings))}")


alerts_app = typer.Typer(help="Alert channels and the Prefect automations that deliver them.")
app.add_typer(alerts_app, name="alerts")


@alerts_app.command("install")
@handle_errors
def alerts_install() -> None:
    """Create (or update) the notification block and automations on the Prefect server."""
    from deployments.alerts import install

    report = install(settings_from_env())
    for line in report.lines:
        typer.echo(line)
    if not report.ok:
        _fail(report.problem, 1)


@alerts_app.command("test")
@handle_errors
def alerts_test() -> None:
    """Send a test alert through the configured route (the Prefect server, or directly)."""
    from pgkeeper.alerts import Route
    from pgkeeper.notify import Message

    settings = settings_from_env()
    route = Route.of(settings)
    if not route.channels and not route.via_prefect:
        raise UsageError("BACKUP_NOTIFY_URLS is not set (set it to one or more Apprise URLs)")
    message = Message(
        "pgkeeper: test alert",
        "This is a test of pgkeeper's alerts: if you read it, failures will reach you here.",
        "warning",
    )
    where = "the Prefect server's pgkeeper-alerts automation" if route.via_prefect else (
        ", ".join(route.channels.shown)
    )
    if not route.deliver(message):
        _fail(f"the test alert was not delivered to {where} (see the warning above)", 1)
    typer.echo(f"test alert sent to {where}")


schedule_app = typer.Typer(
    help="The deployments' schedules on the Prefect server, changed at run time "
    "(an edit stays until the environment's value changes)."
)
app.add_typer(schedule_app, name="schedule")


def _print_schedules(report: Any, as_json: bool) -> None:
    if as_json:
        print_json(report.to_dict())
        return
    print_table(report.as_table(), ["deployment", "schedule", "environment's", "source"])
    for name in report.changed:
        typer.echo(f"changed {name}")
    typer.echo(f"\nrule: {report.to_dict()['rule']}")


@schedule_app.command("show")
@handle_errors
def schedule_show(as_json: JsonOpt = False) -> None:
    """Every pgkeeper deployment's schedule on the Prefect server, beside the environment's."""
    from pgkeeper.prefect_api import PrefectLink
    from pgkeeper.schedule import show

    _print_schedules(show(PrefectLink.from_environment()), as_json)


@schedule_app.command("set")
@handle_errors
def schedule_set(
    value: Annotated[
        str,
        typer.Argument(
            help="Like BACKUP_SCHEDULE (hourly, daily, weekly, monthly, a comma list, a cron) or "
            "off; with --deployment: a cron, off or on."
        ),
    ],
    deployment: Annotated[
        str | None,
        typer.Option(help="One deployment (verify, rotate, backup-daily, ...) instead of backups."),
    ] = None,
    timezone: Annotated[
        str | None, typer.Option(help="IANA timezone (default: the schedule's current one).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change schedules on the Prefect server now (serve keeps them over restarts)."""
    from deployments.schedule_edits import requested
    from pgkeeper.prefect_api import PrefectLink
    from pgkeeper.schedule import set_schedules

    link = PrefectLink.from_environment()
    wanted = requested(settings_from_env(), link, value, deployment, timezone)
    _print_schedules(set_schedules(link, wanted), as_json)


@app.command()
@handle_errors
def api(
    host: Annotated[
        str | None, typer.Option(help="Interface (default BACKUP_API_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default BACKUP_API_PORT, 8080).")] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate (chain) file: serve https.")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key file.")] = None,
) -> None:
    """Serve the HTTP API (uvicorn; TLS with --ssl-certfile/--ssl-keyfile); docs at /docs."""
    from pgkeeper.api import serve_api

    serve_api(
        settings_from_env(), host=host, port=port, ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )  # fmt: skip


@app.command()
@handle_errors
def serve() -> None:
    """Serve every Prefect deployment (schedules, UI-triggered runs) in this one process."""
    from deployments.serve import serve_all

    serve_all(settings_from_env())


@app.command()
def demo() -> None:
    """Local Prefect server + sample PostgreSQL + every deployment served; Ctrl-C stops all."""
    from deployments.demo import main as demo_main

    raise typer.Exit(demo_main())


from pgkeeper import cli_pitr  # noqa: E402 - registers on `app`, uses the helpers above

cli_pitr.register(app)


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so the engine's cleanup runs: pg_dump is stopped, the partial
    # object is removed and the backup lock is released.
    raise KeyboardInterrupt


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(0)
    except _click_exceptions.UsageError as exc:
        # Bad usage is one line too (click's default is a multi-line box), exit code 2.
        if exc.ctx is not None and type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        where = exc.ctx.command_path if exc.ctx is not None else "pgkeeper"
        typer.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)


__all__ = ["app", "main"]
