"""Pgkeeper's deployments on a test Prefect server: cleared before and after a test, or
registered from the default environment as `pgkeeper serve` registers them (with its record
of the environment's schedules), or by a real `pgkeeper serve` started and stopped."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

from pgkeeper.prefect_api import PGKEEPER_FLOWS, PrefectLink
from pgkeeper.schedule import RECORD_VARIABLE, write_record
from pgkeeper.settings import Settings
from tests.support.cli import PGKEEPER, cli_env


def clear_pgkeeper(link: PrefectLink) -> None:
    """No pgkeeper deployment and no schedule record on the (session-wide) server."""
    for flow in PGKEEPER_FLOWS:
        for deployment in link.deployments_of(flow):
            link.request("DELETE", f"/deployments/{deployment['id']}")
    link.request("DELETE", f"/variables/name/{RECORD_VARIABLE}")


def register_all(link: PrefectLink, settings: Settings) -> None:
    """Every served deployment on ``link``'s server, and serve's record, as serve leaves them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.schedule_edits import environment
    from deployments.serve import build_deployments

    with temporary_settings({PREFECT_API_URL: link.api_url}):
        for deployment in build_deployments(settings):
            deployment.apply()
    write_record(link, environment(settings))


def serve_once(link: PrefectLink, tmp_path: Path, **extra: str) -> str:
    """Start `pgkeeper serve` with ``extra`` settings, wait until it registered everything (and
    recorded the environment's schedules), stop it with SIGTERM; its stdout."""
    env = cli_env(None, tmp_path / "backups", PREFECT_API_URL=str(link.api_url),
                  PREFECT_RUNNER_POLL_FREQUENCY="1", **extra)  # fmt: skip
    out = tmp_path / f"serve-{time.monotonic_ns()}.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen([str(PGKEEPER), "serve"], cwd=tmp_path, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not re.search(r"^serving \d+ deployments", out.read_text(errors="replace"), re.M):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "serve did not stop within 60 s of SIGTERM:\n" + out.read_text(errors="replace")
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.read_text(errors="replace")
