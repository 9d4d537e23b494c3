"""The demo, as a newcomer runs it, from an installed wheel (issue 13: the product must not
import its tests): a wheel built from this checkout is installed into a fresh virtualenv (its
dependencies come from the test environment's site-packages, nothing is downloaded), and
`pgkeeper demo` runs from an empty folder until its banner, then stops on SIGTERM.

It shows the fleet (several databases and a role on the sample server, every one backed up, and
the server's globals), a passing restore test, and a clean stop: exit 0, no sample cluster left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from pgkeeper import catalog
from pgkeeper.storage.local import LocalStorage
from tests.servers import free_port
from tests.support.cli import STRIPPED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BANNER = "pgkeeper demo is running."
START_TIMEOUT = 420  # Prefect server, two clusters, serve, a fleet backup and a restore test


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding only the pgkeeper wheel; returns its bin folder."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(work / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (work / "dist").glob("pgkeeper-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # The dependencies: this environment's site-packages, as a plain path. Its .pth files (the
    # editable install of this checkout) are not processed from there, so `pgkeeper`,
    # `deployments` and friends can only come from the wheel.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.run(
        [str(python), "-c", "import deployments, pgkeeper, sys; "
         "print(pgkeeper.__file__, deployments.__file__, 'tests' in sys.modules)"],
        check=True, capture_output=True, text=True, cwd=work,
    ).stdout  # fmt: skip
    assert where.count(str(site)) == 2 and where.strip().endswith("False"), where
    return venv / "bin"


def _sandboxes_of(pid: int) -> list[Path]:
    """The throwaway clusters (pgkeeper.sandbox) owned by process ``pid``."""
    found = []
    for folder in Path(tempfile.gettempdir()).glob("pgkeeper-pg-*"):
        try:
            if int((folder / "owner.pid").read_text()) == pid:
                found.append(folder)
        except (OSError, ValueError):
            continue
    return found


def test_wheel_installed_demo_runs_a_fleet_and_stops_cleanly(
    installed: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith((*STRIPPED, "PREFECT_"))}
    env["PREFECT_PORT"] = str(free_port())
    log = tmp_path / "demo.out"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [str(installed / "pgkeeper"), "demo"], cwd=tmp_path, env=env,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while BANNER not in log.read_text() and demo.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        text = log.read_text()
        assert BANNER in text, text[-3000:]
        clusters = _sandboxes_of(demo.pid)
        assert len(clusters) == 2, clusters  # the sample server and the staging server
        first_runs = text.split("first runs:")[1].split("deployments served")[0]
        assert "backup/backup-daily          Completed" in first_runs, first_runs
        assert "restore-test/restore-test    Completed" in first_runs, first_runs
        assert "Traceback" not in text

        # The fleet: every database of the sample server and its globals were backed up.
        stored = catalog.list_backups(LocalStorage(tmp_path / ".demo" / "backups"))
        databases = {m.database for m in stored if m.kind == "dump" and m.verified}
        assert {"shop", "crm", "analytics"} <= databases, databases
        assert [m for m in stored if m.kind == "globals" and m.verified]
    finally:
        if demo.poll() is None:
            os.kill(demo.pid, signal.SIGTERM)
        try:
            code = demo.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-3000:]
    assert _sandboxes_of(demo.pid) == []
