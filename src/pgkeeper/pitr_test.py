"""The PITR restore test: prove the newest base backup plus the archived WAL restore, and
measure how long that takes (the RTO).

The procedure, in order:
  1. restore the newest usable base backup and every archived WAL segment (``--latest``) into
     a scratch folder, as a private server on a free port (no TCP listener, its socket in the
     folder, local trust): ``pitr.restore_pitr(..., scratch=True)``
  2. wait until recovery reached the end of the archive and the server promoted
  3. count the rows of every table of the configured database (a full read of every table:
     the pages replayed from WAL are read back) and run the SQL checks of BACKUP_CHECKS_DIR,
     each of which must return true
  4. stop the server and remove the folder, whatever happened
  5. record the result on the base backup's manifest (``restore_tests``, like the dump
     restore tests: the monitor and ``list`` show it), with the RTO as its duration
Staging servers are not involved: the scratch server runs where this runs, so the
production server is never loaded (invariant 11).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pgkeeper import catalog, postgres
from pgkeeper.errors import PgkeeperError
from pgkeeper.manifest import CheckResult, Manifest, RestoreTest, utcnow
from pgkeeper.pitr import Target, plan, restore_pitr, server_user, stop_server
from pgkeeper.postgres import ConnInfo
from pgkeeper.restore_test import check_files, run_check
from pgkeeper.sandbox import free_port
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage

SERVER = "local scratch cluster (pitr)"


def _scratch_folder(owner: str | None) -> Path:
    parent = Path(tempfile.mkdtemp(prefix="pgkeeper-pitr-test-"))
    if owner is not None:  # root: the folder is handed to the server's user
        parent.chmod(0o755)
    return parent


def run_pitr_restore_test(
    settings: Settings, storages: Sequence[Storage], checks_dir: Path | None = None
) -> tuple[Manifest, RestoreTest]:
    """Restore-test the newest base backup with all archived WAL; see the module docstring.

    Returns the base backup and the recorded result (a failed check is a result, not an
    exception). Raises BackupNotFoundError when there is no base backup, UsageError /
    WalGapError when the archive cannot serve a restore (those are failures to look at, not
    test results), and storage errors.
    """
    checks_dir = checks_dir or settings.backup_checks_dir
    files = check_files(checks_dir)
    chosen = plan(settings, storages, Target(latest=True))  # raises before anything is made
    owner = server_user(settings)
    parent = _scratch_folder(owner)
    folder = parent / "data"
    started = time.monotonic()
    checks: list[CheckResult] = []
    tables = 0
    try:
        result = restore_pitr(
            settings,
            Target(latest=True),
            folder,
            base_id=chosen.base.id,
            port=free_port(),
            start=True,
            scratch=True,
            storages=storages,
        )
        rto = time.monotonic() - started
        checks.append(CheckResult(name="recovered", ok=True, detail=result.recovered_to))
        tables = _read_back(settings, folder, result.port or 0, files, checks)
    except PgkeeperError as exc:
        rto = time.monotonic() - started
        checks.append(CheckResult(name="recovered", ok=False, detail=exc.message))
    finally:
        stop_server(settings, folder, owner)
        shutil.rmtree(parent, ignore_errors=True)
    test = RestoreTest(
        ok=all(c.ok for c in checks),
        at=utcnow(),
        duration_seconds=rto,
        server=SERVER,
        tables_compared=tables,
        checks=checks,
    )
    return _record(storages, chosen.base, test), test


def _read_back(
    settings: Settings, folder: Path, port: int, files: list[Path], checks: list[CheckResult]
) -> int:
    """Count every table's rows and run the SQL checks on the restored server."""
    source = ConnInfo.parse(settings.require_database_url())
    local = ConnInfo({"host": str(folder), "port": str(port),
                      "user": source.params.get("user", "postgres"),
                      "dbname": source.dbname})  # fmt: skip
    with postgres.connect(local) as connection:
        counts = postgres.table_counts(connection)
        checks.append(
            CheckResult(
                name="row counts",
                ok=True,
                detail=f"{len(counts)} tables of {source.dbname}, {sum(counts.values())} rows read",
            )
        )
        for path in files:
            checks.append(run_check(connection, path))
    return len(counts)


def _record(storages: Sequence[Storage], base: Manifest, test: RestoreTest) -> Manifest:
    """Append the result to the base backup's manifest on the first target holding it."""
    for storage in storages:
        current = catalog.read_manifest(storage, base.id)
        if current is not None:
            updated = current.model_copy(update={"restore_tests": [*current.restore_tests, test]})
            catalog.write_manifest(storage, updated)
            return updated
    return base
