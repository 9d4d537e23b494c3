"""The fleet against two real servers: an inventory with a '*' server and listed databases,
`pgkeeper backup --all` within its concurrency limits (measured on the dumps themselves), one
failure that stops nothing else and is told in one message, per-database retention, and
`pgkeeper inventory`."""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgkeeper import catalog
from pgkeeper.storage import LocalStorage
from tests.servers.postgres import PgCluster
from tests.servers.receivers import WebhookReceiver
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def second_cluster() -> Iterator[PgCluster]:
    """Another server, so the fleet spans two."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def fleet(pg_cluster: PgCluster, second_cluster: PgCluster) -> Iterator[dict[str, list[str]]]:
    """Three databases on the first server (found through '*'), two on the second (listed)."""
    tag = uuid.uuid4().hex[:6]
    names = {
        "a": [f"fa{i}_{tag}" for i in range(3)],
        "b": [f"fb{i}_{tag}" for i in range(2)],
    }
    for cluster, key in ((pg_cluster, "a"), (second_cluster, "b")):
        for name in names[key]:
            cluster.create_database(name)
            cluster.execute(
                "CREATE TABLE t (id int PRIMARY KEY, v text);"
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
                dbname=name,
            )
    yield names
    for cluster, key in ((pg_cluster, "a"), (second_cluster, "b")):
        for name in names[key]:
            cluster.drop_database(name)


def _inventory(tmp_path: Path, a: PgCluster, b: PgCluster, names: dict[str, list[str]],
               extra_b: str = "") -> Path:  # fmt: skip
    """'*' on the first server (other test databases excluded), two listed on the second,
    passwords from the environment (FLEET_PW_A, FLEET_PW_B), one database keeping 1 backup."""
    tag = names["a"][0].split("_")[-1]
    a_url = a.url("*", password="")
    b_url = b.url(names["b"][0], password="")
    text = f"""
servers:
  - url: "{a_url}"
    password_env: FLEET_PW_A
    globals: false
    include: ["fa*_{tag}"]
    databases:
      {names["a"][0]}: {{max_backups: 1}}
  - url: "{b_url}"
    password_env: FLEET_PW_B
    globals: true
    databases:
      {names["b"][1]}: {{}}
{extra_b}
"""
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def _env(tmp_path: Path, inventory: Path, a: PgCluster, b: PgCluster, **extra: str) -> dict[str, str]:  # noqa: E501
    env = cli_env(None, tmp_path / "backups", BACKUP_INVENTORY=str(inventory),
                  FLEET_PW_A=a.password, FLEET_PW_B=b.password, **extra)  # fmt: skip
    return env


def _timed_pg_dump(tmp_path: Path, cluster: PgCluster) -> Path:
    """A PG_BIN_DIR whose pg_dump records when it ran against which server (and holds each
    dump 0.4 s longer), so the test can measure how many ran at once."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "dumps.log"
    real = cluster.bindir / "pg_dump"
    (bindir / "pg_dump").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then exec {real} --version; fi\n'
        f'echo "start $PGHOST:$PGPORT $(date +%s.%N)" >> {log}\n'
        "sleep 0.4\n"
        f'{real} "$@"; code=$?\n'
        f'echo "end $PGHOST:$PGPORT $(date +%s.%N)" >> {log}\n'
        "exit $code\n"
    )
    (bindir / "pg_dump").chmod(0o755)
    for tool in ("pg_restore", "psql", "pg_dumpall"):
        (bindir / tool).symlink_to(cluster.bindir / tool)
    return bindir


def _most_at_once(log: Path) -> tuple[dict[str, int], int]:
    """The most dumps that overlapped, per server and in all, from the timing log."""
    events = []
    for line in log.read_text().splitlines():
        kind, server, at = line.split()
        events.append((float(at), 1 if kind == "start" else -1, server))
    events.sort()
    running: dict[str, int] = {}
    per_server: dict[str, int] = {}
    total = most = 0
    for _, delta, server in events:
        running[server] = running.get(server, 0) + delta
        total += delta
        per_server[server] = max(per_server.get(server, 0), running[server])
        most = max(most, total)
    return per_server, most


