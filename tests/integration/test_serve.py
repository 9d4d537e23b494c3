"""`python -m deployments.serve` in its own process against a Prefect server: it registers every
deployment, runs a backup triggered from the API, and on SIGTERM mid-dump stops cleanly: the run
ends Cancelled, no partial backup is left, no pg_dump outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun

from deployments.schedules import plan
from pgkeeper.settings import load_settings
from tests.servers.postgres import PgCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
BIG_ROWS = 1_000_000  # ~100 MB of text: its gzip dump takes ~7 s here


@pytest.fixture(scope="module")
def big_db(pg_cluster: PgCluster) -> Iterator[str]:
    """A database whose dump takes a few seconds (random-ish text, gzip in the test)."""
    name = f"big_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        "CREATE TABLE events (id bigint PRIMARY KEY, body text NOT NULL)", dbname=name
    )
    pg_cluster.execute(
        "INSERT INTO events SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text)"
        " FROM generate_series(1, %s) g",
        [BIG_ROWS],
        dbname=name,
    )
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _pg_dumps_of(marker: str) -> list[int]:
    """pids of live pg_dump processes whose environment carries `marker` (our BACKUP_DIR)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "pg_dump":
                continue
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _flow_run(run_id: uuid.UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


SERVE_COMMANDS = {
    "module": [sys.executable, "-m", "deployments.serve"],
    "cli": [str(Path(sys.executable).parent / "pgkeeper"), "serve"],
}


@pytest.fixture(params=sorted(SERVE_COMMANDS))
def serve_process(
    request: pytest.FixtureRequest, prefect_server: str, big_db: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Serve (`python -m deployments.serve` or `pgkeeper serve`) for the big database,
    schedules off, polling every second."""
    backups = tmp_path / "backups"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "DATABASE_URL": big_db,
        "BACKUP_DIR": str(backups),
        "BACKUP_ENABLED": "false",  # only the run this test starts
        "BACKUP_COMPRESSION": "gzip",
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        SERVE_COMMANDS[request.param], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    try:
        yield proc, backups
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_sigterm_during_a_served_backup_cancels_it_and_leaves_nothing(
    serve_process: tuple[subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    """SIGTERM to serve mid-dump: the run ends Cancelled, pg_dump is gone, nothing is left in
    the backup folder, and the served deployments were all registered first."""
    proc, backups = serve_process
    expected = [f"{s.flow}/{s.name}" for s in plan(load_settings(_env_file=None))]

    def registered() -> bool:
        with get_client(sync_client=True) as client:
            try:
                for name in expected:
                    client.read_deployment_by_name(name)
            except Exception:  # not there yet
                return False
        return True

    _wait(registered, 60, "serve to register every deployment")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("backup/backup-daily")
        run = client.create_flow_run_from_deployment(deployment.id)

    _wait(lambda: _pg_dumps_of(str(backups)), 60, "pg_dump to start")
    time.sleep(1.0)  # well inside the dump: data is streaming into the temp object
    assert any(p.name.startswith(".") for p in backups.rglob("*") if p.is_file())
    proc.send_signal(signal.SIGTERM)

    proc.wait(timeout=60)
    state = _wait(
        lambda: (s := _flow_run(run.id).state) is not None and s.is_final() and s, 30,
        "the run to reach a final state",
    )  # fmt: skip
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert state.is_cancelled(), f"{state!r}\n{log[-3000:]}"
    assert _pg_dumps_of(str(backups)) == []
    leftovers = [p for p in backups.rglob("*") if p.is_file()] if backups.exists() else []
    assert leftovers == []
