"""Restore tests: prove a backup restores, measure how long it takes (the RTO), check the data.

The procedure, in order (each step's reason beside it):
  1. choose the backup (default: the newest complete one not known to be corrupt) and the
     first target holding a copy                    -> the copy an operator would restore first
  2. read the roles the backup names (owners, grantees: its table of contents only,
     archive_roles.py) and compare them with the staging server's; owners or grants naming a
     role staging lacks are left out of the restore (pg_restore --no-owner / --no-privileges)
     and the result says they were not tested     -> roles are server-wide and staging is not
                                                       a copy of production: its missing roles
                                                       say nothing about the backup
  3. restore it into a new scratch database ``pgk_restoretest_<random>`` on the staging server
     (``STAGING_DATABASE_URL``; the source server only with BACKUP_RESTORE_TEST_ON_SOURCE=true),
     timed                                          -> a real restore, never over a live database,
                                                       never on production unless told to
  4. compare per-table row counts with the manifest's snapshot counts (taken in the dump's own
     snapshot, so any difference is a defect, not concurrent writes)
  5. run every ``*.sql`` file of the checks folder in name order against the scratch database;
     each must return a single true value           -> the operator's own invariants
  6. drop the scratch database, whatever happened   -> staging never fills up with test copies
  7. append the outcome to the manifest's ``restore_tests`` on the target it came from
A data problem (a restore that fails, a count that differs, a check that is not true) does not
raise: it is recorded and returned as ``ok=False``, and the caller decides how to fail
(the ``restore-test`` flow fails its run). Infrastructure problems raise (see
``run_restore_test``) and are not recorded: the backup is not at fault when staging is down,
nor when it lacks a role that cannot be left out (a policy's, or any role of a plain dump,
which psql replays as written).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import psycopg

from pgkeeper import archive_roles, catalog, crypto, postgres
from pgkeeper.archive_roles import RoleGaps
from pgkeeper.errors import (
    ConfigError,
    DumpError,
    PgkeeperError,
    RestoreError,
    UsageError,
    VerificationError,
)
from pgkeeper.manifest import CheckResult, Manifest, RestoreTest, untested_note, utcnow
from pgkeeper.postgres import ConnInfo
from pgkeeper.restore import LeaveOut, MissingRoleError, restore_into_new_database, server_roles
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, targets

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "pgk_restoretest_"
OWNERSHIP = "ownership and grants"  # the check saying whether they were restored (tested)
BUILT_IN_CHECKS = ("restore", OWNERSHIP, "row counts")  # the others are the SQL check files
# What to do about roles staging lacks (see 'Whole-server disaster' in docs/disaster-recovery.md).
GLOBALS_ADVICE = (
    "create the roles there, or restore the server's globals onto staging: pgkeeper restore "
    "latest -d '*' --target-url \"$STAGING_DATABASE_URL\""
)


def choose_backup(
    settings: Settings, storages: list[Storage], backup_id: str | None, database: str | None = None
) -> tuple[Manifest, Storage]:
    """The backup to test and the first target holding it (default: the newest backup of the
    configured database not known to be bad).

    Raises InvalidBackupIdError/BackupNotFoundError, UsageError when the default is ambiguous.
    """
    if backup_id is None:
        backup_id = catalog.latest_backup(settings, storages, database, usable=True).id
    return catalog.find(storages, backup_id)


def compare_counts(expected: dict[str, int], restored: dict[str, int]) -> list[str]:
    """Every difference between the snapshot row counts and the restored ones, one line each."""
    mismatches: list[str] = []
    for table in sorted(expected):
        if table not in restored:
            mismatches.append(f"{table}: missing after restore")
        elif restored[table] != expected[table]:
            mismatches.append(
                f"{table}: {restored[table]} rows restored, the backup's snapshot had "
                f"{expected[table]}"
            )
    extra = sorted(set(restored) - set(expected))
    mismatches.extend(f"{table}: not in the backup's snapshot" for table in extra)
    return mismatches


def check_files(checks_dir: Path | None) -> list[Path]:
    """The ``*.sql`` checks in name order; raise ConfigError for a folder that is not there."""
    if checks_dir is None:
        return []
    folder = Path(checks_dir)
    if not folder.is_dir():
        raise ConfigError(
            f"checks folder {folder} does not exist (create it or fix BACKUP_CHECKS_DIR)"
        )
    return sorted(p for p in folder.glob("*.sql") if p.is_file())


def run_check(connection: psycopg.Connection[Any], path: Path) -> CheckResult:
    """Run one check file; it passes when its last statement returns exactly one true value.

    Each check runs in its own transaction, rolled back afterwards, so one check cannot
    change what the next one sees.
    """
    name = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return CheckResult(name=name, ok=False, detail=f"cannot read the file: {exc}")
    try:
        with connection.transaction(force_rollback=True), connection.cursor() as cursor:
            cursor.execute(text.encode())
            while cursor.nextset():  # the last statement's result is the verdict
                pass
            rows = cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CheckResult(name=name, ok=False, detail=f"error: {first}")
    if len(rows) == 1 and len(rows[0]) == 1 and rows[0][0] is True:
        return CheckResult(name=name, ok=True, detail="true")
    shown = repr(rows[:3])[:200]
    return CheckResult(
        name=name, ok=False, detail=f"returned {shown}, expected a single true value"
    )


def _inspect(
    conn: ConnInfo, scratch: str, manifest: Manifest, checks: list[Path]
) -> tuple[int, list[str], list[CheckResult]]:
    """Steps 3 and 4 on the restored scratch database."""
    results: list[CheckResult] = []
    with postgres.connect(conn, dbname=scratch) as connection:
        restored = postgres.table_counts(connection)
        if manifest.table_counts is None:
            mismatches: list[str] = []
            tables = 0  # nothing was compared; the detail says how many were restored
            results.append(
                CheckResult(
                    name="row counts",
                    ok=True,
                    detail=(
                        f"not compared: the backup has no snapshot row counts (schema-only or "
                        f"filtered backup, or BACKUP_ROW_COUNTS=false); {len(restored)} tables "
                        "restored"
                    ),
                )
            )
        else:
            mismatches = compare_counts(manifest.table_counts, restored)
            tables = len(set(manifest.table_counts) | set(restored))
            results.append(
                CheckResult(
                    name="row counts",
                    ok=not mismatches,
                    detail=f"{tables} tables compared, {len(mismatches)} mismatches",
                )
            )
        for path in checks:
            results.append(run_check(connection, path))
    return tables, mismatches, results


def _drop_scratch(conn: ConnInfo, scratch: str) -> None:
    """Drop the scratch database; a failure is logged loudly but does not hide the result."""
    try:
        with postgres.connect(conn, dbname="postgres") as admin:
            postgres.drop_database(admin, scratch)
    except (PgkeeperError, psycopg.Error) as exc:
        log.error(
            "could not drop the restore-test database %s on %s: %s (drop it by hand)",
            scratch, conn.server, exc,
        )  # fmt: skip


def _role_gaps(
    settings: Settings, manifest: Manifest, storage: Storage, staging_url: str
) -> RoleGaps | None:
    """Step 2: the roles the backup names that staging lacks (None: a plain or tar backup,
    whose roles are not known before its restore). Raises ConfigError for a missing role that
    no pg_restore option leaves out, IdentityError for an encrypted backup without its key."""
    existing = server_roles(staging_url)  # staging down: fails here, before any read
    identity = crypto.identity_for(settings, manifest, "restoring it")
    roles = archive_roles.read_roles(settings, manifest, storage, identity)
    if roles is None:
        return None
    gaps = roles.missing_on(existing)
    if gaps.others:
        role, what = next(iter(gaps.others.items()))
        why = f" in {what}, which a restore cannot leave out (only owners and grants)"
        raise ConfigError(_cannot_run(manifest, staging_url, role, why))
    return gaps


def _cannot_run(manifest: Manifest, staging_url: str, role: str, why: str) -> str:
    """The error of a restore test that staging's missing role stops: not the backup's fault."""
    return (
        f"restore-test of backup {manifest.id!r} cannot run on staging "
        f"({ConnInfo.parse(staging_url).server}): it has no role {role!r}, which the backup "
        f"names{why}; the backup was not judged and nothing was recorded ({GLOBALS_ADVICE})"
    )


def _ownership_check(leave_out: LeaveOut, known: bool, note: str) -> CheckResult:
    """What the restore did with the backup's owners and grants, as a check line."""
    if leave_out:
        return CheckResult(
            name=OWNERSHIP,
            ok=True,
            skipped=True,
            detail=f"{note} (restored with {' '.join(leave_out.options)}; {GLOBALS_ADVICE})",
        )
    if not known:
        return CheckResult(name=OWNERSHIP, ok=True, detail="restored as the dump has them")
    return CheckResult(
        name=OWNERSHIP,
        ok=True,
        detail="restored as the backup has them: every role it names exists on staging",
    )


