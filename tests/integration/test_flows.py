"""The Prefect flows end to end, under one session-wide Prefect test server, against a real
PostgreSQL: backup -> restore-test, artifacts, retries on transient errors only, missed runs
skipped, the restore form's safe defaults."""

from __future__ import annotations

import contextlib
import socket
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pgkeeper import catalog
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from tests.integration.conftest import SHOP_TABLES
from tests.servers import free_port
from tests.servers.postgres import PgCluster
from tests.support.flows import artifacts, task_runs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _backups(settings_dir: Path) -> list[str]:
    settings = load_settings(_env_file=None, backup_dir=str(settings_dir))
    return [e.id for e in catalog.list_all(targets(settings))]


# -- backup -> restore-test --------------------------------------------------------------------


def test_backup_then_restore_test_pass_with_theirartifacts(
    flow_env: Path, pg_cluster: PgCluster
) -> None:
    """A backup run dumps, verifies and publishes the inventory and progress; a restore-test
    run passes on the multi-table schema, reports it and records it in the manifest."""
    from flows.backup import backup
    from flows.restore_test import restore_test

    state = backup(return_state=True)
    assert state.is_completed(), state.message
    backup_id = state.result()
    assert _backups(flow_env) == [backup_id]
    runs = task_runs(state)
    assert {"backup", "verify", "inventory"} <= set(runs)
    assert all(r.state is not None and r.state.is_completed() for r in runs.values())
    published = artifacts(state)
    assert published["backup-progress"].data == 100.0
    final = published["backup-progress"].description  # the final figures, not "of about"
    assert final.startswith(f"{backup_id}: ") and final.endswith("stored, done"), final
    inventory = published["backup-inventory"].data
    assert backup_id in str(inventory) and "yes" in str(inventory)  # verified

    tested = restore_test(return_state=True)
    assert tested.is_completed(), tested.message
    result = tested.result()
    assert result.ok and result.tables_compared == len(SHOP_TABLES)
    report = artifacts(tested)["restore-test-report"].data
    assert "PASSED" in report and f"tables compared: **{len(SHOP_TABLES)}**" in report
    manifest, _ = catalog.find(
        targets(load_settings(_env_file=None, backup_dir=str(flow_env))), backup_id
    )
    assert manifest.verified and manifest.restore_tests == [result]
    # The manifest names the run that made it (GET /api/runs/{id} reports the backup id).
    assert manifest.flow_run_id == str(state.state_details.flow_run_id)


def test_restore_test_fails_the_run_when_restored_data_is_wrong(
    flow_env: Path, tmp_path: Path
) -> None:
    """A check that is not true after the restore fails the run, with the report published
    first and the failure recorded in the manifest."""
    from flows.backup import backup
    from flows.restore_test import restore_test

    checks = tmp_path / "checks"
    checks.mkdir()
    (checks / "orders_nonempty.sql").write_text("SELECT count(*) > 5000 FROM shop.orders")
    backup_id = backup()

    state = restore_test(checks_dir=str(checks), return_state=True)

    assert state.is_failed()
    assert "orders_nonempty.sql" in (state.message or "") or "restore-test" in (state.message or "")
    runs = task_runs(state)
    assert runs["restore-test-verdict"].state is not None
    assert runs["restore-test-verdict"].state.is_failed()
    assert runs["restore-test-verdict"].run_count == 1  # a data failure is not retried
    assert "FAILED" in artifacts(state)["restore-test-report"].data
    manifest, _ = catalog.find(
        targets(load_settings(_env_file=None, backup_dir=str(flow_env))), backup_id
    )
    assert [t.ok for t in manifest.restore_tests] == [False]


