"""pgkeeper on a Prefect work pool, as the README's "Way 2" runs it: the deployments of
`prefect deploy --all`, process workers with working folders of their own, and Prefect's REST
API to read what happened. Used by the scale-out test and the fleet benchmark.

Plain Python (no pytest), like tests/servers: a worker is a real `prefect worker start`
process; `Worker.kill_machine` SIGKILLs it together with every process below it (its flow
runs run in sessions of their own, so killing its process group would leave them alive).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "pgkeeper"  # prefect.yaml's work pool
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
# Every flow schedule off: in a test or benchmark, runs start only when asked for.
NO_SCHEDULES = {
    "BACKUP_ENABLED": "false",
    "BACKUP_VERIFY_SCHEDULE": "off",
    "BACKUP_ROTATE_SCHEDULE": "off",
    "BACKUP_RESTORE_TEST_SCHEDULE": "off",
    "BACKUP_MONITOR_SCHEDULE": "off",
}


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 1.0) -> Any:
    """Call ``check`` until it returns something true; that value. AssertionError at timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout:.0f} s")


class Api:
    """Prefect's REST API, retried on the 503s a loaded server gives now and then."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=60)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        for attempt in range(5):
            response = self._http.request(method, path, json=body)
            if response.status_code != 503 or attempt == 4:
                break
            time.sleep(1)
        response.raise_for_status()
        return response.json() if response.content else None

    def flow_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/flow_runs/{run_id}")
        return result

    def children(self, run_id: str) -> list[dict[str, Any]]:
        """The flow runs a run started (a fleet run's backup-server runs)."""
        body = {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}, "limit": 200}
        runs: list[dict[str, Any]] = self.call("POST", "/flow_runs/filter", body)
        return runs

    def task_runs(self, flow_run_ids: list[str]) -> list[dict[str, Any]]:
        """Every task run of these flow runs (paged: the API gives at most 200 at a time)."""
        found: list[dict[str, Any]] = []
        while True:
            body = {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200,
                    "offset": len(found), "sort": "EXPECTED_START_TIME_ASC"}  # fmt: skip
            page: list[dict[str, Any]] = self.call("POST", "/task_runs/filter", body)
            found += page
            if len(page) < 200:
                return found

    def workers_of(self, flow_run_ids: list[str]) -> dict[str, str]:
        """flow run id -> the name of the worker that submitted it, from the workers' own
        ``prefect.worker.submitted-flow-run`` events (the server records no worker on the
        flow run itself: its infrastructure_pid is the flow process's pid)."""
        body = {
            "filter": {
                "event": {"name": ["prefect.worker.submitted-flow-run"]},
                "any_resource": {"id": [f"prefect.flow-run.{i}" for i in flow_run_ids]},
                "occurred": {"since": "2000-01-01T00:00:00Z"},
            },
            "limit": 50,  # the API's most
        }
        page = self.call("POST", "/events/filter", body)
        found: dict[str, str] = {}
        for event in page["events"]:
            for related in event.get("related", []):
                run = related["prefect.resource.id"].removeprefix("prefect.flow-run.")
                if run in flow_run_ids:
                    found[run] = event["resource"]["prefect.resource.name"]
        return found

    def start(self, deployment: str, parameters: dict[str, Any] | None = None) -> str:
        """A flow run of ``flow/deployment`` now (as `prefect deployment run` makes one)."""
        flow, name = deployment.split("/")
        found = self.call("GET", f"/deployments/name/{flow}/{name}")
        body = {"parameters": parameters or {}}
        run = self.call("POST", f"/deployments/{found['id']}/create_flow_run", body)
        return str(run["id"])

    def wait(self, run_id: str, timeout: float) -> dict[str, Any]:
        """The flow run once it is in a final state."""

        def final() -> dict[str, Any] | None:
            run = self.flow_run(run_id)
            return run if (run.get("state") or {}).get("type") in FINAL else None

        result: dict[str, Any] = wait_for(final, timeout, f"flow run {run_id}", every=0.5)
        return result

    def online_workers(self) -> list[str]:
        found = self.call("POST", f"/work_pools/{POOL}/workers/filter", {})
        return [w["name"] for w in found if w["status"] == "ONLINE"]

    def close(self) -> None:
        self._http.close()


# --- the deployments --------------------------------------------------------------------------


def checkout_copy(folder: Path) -> Path:
    """A copy of the flows (what PGKEEPER_HOME points a worker at: the pull step's folder)."""
    home = folder / "pgkeeper"
    for package in ("flows", "tasks", "deployments"):
        shutil.copytree(ROOT / package, home / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return home


def _prefect(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def deploy(folder: Path, env: dict[str, str]) -> None:
    """The README's Way 2 from a checkout copy in ``folder``: prefect.yaml rendered with
    ``env``'s settings and no schedule active, a process work pool, `prefect deploy --all`.
    ``env`` holds PREFECT_API_URL. Raises AssertionError with the output when a step fails."""
    home = checkout_copy(folder)
    quiet = {**env, **NO_SCHEDULES}
    rendered = subprocess.run(
        [sys.executable, "-m", "deployments.prefect_yaml"], cwd=home, env=quiet,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    (home / "prefect.yaml").write_text(rendered.stdout)
    pool = _prefect("work-pool", "create", POOL, "--type", "process", env=env, cwd=home)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = _prefect("deploy", "--all", "--no-prompt", env=env, cwd=home)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]


# --- workers ------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its last ')'
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(v.decode(errors="replace").partition("=")[::2] for v in raw if b"=" in v)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@dataclass
class Worker:
    """A `prefect worker start` process on the pool, with a working folder of its own
    (cwd, PREFECT_HOME, and PGKEEPER_HOME: its own copy of the flows)."""

    name: str
    folder: Path
    env: dict[str, str]
    limit: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, name: str, folder: Path, env: dict[str, str], limit: int | None = None,
               query_seconds: float = 2) -> Worker:  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        own = {**env, "PREFECT_HOME": str(folder / "prefect-home"),
               "PGKEEPER_HOME": str(checkout_copy(folder)),
               "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds)}  # fmt: skip
        return cls(name, folder, own, limit)

    def start(self) -> None:
        argv = [PREFECT, "worker", "start", "--pool", POOL, "--type", "process",
                "--name", self.name]  # fmt: skip
        if self.limit is not None:
            argv += ["--limit", str(self.limit)]
        with (self.folder / "worker.log").open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=self.folder, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def dumping(self) -> set[str]:
        """The servers (host:port) that a pg_dump below this worker (in its flow runs) dumps."""
        assert self.proc is not None
        servers = set()
        for pid in descendants(self.proc.pid):
            if "pg_dump" in _cmdline(pid):
                env = _environ(pid)
                if env:
                    servers.add(f"{env.get('PGHOST')}:{env.get('PGPORT')}")
        return servers

    def kill_machine(self) -> list[int]:
        """SIGKILL the worker and everything below it at once, as a lost machine would."""
        assert self.proc is not None
        tree = [self.proc.pid, *descendants(self.proc.pid)]
        _signal_all(tree, signal.SIGSTOP)  # frozen first: nothing forks or reports meanwhile
        _signal_all(tree, signal.SIGKILL)
        self.proc.wait(10)
        return tree

    def stop(self) -> None:
        """SIGKILL the worker and its flow runs (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill_machine()

    def log(self) -> str:
        return (self.folder / "worker.log").read_text(errors="replace")[-3000:]