def _record(storage: Storage, manifest: Manifest, result: RestoreTest) -> Manifest:
    """Append the outcome to the manifest as it is stored now (another run may have changed it)."""
    current = catalog.read_manifest(storage, manifest.id) or manifest
    updated = current.model_copy(update={"restore_tests": [*current.restore_tests, result]})
    catalog.write_manifest(storage, updated)
    return updated


def staging_server(settings: Settings) -> str:
    """The server restore tests load: STAGING_DATABASE_URL; the source server (DATABASE_URL)
    only when BACKUP_RESTORE_TEST_ON_SOURCE=true says so on purpose.

    Raises ConfigError when neither is set, naming both variables.
    """
    staging = settings.staging_database_url
    if staging is not None and staging.get_secret_value():
        return staging.get_secret_value()
    if settings.backup_restore_test_on_source:
        return settings.require_database_url()
    raise ConfigError(
        "STAGING_DATABASE_URL is not set: restore tests do not load the production server "
        "(set STAGING_DATABASE_URL to a staging server, or BACKUP_RESTORE_TEST_ON_SOURCE=true "
        "to restore-test on the source server on purpose)"
    )


def run_restore_test(
    settings: Settings,
    backup_id: str | None = None,
    staging_url: str | None = None,
    checks_dir: Path | None = None,
    *,
    storages: list[Storage] | None = None,
    jobs: int | None = None,
    database: str | None = None,
) -> RestoreTest:
    """Restore-test one backup (default: the newest) on the staging server and record the result.

    Returns the recorded RestoreTest; ``ok`` is False when the restore failed, a row count
    differs or a check is not true. Owners and grants naming roles staging lacks are left
    out, and listed in ``missing_roles`` and ``untested`` (no failure). Raises
    InvalidBackupIdError/BackupNotFoundError for the backup, UsageError for a globals backup,
    ConfigError for a missing server URL (no STAGING_DATABASE_URL and the source server not
    allowed: ``staging_server``) or checks folder, or for a role staging lacks that cannot be
    left out (``_role_gaps``; a plain dump's, met by its restore), IdentityError for an
    encrypted backup without its identity (nothing recorded: the backup is not at fault in
    any of these), the connection errors of ``postgres.connect`` for the staging
    server (DatabaseUnavailableError is transient), and StorageError when the result cannot be
    recorded.
    """
    storages = storages if storages is not None else targets(settings)
    manifest, storage = choose_backup(settings, storages, backup_id, database)
    if manifest.kind == "globals":
        raise UsageError(
            f"backup {manifest.id!r} holds the globals of {manifest.server} (roles, tablespaces), "
            "which are not restore-tested: roles are server-wide and a test must not create "
            "them on staging (restore-test a database's backup)"
        )
    staging_url = staging_url or staging_server(settings)  # refused before anything is restored
    conn = ConnInfo.parse(staging_url)
    checks = check_files(checks_dir if checks_dir is not None else settings.backup_checks_dir)
    gaps = _role_gaps(settings, manifest, storage, staging_url)  # step 2, before any restore
    known = gaps is not None  # the roles were read before the restore (custom, directory)
    gaps = gaps or RoleGaps()
    leave_out = LeaveOut(owner=bool(gaps.owners), privileges=bool(gaps.privileges))
    untested = [what for what, left in (("ownership", leave_out.owner),
                                        ("grants", leave_out.privileges)) if left]  # fmt: skip
    missing = gaps.roles
    note = untested_note(untested, missing, conn.server)
    if note:
        log.warning("restore-test of %s: %s (%s)", manifest.id, note, GLOBALS_ADVICE)
    scratch = f"{SCRATCH_PREFIX}{secrets.token_hex(4)}"
    log.info(
        "restore-test of %s from %s into %s on %s", manifest.id, storage.url, scratch, conn.server
    )
    duration = 0.0
    tables = 0
    mismatches: list[str] = []
    results: list[CheckResult] = []
    try:
        try:
            duration = restore_into_new_database(
                settings, manifest, storage, staging_url, scratch, jobs=jobs, leave_out=leave_out
            )
        except MissingRoleError as exc:
            # Staging lacks a role that was not left out (a plain dump replays its OWNER TO
            # and GRANT statements as written): staging's gap, not the backup's fault.
            why = (
                " (a plain dump is replayed as written, its OWNER TO and GRANT statements too)"
                if manifest.format == "plain"
                else ""
            )
            raise ConfigError(_cannot_run(manifest, staging_url, exc.role, why)) from None
        except (RestoreError, VerificationError, DumpError) as exc:
            # The backup (or its copy) is what failed: that is the finding of this test.
            # Connection and usage errors propagate: staging being down, wrong credentials or
            # a missing pg_restore say nothing about the backup.
            mismatches = [f"restore failed: {exc}"]
            results = [CheckResult(name="restore", ok=False, detail=str(exc))]
            if leave_out:
                results.append(_ownership_check(leave_out, known, note))
        else:
            results = [
                CheckResult(name="restore", ok=True, detail=f"{duration:.1f}s"),
                _ownership_check(leave_out, known, note),
            ]
            tables, mismatches, inspected = _inspect(conn, scratch, manifest, checks)
            results.extend(inspected)
    finally:
        _drop_scratch(conn, scratch)
    result = RestoreTest(
        ok=all(c.ok for c in results) and not mismatches,
        at=utcnow(),
        duration_seconds=round(duration, 3),
        server=conn.server,
        tables_compared=tables,
        mismatches=mismatches,
        checks=results,
        missing_roles=missing,
        untested=untested,
    )
    _record(storage, manifest, result)
    log.info(
        "restore-test of %s %s in %.1fs: %d tables compared, %d mismatches%s",
        manifest.id, "passed" if result.ok else "FAILED", duration, tables, len(mismatches),
        f"; {note}" if note else "",
    )  # fmt: skip
    return result