def test_backup_all_covers_the_fleet_within_its_concurrency_limits(
    pg_cluster: PgCluster, second_cluster: PgCluster, fleet: dict[str, list[str]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Five databases on two servers, BACKUP_SERVER_CONCURRENCY=1, BACKUP_FLEET_CONCURRENCY=2:
    every database backed up once and verified; never two dumps on one server at once, never
    more than two in all, and the two servers did overlap."""
    inventory = _inventory(tmp_path, pg_cluster, second_cluster, fleet)
    bindir = _timed_pg_dump(tmp_path, pg_cluster)
    env = _env(tmp_path, inventory, pg_cluster, second_cluster, PG_BIN_DIR=str(bindir),
               BACKUP_SERVER_CONCURRENCY="1", BACKUP_FLEET_CONCURRENCY="2")  # fmt: skip
    proc = run_cli("backup", "--all", "--json", env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outcomes = json.loads(proc.stdout)
    expected = {f"{n}@{pg_cluster.host}:{pg_cluster.port}" for n in fleet["a"]}
    expected |= {f"{n}@{second_cluster.host}:{second_cluster.port}" for n in fleet["b"]}
    assert {o["key"] for o in outcomes if o["database"] != "*"} == expected
    assert all(o["ok"] and o["backup"]["state"] == "verified" for o in outcomes)
    globals_of = [o for o in outcomes if o["database"] == "*"]
    assert [o["server"] for o in globals_of] == [f"{second_cluster.host}:{second_cluster.port}"]
    assert globals_of[0]["backup"]["kind"] == "globals"
    listed = catalog.list_backups(LocalStorage(tmp_path / "backups"))
    dumps = sorted(f"{m.database}@{m.server}" for m in listed if m.kind == "dump")
    assert dumps == sorted(expected)
    per_server, most = _most_at_once(tmp_path / "dumps.log")
    # pg_dump also runs once per filtered-table check; here there are none: 5 dumps.
    assert len((tmp_path / "dumps.log").read_text().splitlines()) == 2 * len(expected)
    assert max(per_server.values()) == 1 and most == 2


def test_one_failing_database_stops_nothing_and_is_told_in_one_message(
    pg_cluster: PgCluster, second_cluster: PgCluster, fleet: dict[str, list[str]],
    tmp_path: Path, webhook_receiver: WebhookReceiver, inboxes: None,
) -> None:  # fmt: skip
    """A listed database that does not exist: the others are backed up, the run exits 1 in one
    line naming it, and the alert is one message (the failure), not one per database."""
    missing = f"nosuch_{uuid.uuid4().hex[:6]}"
    extra = f"      {missing}: {{}}"
    inventory = _inventory(tmp_path, pg_cluster, second_cluster, fleet, extra_b=extra)
    env = _env(tmp_path, inventory, pg_cluster, second_cluster,
               BACKUP_NOTIFY_URLS=webhook_receiver.url("/fleet"))  # fmt: skip
    proc = run_cli("backup", "--all", env=env, cwd=tmp_path, timeout=300)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and line.startswith("error: 1 of the fleet's")
    assert missing in line and "does not exist" in line
    listed = catalog.list_backups(LocalStorage(tmp_path / "backups"))
    assert len([m for m in listed if m.kind == "dump"]) == 5
    time.sleep(0.5)
    hooks = [h for h in webhook_receiver.items() if h.path == "/fleet"]
    assert len(hooks) == 1, hooks
    assert missing in hooks[0].body["message"] and "backup failed" in hooks[0].body["title"]


def test_each_database_keeps_its_own_retention_and_inventory_shows_the_fleet(
    pg_cluster: PgCluster, second_cluster: PgCluster, fleet: dict[str, list[str]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """Two --all runs: the database with max_backups 1 keeps one backup, the others two.
    `pgkeeper inventory` lists every database within its RPO; the passwords show nowhere."""
    inventory = _inventory(tmp_path, pg_cluster, second_cluster, fleet)
    env = _env(tmp_path, inventory, pg_cluster, second_cluster)
    for _ in range(2):
        proc = run_cli("backup", "--all", env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr
    listed = catalog.list_backups(LocalStorage(tmp_path / "backups"))
    counts: dict[str, int] = {}
    for manifest in listed:
        counts[manifest.database] = counts.get(manifest.database, 0) + 1
    assert counts[fleet["a"][0]] == 1
    assert all(counts[name] == 2 for name in [*fleet["a"][1:], *fleet["b"]])
    shown = run_cli("inventory", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)["databases"]
    assert {r["database"] for r in rows} == {*fleet["a"], *fleet["b"]}
    assert all(r["withinRpo"] is True and r["newestVerified"] for r in rows)
    for secret in (pg_cluster.password, second_cluster.password):
        assert secret not in shown.stdout + shown.stderr + proc.stdout + proc.stderr
    one = run_cli("backup", "-d", fleet["b"][1], "--json", env=env, cwd=tmp_path)
    assert one.returncode == 0 and json.loads(one.stdout)["database"] == fleet["b"][1]
    wrong = one_line_error(run_cli("backup", "-d", "nope", env=env, cwd=tmp_path), 2)
    assert "not in the inventory" in wrong or "does not exist" in wrong
    assert stat.S_IMODE(os.stat(tmp_path / "backups").st_mode) == 0o700


def test_a_fleet_flow_run_gives_each_database_its_own_named_tagged_run(
    pg_cluster: PgCluster, second_cluster: PgCluster, fleet: dict[str, list[str]],
    tmp_path: Path, prefect_server: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The backup flow over the inventory: a backup-server run per server, in it a task run
    per database named after it and tagged db:/server:, the global concurrency limits created,
    every database backed up, and the fleet-inventory artifact listing them all."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId

    from flows.backup import backup
    from tasks.fleet import FLEET_LIMIT, server_limit
    from tests.support.flows import artifact_data

    inventory = _inventory(tmp_path, pg_cluster, second_cluster, fleet)
    for name, value in {
        "BACKUP_INVENTORY": str(inventory), "BACKUP_DIR": str(tmp_path / "backups"),
        "FLEET_PW_A": pg_cluster.password, "FLEET_PW_B": second_cluster.password,
        "BACKUP_COMPRESSION_THREADS": "1", "BACKUP_SERVER_CONCURRENCY": "1",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    state = backup(return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == 5
    listed = catalog.list_backups(LocalStorage(tmp_path / "backups"))
    assert len([m for m in listed if m.kind == "dump"]) == 5
    assert all((m.verified and m.trigger.startswith("fleet")) or m.trigger == "prefect"
               for m in listed)  # fmt: skip
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=False)
            )
        )
        ours = {f"{n}@{pg_cluster.host}:{pg_cluster.port}" for n in fleet["a"]}
        ours |= {f"{n}@{second_cluster.host}:{second_cluster.port}" for n in fleet["b"]}
        mine = [r for r in children if set(r.parameters.get("databases") or []) & ours]
        servers = {r.parameters["server"] for r in mine}
        assert servers == {f"{pg_cluster.host}:{pg_cluster.port}",
                           f"{second_cluster.host}:{second_cluster.port}"}  # fmt: skip
        task_names = set()
        for run in mine:
            for task_run in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [run.id]})
            ):
                if task_run.name.startswith("backup globals of "):
                    assert "db:*" in task_run.tags  # the server's roles: their own task run
                    task_names.add(task_run.name)
                elif task_run.name.startswith("backup "):
                    task_names.add(task_run.name)
                    database = task_run.name.split()[1].split("@")[0]
                    assert {"pgkeeper", f"db:{database}"} <= set(task_run.tags)
                    assert any(t.startswith("server:") for t in task_run.tags)
        limits = {limit.name for limit in client.read_global_concurrency_limits(limit=100)}
    expected = {f"backup {n}@{pg_cluster.host}:{pg_cluster.port}" for n in fleet["a"]}
    expected |= {f"backup {n}@{second_cluster.host}:{second_cluster.port}" for n in fleet["b"]}
    expected.add(f"backup globals of {second_cluster.host}:{second_cluster.port}")
    assert expected <= task_names
    assert {FLEET_LIMIT, server_limit(f"{pg_cluster.host}:{pg_cluster.port}")} <= limits
    rows = artifact_data(state)["fleet-inventory"]
    assert {r["database"] for r in rows} == {*fleet["a"], *fleet["b"]}
    assert all(r["within RPO"] == "yes" for r in rows)


def test_the_api_names_databases_and_lists_the_fleet(
    pg_cluster: PgCluster, second_cluster: PgCluster, fleet: dict[str, list[str]],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """POST /api/backups {"database": NAME} backs up that database of the inventory (its own
    URL); GET /api/backups?database=NAME lists its backups only; GET /api/databases has a row
    per database with its RPO state, and no password anywhere."""
    from pgkeeper.api import PrefectLink, create_app
    from tests.support.api import AUTH, TestClient, settings_for

    inventory = _inventory(tmp_path, pg_cluster, second_cluster, fleet)
    monkeypatch.setenv("FLEET_PW_A", pg_cluster.password)
    monkeypatch.setenv("FLEET_PW_B", second_cluster.password)
    settings = settings_for(None, tmp_path / "backups", backup_inventory=str(inventory))
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    target = fleet["b"][1]
    with TestClient(app, base_url="http://127.0.0.1") as client:
        made = client.post("/api/backups", json={"database": target}, headers=AUTH)
        assert made.status_code == 200, made.text
        assert made.json()["backup"]["database"] == target
        other = client.post("/api/backups", json={"database": fleet["a"][1]}, headers=AUTH)
        assert other.status_code == 200, other.text
        listed = client.get(f"/api/backups?database={target}", headers=AUTH).json()
        assert [b["database"] for b in listed["backups"]] == [target]
        rows = client.get("/api/databases", headers=AUTH).json()
        unknown = client.post("/api/backups", json={"database": "nope"}, headers=AUTH)
    by_name = {r["database"]: r for r in rows["databases"]}
    assert set(by_name) == {*fleet["a"], *fleet["b"]}
    assert by_name[target]["withinRpo"] is True and by_name[target]["newestVerified"]
    assert by_name[fleet["a"][0]]["withinRpo"] is False  # never backed up: outside its RPO
    assert rows["outsideRpo"] == len(by_name) - 2
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]
    for secret in (pg_cluster.password, second_cluster.password):
        assert secret not in json.dumps(rows) + made.text


def test_monitor_checks_every_database_of_the_fleet_by_its_own_schedule(
    pg_cluster: PgCluster, second_cluster: PgCluster, fleet: dict[str, list[str]],
    tmp_path: Path,
) -> None:  # fmt: skip
    """After one database was backed up: `pgkeeper monitor` has a report per fleet database;
    the never backed-up ones fail their freshness check, the backed-up one passes, and the
    exit code says something failed."""
    inventory = _inventory(tmp_path, pg_cluster, second_cluster, fleet)
    env = _env(tmp_path, inventory, pg_cluster, second_cluster, BACKUP_MAX_AGE="2h")
    assert run_cli("backup", "-d", fleet["b"][1], env=env, cwd=tmp_path).returncode == 0
    proc = run_cli("monitor", "--json", env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    reports = {r["subject"]: r for r in json.loads(proc.stdout)["reports"]}
    subjects = {f"{n} on {pg_cluster.host}:{pg_cluster.port}" for n in fleet["a"]}
    subjects |= {f"{n} on {second_cluster.host}:{second_cluster.port}" for n in fleet["b"]}
    assert subjects <= set(reports)

    def freshness(subject: str) -> str:
        return next(c["status"] for c in reports[subject]["checks"] if c["check"] == "freshness")

    good = f"{fleet['b'][1]} on {second_cluster.host}:{second_cluster.port}"
    assert freshness(good) == "ok"
    assert all(freshness(s) == "failed" for s in subjects - {good})