def test_a_backup_is_copied_to_every_offsite_target(
    flow_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With BACKUP_TARGETS set, the backup run uploads the verified backup and the inventory
    lists both places it is stored."""
    from flows.backup import backup

    offsite = tmp_path / "offsite"
    monkeypatch.setenv("BACKUP_TARGETS", str(offsite))

    state = backup(return_state=True)

    assert state.is_completed(), state.message
    backup_id = state.result()
    assert _backups(offsite) == [backup_id]
    published = artifacts(state)
    assert str(offsite) in str(published["backup-inventory"].data)
    assert published["upload-progress"].data == 100.0


# -- retries -----------------------------------------------------------------------------------


class FlakyTcpProxy:
    """A TCP forwarder to PostgreSQL that drops the first `drops` connections on accept."""

    def __init__(self, port: int, drops: int) -> None:
        self.upstream = port
        self.drops = drops
        self.accepted = 0
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drops:
                client.close()  # the server "went away": a transient failure
                continue
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as upstream:
            back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
            back.start()
            self._pipe(client, upstream)
            back.join()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same retry policy (count, condition, jitter), but no 10 s backoff in tests."""
    import flows.backup
    from tasks.backup import backup_database

    monkeypatch.setattr(
        flows.backup, "backup_database", backup_database.with_options(retry_delay_seconds=0.2)
    )


def test_a_transient_database_failure_is_retried_and_recovers(
    flow_env: Path, pg_cluster: PgCluster, sample_db: str, fast_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The server dropping the first connection is transient: the backup task retries and
    the run completes with one backup."""
    from flows.backup import backup

    proxy = FlakyTcpProxy(pg_cluster.port, drops=1)
    try:
        dbname = sample_db.rsplit("/", 1)[1]
        monkeypatch.setenv("DATABASE_URL", pg_cluster.url(dbname).replace(
            f":{pg_cluster.port}/", f":{proxy.port}/"
        ))  # fmt: skip
        state = backup(return_state=True)
    finally:
        proxy.close()

    assert state.is_completed(), state.message
    assert task_runs(state)["backup"].run_count == 2
    assert len(_backups(flow_env)) == 1


def test_a_wrong_password_is_not_retried(
    flow_env: Path, pg_cluster: PgCluster, sample_db: str, fast_retries: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Authentication failures are permanent: one attempt, a failed run, a one-line reason."""
    from flows.backup import backup

    dbname = sample_db.rsplit("/", 1)[1]
    monkeypatch.setenv("DATABASE_URL", pg_cluster.url(dbname, password="wrong-password"))

    state = backup(return_state=True)

    assert state.is_failed()
    run = task_runs(state)["backup"]
    assert run.run_count == 1
    assert "authentication failed" in (state.message or "")
    assert "wrong-password" not in (state.message or "")
    assert _backups(flow_env) == []


# -- missed runs -------------------------------------------------------------------------------


def test_a_run_later_than_one_period_is_skipped_without_a_backup(
    flow_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduled run starting more than max_lateness after its time ends "Skipped" and does
    nothing; the same lateness without the schedule's threshold (a manual run) backs up."""
    import prefect.runtime.flow_run

    from flows.backup import backup

    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    monkeypatch.setattr(
        prefect.runtime.flow_run, "scheduled_start_time", two_hours_ago, raising=False
    )

    skipped = backup(max_lateness_minutes=60, return_state=True)
    assert skipped.is_completed() and skipped.name == "Skipped"
    assert "started 120 minutes late" in (skipped.message or "")
    assert _backups(flow_env) == []

    on_time = backup(max_lateness_minutes=180, return_state=True)
    assert on_time.is_completed() and on_time.name == "Completed"
    assert len(_backups(flow_env)) == 1


# -- verify and restore ------------------------------------------------------------------------


def test_verify_fails_the_run_for_a_corrupt_backup_and_verifies_the_rest(
    flow_env: Path,
) -> None:
    """The verify flow checks every backup due; a corrupt one fails the run, others pass."""
    from flows.backup import backup
    from flows.verify import verify

    good = backup(name="good", verify="off")
    bad = backup(name="bad", verify="off")
    settings = load_settings(_env_file=None, backup_dir=str(flow_env))
    manifest, _ = catalog.find(targets(settings), bad)
    data = flow_env / bad / manifest.objects[0].name
    data.write_bytes(data.read_bytes()[:-100])

    state = verify(return_state=True)

    assert state.is_failed()
    stored = {e.id: e.manifest for e in catalog.list_all(targets(settings))}
    assert stored[good].verified
    assert stored[bad].verification_failed


def test_restore_defaults_to_a_new_database_and_refuses_to_overwrite_without_confirm(
    flow_env: Path, pg_cluster: PgCluster, sample_db: str
) -> None:
    """With the form's defaults the newest backup lands in a new database; naming a database
    that has data without confirm fails and leaves it as it was."""
    from flows.backup import backup
    from flows.restore import restore

    backup_id = backup()
    source = sample_db.rsplit("/", 1)[1]

    result = restore()
    try:
        assert result.backup_id == backup_id and not result.replaced
        assert result.database.startswith(f"{source[:40]}_restored_")
        rows = pg_cluster.query("SELECT count(*) FROM shop.orders", dbname=result.database)
        assert rows == [(1200,)]
    finally:
        pg_cluster.drop_database(result.database)

    refused = restore(target=source, return_state=True)
    assert refused.is_failed()
    assert f"pass --confirm {source}" in (refused.message or "")
    assert task_runs(refused)["restore"].run_count == 1
    assert pg_cluster.query("SELECT count(*) FROM shop.orders", dbname=source) == [(1200,)]


def test_restore_refuses_a_target_url_carrying_a_password(flow_env: Path) -> None:
    """Flow parameters are stored and shown: a target URL with a password is refused."""
    from flows.restore import restore

    state = restore(target="postgresql://u:secret@127.0.0.1:1/x", return_state=True)

    assert state.is_failed()
    assert "must not contain a password" in (state.message or "")
