"""The fleet scaled out on Prefect's engine, for real on this machine: a Prefect server whose
database is a throwaway PostgreSQL, the deployments of `prefect deploy --all`, two process
workers (separate processes, separate working folders, the same settings) pulling from one
pool, and fleet runs over 32 databases on 2 servers.

It shows that every database is backed up exactly once per fleet run, that both workers take
runs, that no server ever has more dumps at once than BACKUP_SERVER_CONCURRENCY (measured on
the dumps themselves by a pg_dump wrapper), and that a worker SIGKILLed mid-run (with its flow
run and pg_dump: a machine lost) leaves a Crashed run (marked by the server's
pgkeeper-unresponsive-runs automation, from the missed heartbeats), no half-written backup
listed, and that the next fleet run covers the database it was writing (and removes what the
killed run left).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pgkeeper import catalog
from pgkeeper.storage import LocalStorage
from tests.servers.postgres import PgCluster
from tests.servers.prefect import PrefectServer
from tests.servers.receivers import WebhookReceiver
from tests.support.cli import cli_env, run_cli
from tests.support.pool import Api, Worker, deploy, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_SERVER = 16  # databases on each of the two servers: 32 in the fleet
SERVER_CONCURRENCY = 2  # BACKUP_SERVER_CONCURRENCY: dumps at once against one server
FLEET_CONCURRENCY = 4  # BACKUP_FLEET_CONCURRENCY
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum)
WORKER_LIMIT = 2  # each worker runs at most 2 flow runs: a fleet run + one server run


# --- the estate -----------------------------------------------------------------------------


@dataclass
class Estate:
    api: Api
    servers: list[PgCluster]
    databases: dict[str, list[str]]  # host:port -> database names
    backups: Path
    dumps_log: Path
    delay_file: Path
    workers: list[Worker]
    cli: dict[str, str]  # the environment for `pgkeeper` commands with the same settings
    home: Path
    hooks: WebhookReceiver

    @property
    def keys(self) -> set[str]:
        return {f"{n}@{s}" for s, names in self.databases.items() for n in names}


def _timed_pg_dump(folder: Path, real_bindir: Path, log: Path, delay: Path) -> Path:
    """A PG_BIN_DIR whose pg_dump logs when it ran, against which server and database, and
    first sleeps as long as ``delay`` says (so the test can widen the dumps)."""
    bindir = folder / "bin"
    bindir.mkdir()
    real = real_bindir / "pg_dump"
    (bindir / "pg_dump").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then exec {real} --version; fi\n'
        f'echo "start $PGHOST:$PGPORT $PGDATABASE $(date +%s.%N)" >> {log}\n'
        f"sleep $(cat {delay})\n"
        f'{real} "$@"; code=$?\n'
        f'echo "end $PGHOST:$PGPORT $PGDATABASE $(date +%s.%N)" >> {log}\n'
        "exit $code\n"
    )
    (bindir / "pg_dump").chmod(0o755)
    for tool in ("pg_restore", "psql", "pg_dumpall"):
        (bindir / tool).symlink_to(real_bindir / tool)
    return bindir


@pytest.fixture(scope="module")
def estate(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory,
    webhook_receiver: WebhookReceiver,
) -> Iterator[Estate]:  # fmt: skip
    """Two servers of 16 databases each, a Prefect server on PostgreSQL, the pool deployments,
    the alert automations, and two workers with separate folders and the same settings."""
    base = tmp_path_factory.mktemp("scale-out")
    timings: dict[str, float] = {}
    started = time.monotonic()
    with PgCluster() as second, PgCluster() as prefect_db:
        servers = [pg_cluster, second]
        tag = uuid.uuid4().hex[:6]
        databases: dict[str, list[str]] = {}
        for index, cluster in enumerate(servers):
            names = [f"so{index}_{tag}_{i:02d}" for i in range(PER_SERVER)]
            databases[f"{cluster.host}:{cluster.port}"] = names
            for name in names:
                cluster.create_database(name)
                cluster.execute(
                    "CREATE TABLE t (id int PRIMARY KEY, v text);"
                    "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g",
                    dbname=name,
                )
        timings["databases"] = time.monotonic() - started

        # The Prefect server, its database on a throwaway PostgreSQL.
        prefect_db.create_database("prefect")
        db_url = prefect_db.url("prefect").replace("postgresql://", "postgresql+asyncpg://")
        server = PrefectServer(home=base / "prefect-server", database_url=db_url)
        mark = time.monotonic()
        server.start()
        timings["prefect server"] = time.monotonic() - mark
        api = Api(server.api_url)
        workers: list[Worker] = []
        try:
            backups = base / "backups"  # the shared folder every worker writes to
            dumps_log = base / "dumps.log"
            delay = base / "dump-delay"
            delay.write_text("0.3\n")
            bindir = _timed_pg_dump(base, pg_cluster.bindir, dumps_log, delay)
            inventory = base / "inventory.yaml"
            inventory.write_text(
                "servers:\n"
                + "".join(
                    f'  - url: "{c.url("*", password="")}"\n'
                    f"    password_env: SCALE_PW_{i}\n"
                    "    globals: false\n"
                    f'    include: ["so{i}_{tag}_*"]\n'
                    for i, c in enumerate(servers)
                )
            )
            settings = {
                "BACKUP_INVENTORY": str(inventory),
                "BACKUP_SERVER_CONCURRENCY": str(SERVER_CONCURRENCY),
                "BACKUP_FLEET_CONCURRENCY": str(FLEET_CONCURRENCY),
                "BACKUP_COMPRESSION_THREADS": "1",
                "PG_BIN_DIR": str(bindir),
                "SCALE_PW_0": servers[0].password,
                "SCALE_PW_1": servers[1].password,
                "BACKUP_NOTIFY_URLS": webhook_receiver.url("/scale-out"),
                "PREFECT_API_URL": server.api_url,
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
            }
            cli = cli_env(None, backups, **settings)

            # Deployments, as the README's "Way 2" says: a process pool, prefect.yaml rendered
            # with these settings (no schedule active: runs start only when the test says),
            # `prefect deploy --all`, `pgkeeper alerts install`.
            mark = time.monotonic()
            deploy(base / "deploy", cli)
            installed = run_cli("alerts", "install", env=cli, cwd=base, timeout=120)
            assert installed.returncode == 0, installed.stdout + installed.stderr
            assert "automation pgkeeper-unresponsive-runs: created" in installed.stdout
            timings["deploy"] = time.monotonic() - mark

            for name in ("worker-a", "worker-b"):
                workers.append(Worker.create(name, base / name, cli, limit=WORKER_LIMIT))
            for worker in workers:
                worker.start()
            wait_for(lambda: len(api.online_workers()) == 2, 120, "two workers online")
            timings["setup"] = time.monotonic() - started
            print(f"\nscale-out set-up: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
            yield Estate(api, servers, databases, backups, dumps_log, delay, workers, cli,
                         base, webhook_receiver)  # fmt: skip
        finally:
            for worker in workers:
                worker.stop()
            api.close()
            server.stop()
            for cluster in servers[:1]:  # the session's cluster: the other one goes
                for name in databases.get(f"{cluster.host}:{cluster.port}", []):
                    cluster.drop_database(name)


# --- reading what happened ------------------------------------------------------------------


def _dumps(log: Path, since: float = 0.0) -> list[tuple[float, int, str, str]]:
    """(time, +1 start / -1 end, server, database) of every dump logged after ``since``."""
    events = []
    for line in log.read_text().splitlines():
        kind, server, database, at = line.split()
        if float(at) >= since:
            events.append((float(at), 1 if kind == "start" else -1, server, database))
    return sorted(events)


def _most_at_once(events: list[tuple[float, int, str, str]]) -> tuple[dict[str, int], int]:
    running: dict[str, int] = {}
    per_server: dict[str, int] = {}
    total = most = 0
    for _, delta, server, _db in events:
        running[server] = running.get(server, 0) + delta
        total += delta
        per_server[server] = max(per_server.get(server, 0), running[server])
        most = max(most, total)
    return per_server, most


def _manifests(estate: Estate) -> list[Any]:
    return [m for m in catalog.list_backups(LocalStorage(estate.backups)) if m.kind == "dump"]


# --- the tests ------------------------------------------------------------------------------


def test_a_fleet_run_spreads_over_both_workers_and_backs_up_every_database_once(
    estate: Estate,
) -> None:
    """`backup/backup-daily-pool` run by hand: one backup-server run per server, on both
    workers; each of the 32 databases has exactly one verified backup from it (one task run
    each, named and tagged after it), and no server ever had more than 2 dumps at once."""
    since = time.time()
    mark = time.monotonic()
    run_id = estate.api.start("backup/backup-daily-pool")
    run = estate.api.wait(run_id, 600)
    wall = time.monotonic() - mark
    assert run["state"]["type"] == "COMPLETED", run["state"]

    servers = estate.api.children(run_id)
    assert sorted(s["parameters"]["server"] for s in servers) == sorted(estate.databases)
    assert all(s["state"]["type"] == "COMPLETED" for s in servers)
    server_ids = [s["id"] for s in servers]

    # Every database exactly once, from this run's server runs, verified.
    made = _manifests(estate)
    assert sorted(f"{m.database}@{m.server}" for m in made) == sorted(estate.keys)
    assert {m.flow_run_id for m in made} == set(server_ids)
    assert all(m.verified for m in made)
    tasks = [t for t in estate.api.task_runs(server_ids) if t["name"].startswith("backup ")]
    assert sorted(t["name"] for t in tasks) == sorted(f"backup {k}" for k in estate.keys)
    assert all(t["state"]["type"] == "COMPLETED" for t in tasks)
    for task in tasks:
        key = task["name"].removeprefix("backup ")
        name, _, server = key.partition("@")
        assert {"pgkeeper", f"db:{name}", f"server:{server}"} <= set(task["tags"])

    # Both workers took runs: each took at most WORKER_LIMIT of the three.
    workers = estate.api.workers_of([run_id, *server_ids])
    assert set(workers) == {run_id, *server_ids}, workers
    assert set(workers.values()) == {"worker-a", "worker-b"}, workers

    # The limits held on the dumps themselves, and the server runs did overlap.
    per_server, most = _most_at_once(_dumps(estate.dumps_log, since))
    assert max(per_server.values()) <= SERVER_CONCURRENCY, per_server
    assert most <= FLEET_CONCURRENCY
    assert most > SERVER_CONCURRENCY, "the two servers' dumps never overlapped"
    print(f"\nfleet run over {len(estate.keys)} databases: {wall:.1f} s; workers {workers}; "
          f"most dumps at once per server {per_server}, in all {most}")  # fmt: skip


def test_a_worker_killed_mid_run_leaves_a_crashed_run_and_the_next_run_covers_its_database(
    estate: Estate,
) -> None:
    """A fleet run in which the worker running a server run dies (SIGKILL of the worker, its
    flow run and pg_dump: a lost machine) mid-dump: the server marks that run Crashed from its
    missed heartbeats, the database it was dumping has no backup listed from this run (its
    leftover folder has no manifest), the crash is told; the machine comes back and the next
    fleet run backs that database up and removes the leftover."""
    before = {m.id for m in _manifests(estate)}
    estate.delay_file.write_text("3\n")  # dumps long enough to be caught in the middle
    since = time.time()
    run_id = estate.api.start("backup/backup-daily-pool")

    def victim() -> Worker | None:
        # A worker in the middle of a dump of a server whose first dumps are done.
        done: dict[str, int] = {}
        for _at, kind, server, _db in _dumps(estate.dumps_log, since):
            done[server] = done.get(server, 0) + (kind == -1)
        for worker in estate.workers:
            if any(done.get(server, 0) >= 2 for server in worker.dumping()):
                return worker
        return None

    worker = wait_for(victim, 300, "a worker in the middle of a dump", every=0.2)
    assert isinstance(worker, Worker)
    killed_at = time.time()
    worker.kill_machine()
    estate.delay_file.write_text("0.3\n")

    # The runs the lost worker held end Crashed (their heartbeats stopped: no process of
    # theirs is left to say anything); the other worker's do not.
    servers = wait_for(lambda: len(runs := estate.api.children(run_id)) == 2 and runs,
                       60, "two server runs")  # fmt: skip
    runs = [run_id, *[s["id"] for s in servers]]
    owners = estate.api.workers_of(runs)
    lost = {r for r, name in owners.items() if name == worker.name}
    finals = {r: estate.api.wait(r, 6 * HEARTBEAT_SECONDS + 120)["state"] for r in runs}
    crashed_at = time.time()
    assert {r for r, state in finals.items() if state["type"] == "CRASHED"} == lost, finals
    assert all("no heartbeat" in (finals[r]["message"] or "") for r in lost)
    killed = {s["parameters"]["server"] for s in servers if s["id"] in lost}
    assert killed, (owners, finals)
    for server_run in servers:
        if server_run["id"] not in lost:
            assert finals[server_run["id"]]["type"] == "COMPLETED", finals
    if run_id not in lost:  # the fleet run outlived the kill: it fails naming the crash
        assert finals[run_id]["type"] == "FAILED" and "Crashed" in finals[run_id]["message"]
    events = _dumps(estate.dumps_log, since)
    started = {(s, d) for _, k, s, d in events if k == 1}
    ended = {(s, d) for _, k, s, d in events if k == -1}
    cut = started - ended  # the dumps the kill interrupted (every other one has ended)
    assert cut and {s for s, _ in cut} <= killed, (cut, killed)

    # Nothing half-written is listed: no backup of an interrupted dump from this run, though
    # its folder (no manifest) is still there; `pgkeeper list` shows none of it.
    now = {m.id: m for m in _manifests(estate)}
    fresh = [m for i, m in now.items() if i not in before]
    assert not {(m.server, m.database) for m in fresh} & cut
    leftovers = catalog.list_incomplete(LocalStorage(estate.backups))
    # Every interrupted dump left its folder; so may a backup whose dump had ended when the
    # worker died (killed while verifying or uploading, before its manifest): all on the
    # killed worker's server(s).
    left = {(i.server, i.database) for i in leftovers}
    assert cut <= left and {s for s, _ in left} <= killed, (left, cut, killed)
    listed = run_cli("list", "--json", env=estate.cli, cwd=estate.home)
    assert listed.returncode == 0, listed.stderr
    shown_ids = {b["id"] for b in json.loads(listed.stdout)["backups"]}
    assert not shown_ids & {i.backup_id for i in leftovers}

    # The crash was told (the server's pgkeeper-run-crashed automation).
    hook = estate.hooks.wait_for(lambda h: h.path == "/scale-out" and "crashed" in
                                 (h.body or {}).get("title", ""), 60)  # fmt: skip
    assert "backup-server" in hook.body["title"] or "backup" in hook.body["title"]

    # The machine comes back; the next fleet run covers the interrupted database(s).
    worker.start()
    mark, restarted = time.monotonic(), time.time()
    next_id = estate.api.start("backup/backup-daily-pool")
    final = estate.api.wait(next_id, 900)
    recovery = time.monotonic() - mark
    assert final["state"]["type"] == "COMPLETED", final["state"]
    # The dead run's concurrency slots did not hold the server back: they expire with their
    # lease (BACKUP_SLOT_LEASE in flows/backup_server.py), before the run is marked Crashed.
    first = min(at for at, _k, s, _d in _dumps(estate.dumps_log, restarted) if s in killed)
    held = first - restarted
    assert held < 60, f"the next run's first dump on {sorted(killed)} waited {held:.0f} s"
    newest = {(m.server, m.database) for m in _manifests(estate)
              if m.id not in now and m.verified}  # fmt: skip
    assert left <= newest
    assert newest == {tuple(k.split("@")[::-1]) for k in estate.keys}
    assert catalog.list_incomplete(LocalStorage(estate.backups)) == []
    print(f"\ncrash: runs {owners}, lost {sorted(lost)}")
    print(f"crash: killed {worker.name} at +{killed_at - since:.1f} s mid-dump of "
          f"{sorted(cut)}; Crashed {crashed_at - killed_at:.0f} s later; next fleet run "
          f"{recovery:.1f} s, its first dump there after {held:.1f} s")  # fmt: skip
