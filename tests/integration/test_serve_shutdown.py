"""`pgkeeper serve` stops within a bounded time on SIGTERM even when its Prefect server is gone,
and says in one line what it could not do (issue 13: it used to hang in "Pausing all
deployments..." for minutes, retrying a server that had been killed first)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.schedules import plan
from pgkeeper.prefect_api import PrefectLink, PrefectUnavailableError
from pgkeeper.settings import load_settings
from tests.servers.postgres import PgCluster
from tests.servers.prefect import PrefectServer
from tests.support.cli import PGKEEPER, cli_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[2]
STOP_WITHIN_SECONDS = 30.0


@pytest.fixture
def doomed_prefect_server(tmp_path: Path) -> Iterator[PrefectServer]:
    """A real `prefect server start` of this test's own (its database in tmp_path), which the
    test kills; the session's servers stay up for the other tests."""
    saved = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # inherited by the server only
    try:
        server = PrefectServer().start()
    finally:
        if saved is not None:
            os.environ["PREFECT_HOME"] = saved
    try:
        yield server
    finally:
        server.stop()


def _unreachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2):  # noqa: S310 - our own URL
            return False
    except urllib.error.HTTPError:
        return False
    except (urllib.error.URLError, OSError):
        return True


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _pg_dumps_of(marker: str) -> list[int]:
    """pids of live pg_dump processes whose environment carries `marker` (our BACKUP_DIR)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and (entry / "comm").read_text().strip() == "pg_dump"
                and (marker.encode() in (entry / "environ").read_bytes())
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _start_serve(api_url: str, url: str, backups: Path, cwd: Path) -> subprocess.Popen[bytes]:
    env = cli_env(
        url, backups, PREFECT_API_URL=api_url, PREFECT_RUNNER_POLL_FREQUENCY="1",
        BACKUP_ENABLED="false", BACKUP_COMPRESSION_THREADS="1",
    )  # fmt: skip
    with (cwd / "serve.log").open("wb") as log:
        return subprocess.Popen([str(PGKEEPER), "serve"], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.PIPE)  # fmt: skip


def _ask(link: PrefectLink, method: str, path: str) -> object:
    """One call to the server, None while it does not answer (a loaded machine)."""
    try:
        return link.request(method, path)
    except PrefectUnavailableError:
        return None


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill serve if the test stopped early, and close its stderr pipe."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _stop(proc: subprocess.Popen[bytes]) -> tuple[float, str]:
    """SIGTERM; (seconds until it exited, its stderr)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
        raise AssertionError(
            f"serve still running 180 s after SIGTERM:\n{stderr.decode()[-3000:]}"
        ) from None
    return time.monotonic() - started, stderr.decode(errors="replace")


@pytest.mark.slow
def test_sigterm_with_the_prefect_server_gone_stops_in_bounded_time_and_says_what_it_could_not_do(
    doomed_prefect_server: PrefectServer, sample_db: str, tmp_path: Path
) -> None:
    """Serve registered and polling; the Prefect server is killed; SIGTERM to serve: it exits
    within 30 s, and stderr has one line saying the deployments could not be paused."""
    api_url = doomed_prefect_server.api_url
    names = {s.name for s in plan(load_settings(_env_file=None))}
    proc = _start_serve(api_url, sample_db, tmp_path / "backups", tmp_path)
    try:
        link = PrefectLink(api_url=api_url, ui_url=None, timeout=30)

        def polled() -> bool:
            try:
                found = link.request("POST", "/deployments/filter", {"limit": 200}) or []
            except PrefectUnavailableError:  # a loaded machine: the server is slow, ask again
                return False
            served = {d["name"] for d in found if d.get("last_polled")}
            return names <= served

        _wait(polled, 120, "serve to register and poll every deployment")
        doomed_prefect_server.stop()
        assert _unreachable(api_url)

        took, text = _stop(proc)
    finally:
        _reap(proc)
    assert took < STOP_WITHIN_SECONDS, f"serve took {took:.1f}s to stop:\n{text[-3000:]}"
    assert proc.returncode == 0, text[-3000:]
    # Prefect logs the server's websocket dropping (with its traceback) before the signal;
    # from the signal on, serve says one line and no traceback.
    after = text.split("SIGTERM received", 1)[-1]
    told = [line for line in after.splitlines() if "could not pause" in line]
    assert len(told) == 1, text[-3000:]
    assert api_url.removesuffix("/api").split("//")[1] in told[0]
    assert "Traceback" not in after and "error:" not in after, after


@pytest.mark.slow
def test_sigterm_mid_backup_with_the_prefect_server_gone_stops_the_run_and_cleans_up(
    doomed_prefect_server: PrefectServer, sample_db: str, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """A backup run is dumping (pg_dump waits on a table lock the test holds) when the Prefect
    server is killed; SIGTERM to serve: it exits within 30 s, pg_dump is gone, the partial
    backup is removed, and one line says what could not be done."""
    api_url = doomed_prefect_server.api_url
    backups = tmp_path / "backups"
    proc = _start_serve(api_url, sample_db, backups, tmp_path)
    link = PrefectLink(api_url=api_url, ui_url=None, timeout=30)
    dbname = sample_db.rsplit("/", 1)[1].split("?")[0]
    with pg_cluster.connect(dbname) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE shop.orders IN ACCESS EXCLUSIVE MODE")
        try:
            deployment = _wait(
                lambda: _ask(link, "GET", "/deployments/name/backup/backup-daily"), 120,
                "serve to register backup-daily",
            )  # fmt: skip
            link.request("POST", f"/deployments/{deployment['id']}/create_flow_run", {})
            _wait(lambda: _pg_dumps_of(str(backups)), 90, "pg_dump to start")
            doomed_prefect_server.stop()
            assert _unreachable(api_url)
            took, text = _stop(proc)
        finally:
            _reap(proc)
            blocker.execute("ROLLBACK")
    after = text.split("SIGTERM received", 1)[-1]
    assert took < STOP_WITHIN_SECONDS, f"serve took {took:.1f}s to stop:\n{text[-3000:]}"
    assert _pg_dumps_of(str(backups)) == []
    leftovers = [p for p in backups.rglob("*") if p.is_file()] if backups.exists() else []
    assert leftovers == []
    told = [line for line in after.splitlines() if line.startswith("warning: could not")]
    assert len(told) == 1, text[-3000:]
    assert "Traceback" not in after.split(told[0], 1)[1]