def headline(result: RestoreTest) -> str:
    """One line saying what the restore test actually checked, for the CLI and the report."""
    verdict = "passed" if result.ok else "FAILED"
    took = f"restore took {result.duration_seconds:.1f}s on {result.server}"
    parts = [f"restore test {verdict}: {took}"]
    counts = next((c for c in result.checks if c.name == "row counts"), None)
    if counts is None:
        parts.append("nothing compared (the restore itself failed)")
    elif result.tables_compared:
        parts.append(
            f"row counts of {result.tables_compared} tables compared with the backup's snapshot"
        )
    else:
        parts.append("row counts NOT compared (the backup has no snapshot counts)")
    sql = [c for c in result.checks if c.name not in BUILT_IN_CHECKS]
    if sql:
        passed = sum(1 for c in sql if c.ok)
        parts.append(f"{passed}/{len(sql)} SQL checks passed")
    else:
        parts.append("no SQL checks")
    if result.untested_note:
        parts.append(f"{result.untested_note} ({GLOBALS_ADVICE})")
    return "; ".join(parts)


def failed_summary(result: RestoreTest, backup_id: str) -> str:
    """One line naming what failed in a restore test, for errors and logs."""
    problems = list(result.mismatches) + [
        f"check {c.name}: {c.detail}"
        for c in result.checks
        if not c.ok and c.name not in BUILT_IN_CHECKS  # already in the mismatches
    ]
    first = problems[0] if problems else "unknown failure"
    extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (
        f"restore-test of backup {backup_id!r} failed: {first}{extra} "
        "(see the restore-test report; do not rely on this backup)"
    )


def raise_for_failure(result: RestoreTest, backup_id: str) -> None:
    """Raise VerificationError (check ``restore-test``) when the test did not pass."""
    if not result.ok:
        raise VerificationError(failed_summary(result, backup_id), check="restore-test")
