"""Benchmark the fleet against a shell loop of pg_dump | zstd, measured in the same run.

Starts two throwaway PostgreSQL servers (the fleet) and a third one holding the database of a
real `prefect server start`, deploys pgkeeper on a process work pool (`prefect deploy --all`,
the README's "Way 2") with one `prefect worker`, and builds two sets of databases with the
realistic-entropy generator (bench/dataset.py; pgbench data compresses 100x): `--small`
databases of `--small-mb` (default 200 x 5 MB) and `--large` of `--large-mb` (20 x 100 MB),
half on each server (each set cloned from one built database: CREATE DATABASE ... TEMPLATE).

For each set, with the same concurrency everywhere (BACKUP_SERVER_CONCURRENCY=1 and the
default BACKUP_FLEET_CONCURRENCY=4: one dump at a time per server, the two servers at once):

  loop      per server, in parallel: for db; do pg_dump -Fc -Z0 $db | zstd -2 > file; done
            (pgkeeper's own format and compression level, so both do the same compression
            work; `pg_dump -Fc | zstd` would gzip inside pg_dump first, ~6x slower)
  --all     `pgkeeper backup --all --json` (no Prefect), default settings (full verification)
  fleet     a run of the `backup/backup-daily-pool` deployment, picked up by the worker: one
            backup-server flow run per server, one task run per database

Per database, in every case, from a pg_dump wrapper on PG_BIN_DIR that logs each dump's start
and end: the dump itself (the pg_dump process) and its cycle, from its dump's start to the
next dump's start on the same server, i.e. everything the database costs its lane (the last
database of each lane has no cycle). Overhead per database over the dump itself = cycle -
dump, median and p95 in ms; "over the loop" = the case's median cycle - the loop's. The --all
case's overhead is pgkeeper's own work (checksum, row counts, verification, manifest); the
fleet's adds Prefect's orchestration of a task run. The run's fixed cost (worker pick-up, flow
processes, planning, the fleet artifact) is the fleet's wall minus its lanes' span, split into
steps from the runs' timestamps in the Prefect API.

Prefect's database: rows and bytes per table before and after the small set's fleet run (the
growth per fleet run, per database), then (unless --no-retention) the server restarted with
Prefect's own vacuum (PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED=events,flow_runs, two days'
retention) and the runs and events made to look three days old, to show that it bounds the
run history.

    make bench-fleet                                      # the issue's sizes
    .venv/bin/python bench/bench_fleet.py --small 6 --large 2 --large-mb 5 --catalog 200
        --no-retention                                    # (one line) a smoke run, ~2 min

Catalog: a local target of N backups (copies of one real manifest): what a listing costs, which
every backup (its incomplete folders), every rotation and every fleet artifact pays, since the
databases of a target share its listing. Inventory: an inventory file of N databases with 7
backups each: what reading it and computing every database's row (the fleet-inventory
artifact, `pgkeeper inventory`, the monitor) costs.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.servers, tests.support and bench, however this started
    sys.path.insert(0, str(ROOT))

from bench import dataset  # noqa: E402 - needs the sys.path line above
from bench.bench_backup import (  # noqa: E402
    CLK_TCK,
    ServerCpu,
    _proc_stat,
    machine_busy_seconds,
    wait_for_idle,
)
from tests.servers.postgres import PgCluster  # noqa: E402
from tests.servers.prefect import PrefectServer  # noqa: E402
from tests.support.pool import Api, Worker, deploy, descendants, wait_for  # noqa: E402

PGKEEPER = Path(sys.executable).with_name("pgkeeper")
MIB = 1024 * 1024
ZSTD_LEVEL = 2  # pgkeeper's default (pgkeeper.pipeline.DEFAULT_LEVEL)
TARGET_OVERHEAD_MS = 250.0  # median orchestration overhead per database, small set
TARGET_LARGE_RATIO = 1.2  # fleet wall / loop wall, large set
VACUUM = {
    "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
    "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(2 * 86400),
    "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": "5",
    "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": "P2D",
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the estate ------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The two servers, the database sets, the Prefect side and where things go."""

    servers: list[PgCluster]
    prefect_db: PgCluster
    work: Path
    sets: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # set -> server -> dbs
    sizes: dict[str, int] = field(default_factory=dict)  # set -> bytes of one database
    prefect: PrefectServer | None = None
    api: Api | None = None
    worker: Worker | None = None
    profile: Path | None = None  # py-spy's collapsed stacks of the fleet runs go here

    @property
    def inventory(self) -> Path:
        return self.work / "inventory.yaml"

    def close(self) -> None:
        """Stop the worker (and its flow processes) and the Prefect server."""
        if self.worker is not None:
            self.worker.stop()
        if self.api is not None:
            self.api.close()
        if self.prefect is not None:
            self.prefect.stop()

    @property
    def bindir(self) -> Path:
        return self.work / "bin"

    @property
    def dumps_log(self) -> Path:
        return self.work / "dumps.log"

    def timed_pg_dump(self) -> None:
        """PG_BIN_DIR for every case: a pg_dump that logs when it starts and ends, against
        which server and database (two `date` forks: ~2 ms), then the real tools."""
        real = self.servers[0].bindir
        self.bindir.mkdir()
        (self.bindir / "pg_dump").write_text(
            "#!/bin/sh\n"
            f'if [ "$1" = "--version" ]; then exec {real}/pg_dump --version; fi\n'
            f'echo "start $PGHOST:$PGPORT $PGDATABASE $(date +%s.%N)" >> {self.dumps_log}\n'
            f'{real}/pg_dump "$@"; code=$?\n'
            f'echo "end $PGHOST:$PGPORT $PGDATABASE $(date +%s.%N)" >> {self.dumps_log}\n'
            "exit $code\n"
        )
        (self.bindir / "pg_dump").chmod(0o755)
        for tool in ("pg_restore", "psql", "pg_dumpall"):
            (self.bindir / tool).symlink_to(real / tool)

    def dumps(self, since: float) -> dict[str, list[tuple[str, float, float]]]:
        """server -> [(database, start, end)] of the dumps that started after ``since``."""
        starts: dict[tuple[str, str], float] = {}
        lanes: dict[str, list[tuple[str, float, float]]] = {}
        for line in self.dumps_log.read_text().splitlines():
            kind, server, database, at = line.split()
            if float(at) < since:
                continue
            if kind == "start":
                starts[server, database] = float(at)
            elif (server, database) in starts:
                start = starts.pop((server, database))
                lanes.setdefault(server, []).append((database, start, float(at)))
        for lane in lanes.values():
            lane.sort(key=lambda d: d[1])
        return lanes

    def use(self, prefix: str) -> None:
        """Point the inventory (read again by every run) at one set of databases."""
        self.inventory.write_text(
            "servers:\n"
            + "".join(
                f'  - url: "{c.url("*", password="")}"\n'
                f"    password_env: BENCH_PW_{i}\n"
                "    globals: false\n"
                f'    include: ["{prefix}[0-9]*"]\n'
                for i, c in enumerate(self.servers)
            )
        )

    def env(self, backup_dir: Path) -> dict[str, str]:
        """pgkeeper's settings (the worker's and the CLI's): defaults but the concurrency."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PG", "BACKUP_", "DATABASE_URL"))}  # fmt: skip
        env.update({
            "BACKUP_INVENTORY": str(self.inventory),
            "BACKUP_DIR": str(backup_dir),
            "BACKUP_SERVER_CONCURRENCY": "1",
            "PG_BIN_DIR": str(self.bindir),
            **{f"BENCH_PW_{i}": c.password for i, c in enumerate(self.servers)},
        })  # fmt: skip
        if self.prefect is not None:
            env["PREFECT_API_URL"] = self.prefect.api_url
        return env


def _data_bytes(cluster: PgCluster, dbname: str) -> int:
    """The bytes of the dataset's tables, indexes and TOAST (not PostgreSQL's own catalogs,
    ~7 MiB in every database, which pg_dump does not read as data)."""
    rows = cluster.query(
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind = 'r'", [dataset.SCHEMA], dbname=dbname,
    )  # fmt: skip
    return int(rows[0][0])


def _build(cluster: PgCluster, dbname: str, size_mb: float) -> int:
    """The dataset at about ``size_mb`` MiB of data in ``dbname``; its data bytes. The
    generator's first batches already hold ~11 MiB, so a smaller size keeps a seeded random
    share of each table's rows (the same entropy, fewer rows)."""
    dataset.build(cluster.url(dbname), size_mb / 1024, log=lambda _m: None)
    built, target = _data_bytes(cluster, dbname), size_mb * MIB
    if built > 1.1 * target:
        vocab = cluster.query(f"SELECT pg_total_relation_size('{dataset.SCHEMA}.vocab')",
                              dbname=dbname)[0][0]  # fmt: skip
        share = max(0.01, (target - vocab) / (built - vocab))
        with cluster.connect(dbname) as conn:
            conn.execute("SELECT setseed(0.5)")
            for table in dataset.TABLES:
                name = f"{dataset.SCHEMA}.{table.name}"
                # Names from the dataset's constants, a number: no input reaches this SQL.
                conn.execute(f"DELETE FROM {name} WHERE random() > {share}".encode())  # noqa: S608
                conn.execute(f"VACUUM (FULL, FREEZE, ANALYZE) {name}".encode())
    return _data_bytes(cluster, dbname)


def build_set(fleet: Fleet, prefix: str, count: int, size_mb: float) -> None:
    """``count`` databases of about ``size_mb`` MiB of data, named ``<prefix>NNN``, half on
    each server, cloned from one built database per server."""
    per_server = {}
    for index, cluster in enumerate(fleet.servers):
        template = f"tmpl_{prefix}"
        cluster.drop_database(template)
        cluster.create_database(template)
        fleet.sizes[prefix] = _build(cluster, template, size_mb)
        names = [f"{prefix}{i:03d}" for i in range(index, count, len(fleet.servers))]
        for name in names:
            cluster.drop_database(name)
            cluster.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
        per_server[f"{cluster.host}:{cluster.port}"] = names
    fleet.sets[prefix] = per_server
    _log(f"set {prefix}: {count} databases of {fleet.sizes[prefix] / MIB:.1f} MiB of data")


def start_prefect(fleet: Fleet, settings: dict[str, str] | None = None) -> None:
    url = fleet.prefect_db.url("prefect").replace("postgresql://", "postgresql+asyncpg://")
    fleet.prefect = PrefectServer(fleet.work / "prefect-server", url, settings).start()
    fleet.api = Api(fleet.prefect.api_url)


# --- the cases --------------------------------------------------------------------------------


@dataclass
class Case:
    """One measured run: its wall, and per database (db@server) the dump's own time (the
    pg_dump process, from the timing wrapper) and its cycle: from its dump's start to the
    next dump's start on the same server, i.e. everything the database costs its lane."""

    wall: float
    dump: dict[str, float] = field(default_factory=dict)
    cycle: dict[str, float] = field(default_factory=dict)
    cpu_other: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def overhead(self) -> dict[str, float]:
        """Per database: its cycle beyond its dump (the last of each lane has no cycle)."""
        return {k: self.cycle[k] - self.dump[k] for k in self.cycle}


def _tree_cpu(pid: int | None) -> float:
    """CPU seconds of a process and every process below it, what they reaped included."""
    if pid is None:
        return 0.0
    ticks = 0
    for each in [pid, *descendants(pid)]:
        stat = _proc_stat(each)
        if stat is not None:
            ticks += sum(int(x) for x in stat[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


def cpu_parts(fleet: Fleet) -> dict[str, float]:
    """CPU seconds used so far, by part: the fleet's PostgreSQL servers; Prefect (its server,
    its database's PostgreSQL); the worker and its flow processes (pgkeeper's dumps inside
    them); and the rest of this benchmark's processes (the loop, `pgkeeper backup --all`)."""
    worker = fleet.worker.proc.pid if fleet.worker and fleet.worker.proc else None
    server = fleet.prefect.pid if fleet.prefect else None
    everything = _tree_cpu(os.getpid())
    flows, prefect = _tree_cpu(worker), _tree_cpu(server)
    return {
        "postgres": sum(ServerCpu(c.data_dir).seconds() for c in fleet.servers),
        "prefect server": prefect + ServerCpu(fleet.prefect_db.data_dir).seconds(),
        "worker and flows": flows,
        "loop or cli": everything - flows - prefect,
    }


def measure(fleet: Fleet, prefix: str, run: Any) -> Case:
    """Run one case (``run(fleet, prefix) -> wall, extra``) and read its dumps."""
    since = time.time()
    busy, before = machine_busy_seconds(), cpu_parts(fleet)
    wall, extra = run(fleet, prefix)
    after = cpu_parts(fleet)
    cpu = {part: round(after[part] - before[part], 2) for part in after}
    other = machine_busy_seconds() - busy - sum(cpu.values())
    case = Case(wall, cpu_other=max(0.0, other), extra={**extra, "cpu": cpu})
    for server, lane in fleet.dumps(since).items():
        for (database, start, end), following in itertools.zip_longest(lane, lane[1:]):
            key = f"{database}@{server}"
            case.dump[key] = end - start
            if following is not None:
                case.cycle[key] = following[1] - start
    return case


def pooled(runs: list[Case]) -> Case:
    """Several rounds of a case as one: the median wall, every round's databases."""
    middle = sorted(runs, key=lambda c: c.wall)[len(runs) // 2]
    case = Case(middle.wall, cpu_other=max(c.cpu_other for c in runs), extra=middle.extra)
    for index, run in enumerate(runs):
        case.dump.update({f"{k}#{index}": v for k, v in run.dump.items()})
        case.cycle.update({f"{k}#{index}": v for k, v in run.cycle.items()})
    return case


def run_loop(fleet: Fleet, prefix: str) -> tuple[float, dict[str, Any]]:
    """The shell loop, one per server, the servers at once."""
    out = fleet.work / "loop"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    script = (
        'for db in "$@"; do '
        f'PGDATABASE="$db" "$PG_BIN_DIR/pg_dump" --no-password -Fc -Z0 | zstd -q -{ZSTD_LEVEL} '
        f'> "{out}/$PGPORT-$db.dump.zst" || exit 1; done'
    )
    procs = []
    started = time.monotonic()
    for cluster in fleet.servers:
        names = fleet.sets[prefix][f"{cluster.host}:{cluster.port}"]
        env = {**fleet.env(out), **cluster.libpq_env()}
        procs.append((cluster, subprocess.Popen(["bash", "-c", script, "loop", *names], env=env)))
    for cluster, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"the loop failed on {cluster.port}")
    wall = time.monotonic() - started
    size = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    return wall, {"bytes": size}


def run_all(fleet: Fleet, prefix: str) -> tuple[float, dict[str, Any]]:
    """`pgkeeper backup --all --json`: no Prefect."""
    backups = fleet.work / "all-backups"
    shutil.rmtree(backups, ignore_errors=True)
    started = time.monotonic()
    proc = subprocess.run([str(PGKEEPER), "backup", "--all", "--json"], env=fleet.env(backups),
                          cwd=fleet.work, capture_output=True, text=True, timeout=3600)  # fmt: skip
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"pgkeeper backup --all failed: {proc.stderr[-2000:]}")
    outcomes = [o for o in json.loads(proc.stdout) if o["database"] != "*"]
    shutil.rmtree(backups, ignore_errors=True)
    return wall, {
        "bytes": sum(o["backup"]["size"] for o in outcomes if o.get("backup")),
        "backup_one_median_ms": 1000 * statistics.median(o["seconds"] for o in outcomes),
    }


class Spy(threading.Thread):
    """py-spy (pip install py-spy) on every flow process the worker starts: one file of
    collapsed stacks per process (idle time included: waiting is what orchestration costs)."""

    def __init__(self, folder: Path, worker: Worker) -> None:
        super().__init__(daemon=True)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.worker = folder, worker
        self.spies: dict[int, subprocess.Popen[bytes]] = {}
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        assert self.worker.proc is not None  # noqa: S101 - started
        while not self.done.wait(0.2):
            for pid in descendants(self.worker.proc.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if pid in self.spies or b"python" not in cmdline or b"supervisor" in cmdline:
                    continue
                self.spies[pid] = subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "--idle",
                     "--rate", "100", "--format", "raw", "--pid", str(pid),
                     "--output", str(self.folder / f"{pid}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip

    def stop(self) -> None:
        self.done.set()
        self.join()
        for spy in self.spies.values():
            if spy.poll() is None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(60)


def run_fleet(fleet: Fleet, prefix: str) -> tuple[float, dict[str, Any]]:
    """A run of the backup-daily-pool deployment, picked up by the worker; how Prefect saw
    it (task runs: the gap between two on a lane, their duration, the other tasks)."""
    api = fleet.api
    assert api is not None  # noqa: S101 - started
    spy = Spy(fleet.profile / prefix, fleet.worker) if fleet.profile and fleet.worker else None
    started = time.monotonic()
    run_id = api.start("backup/backup-daily-pool")
    run = api.wait(run_id, 7200)
    wall = time.monotonic() - started
    if spy is not None:
        spy.stop()
    if run["state"]["type"] != "COMPLETED":
        raise RuntimeError(f"the fleet run ended {run['state']['name']}: {run['state']['message']}")
    servers = api.children(run_id)
    tasks = api.task_runs([run_id, *[s["id"] for s in servers]])
    lanes: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        if task["name"].startswith("backup ") and task["flow_run_id"] != run_id:
            lanes.setdefault(task["flow_run_id"], []).append(task)
    gaps, durations, into, after = [], [], [], []
    first, last = [], []
    for server in servers:
        lane = sorted(lanes[server["id"]], key=lambda t: _stamp(t["start_time"]))
        first.append(_stamp(lane[0]["start_time"]))
        last.append(_stamp(lane[-1]["end_time"]))
        durations += [_stamp(t["end_time"]) - _stamp(t["start_time"]) for t in lane]
        gaps += [_stamp(t["start_time"]) - _stamp(b["end_time"])
                 for b, t in itertools.pairwise(lane)]  # fmt: skip
        ended = api.flow_run(server["id"])["end_time"]
        into.append(first[-1] - _stamp(server["start_time"]))
        after.append(_stamp(ended) - last[-1])
    span = max(last) - min(first)
    run = api.flow_run(run_id)
    servers_started = statistics.median(_stamp(s["start_time"]) for s in servers)
    servers_ended = max(_stamp(api.flow_run(s["id"])["end_time"]) for s in servers)
    # Where the fixed cost goes: from the run's creation to its process running, to the server
    # runs' processes running, to their first task, and after the last task to their end and
    # to the fleet run's end (fan_out waits, then publishes the fleet-inventory artifact).
    steps = {
        "fleet run picked up and started": _stamp(run["start_time"]) - _stamp(run["created"]),
        "server runs started": servers_started - _stamp(run["start_time"]),
        "server run to its first task": statistics.median(into),
        "its last task to its end": statistics.median(after),
        "server runs' end to fleet end": _stamp(run["end_time"]) - servers_ended,
    }
    others = {t["name"]: round(t.get("total_run_time") or 0.0, 2) for t in tasks
              if not t["name"].startswith("backup ")}  # fmt: skip
    return wall, {
        "run_id": run_id,
        "lanes_span": round(span, 2),
        "fixed": round(wall - span, 2),
        "server_runs": len(servers),
        "task_runs": len(tasks),
        "task_gap_median_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "task_median_ms": round(1000 * statistics.median(durations), 1),
        "other_tasks_s": others,
        "fixed_steps_s": {k: round(v, 2) for k, v in steps.items()},
    }


# --- Prefect's database -----------------------------------------------------------------------


def prefect_tables(fleet: Fleet) -> dict[str, dict[str, int]]:
    """Rows and bytes (with indexes and TOAST) of every table of Prefect's database."""
    found = {}
    tables = fleet.prefect_db.query(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", dbname="prefect"
    )
    for (table,) in tables:
        rows, size = fleet.prefect_db.query(
            f'SELECT count(*), pg_total_relation_size(\'public."{table}"\') FROM "{table}"',  # noqa: S608 - names from pg_tables
            dbname="prefect",
        )[0]
        found[table] = {"rows": int(rows), "bytes": int(size)}
    return found


def growth(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per table: rows and bytes a fleet run added (tables that grew)."""
    grew = {}
    for table, now in after.items():
        was = before.get(table, {"rows": 0, "bytes": 0})
        rows, size = now["rows"] - was["rows"], now["bytes"] - was["bytes"]
        if rows or size > 0:
            grew[table] = {"rows": rows, "bytes": size}
    return grew


def settle(fleet: Fleet, seconds: float = 15.0) -> None:
    """Wait for what arrives late (events and logs are sent in batches) to stop arriving."""
    previous = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = sum(t["rows"] for t in prefect_tables(fleet).values())
        if now == previous:
            return
        previous = now
        time.sleep(seconds)


def retention(fleet: Fleet) -> dict[str, Any]:
    """Prefect's own vacuum bounds the history: restarted with flow-run and event vacuum on
    (2 days), every run's end and every event moved 3 days back; rows before and after."""
    assert fleet.prefect is not None  # noqa: S101 - started
    if fleet.worker is not None:
        fleet.worker.stop()
    fleet.prefect.stop()
    before = prefect_tables(fleet)
    fleet.prefect_db.execute(
        "UPDATE flow_run SET end_time = end_time - interval '3 days' WHERE end_time IS NOT NULL;"
        "UPDATE events SET occurred = occurred - interval '3 days';"
        "UPDATE event_resources SET occurred = occurred - interval '3 days';",
        dbname="prefect",
    )
    start_prefect(fleet, VACUUM)
    started = time.monotonic()
    wait_for(lambda: prefect_tables(fleet)["flow_run"]["rows"] == 0, 300,
             "the vacuum deleting the old flow runs", every=5)  # fmt: skip
    settle(fleet, 10)
    after = prefect_tables(fleet)
    keep = ("flow_run", "task_run", "log", "artifact", "events", "event_resources",
            "flow_run_state", "task_run_state")  # fmt: skip
    return {
        "seconds": round(time.monotonic() - started, 1),
        "before": {t: before[t] for t in keep if t in before},
        "after": {t: after[t] for t in keep if t in after},
    }


# --- the catalog at scale ------------------------------------------------------------------------


def catalog_scale(work: Path, counts: list[int]) -> dict[str, Any]:
    """What listing a target costs as backups accumulate: every backup lists it once (its
    database's incomplete folders), every server run's rotation and every fleet run's
    inventory artifact read every manifest. A local target with ``count`` backups (copies of
    one real manifest under other ids, 1 KiB of data each): seconds for each of those reads."""
    from datetime import UTC, timedelta

    from pgkeeper import catalog, naming
    from pgkeeper.manifest import Manifest
    from pgkeeper.storage import LocalStorage

    source = next((work / "backups").glob("*/manifest.json"))
    template = Manifest.from_json(source.read_bytes())
    out: dict[str, Any] = {}
    for count in counts:
        root = work / f"catalog-{count}"
        start = datetime(2025, 1, 1, tzinfo=UTC)
        for index in range(count):
            when = start + timedelta(minutes=index)
            backup_id = naming.make_id("auto_backup", when)
            folder = root / backup_id
            folder.mkdir(parents=True)
            manifest = template.model_copy(update={"id": backup_id, "started_at": when,
                                                   "finished_at": when})  # fmt: skip
            (
                folder / naming.data_name(backup_id, manifest.format, manifest.compression)
            ).write_bytes(b"\0" * 1024)
            (folder / naming.MANIFEST).write_bytes(manifest.to_json())
        storage = LocalStorage(root)
        timings = {}
        for what, call in (
            ("list the target (each backup)", lambda s=storage: list(s.list())),
            ("clean_incomplete (each backup)",
             lambda s=storage: catalog.clean_incomplete(s, "nosuch", "h:1")),
            ("list_backups (each rotation, each artifact)",
             lambda s=storage: catalog.list_backups(s)),
        ):  # fmt: skip
            call()  # warm the page cache, as a busy target is
            mark = time.monotonic()
            call()
            timings[what] = round(time.monotonic() - mark, 3)
        out[str(count)] = timings
        shutil.rmtree(root, ignore_errors=True)
        _log(f"catalog of {count} backups: {timings}")
    return out


def inventory_scale(work: Path, counts: list[int], backups_each: int = 7) -> dict[str, Any]:
    """What the fleet inventory (the artifact after every fleet run, `pgkeeper inventory`,
    GET /api/databases, the monitor) costs as databases are added: an inventory file of
    ``count`` databases (read without asking a server) and ``backups_each`` listed manifests
    per database; seconds to read the inventory and to compute every database's row (newest
    verified backup, restore test, RPO from its own schedule), as tasks/fleet.py does."""
    from datetime import UTC, timedelta

    from deployments.schedules import backup_interval
    from pgkeeper import fleet as core_fleet
    from pgkeeper.inventory import load_inventory
    from pgkeeper.manifest import Manifest
    from pgkeeper.monitor import expectations
    from pgkeeper.settings import Settings, load_settings

    source = next((work / "backups").glob("*/manifest.json"))
    template = Manifest.from_json(source.read_bytes())
    server = "db.internal:5432"

    def max_age(own: Settings) -> timedelta | None:
        return expectations(own, None if own.backup_max_age else backup_interval(own)).max_age

    out: dict[str, Any] = {}
    for count in counts:
        path = work / f"inventory-{count}.yaml"
        path.write_text(
            f"servers:\n  - url: postgresql://backup@{server}/*\n    databases:\n"
            + "".join(f"      db{i:05d}: {{}}\n" for i in range(count))
        )
        settings = load_settings(_env_file=None, backup_inventory=path, backup_dir=str(work))
        start = datetime(2025, 1, 1, tzinfo=UTC)
        manifests = [
            template.model_copy(update={"id": f"x{i}-{j}", "database": f"db{i:05d}",
                                        "server": server,
                                        "started_at": start + timedelta(days=j)})
            for j in reversed(range(backups_each)) for i in range(count)
        ]  # fmt: skip
        mark = time.monotonic()
        inventory = load_inventory(settings, expand=False)
        read = time.monotonic() - mark
        mark = time.monotonic()
        rows = core_fleet.status(inventory, manifests, max_age)
        timings = {"read the inventory": round(read, 3),
                   "rows (newest backup, RPO)": round(time.monotonic() - mark, 3),
                   "databases": len(rows)}  # fmt: skip
        out[str(count)] = timings
        _log(f"inventory of {count} databases, {backups_each} backups each: {timings}")
    return out


# --- the report -------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    ms = [1000 * v for v in values] or [float("nan")]
    return {"median_ms": round(statistics.median(ms), 1), "p95_ms": round(_pct(ms, 0.95), 1)}


def per_db_report(by_name: dict[str, Case]) -> dict[str, Any]:
    """Per case: the dump itself, the cycle, and the overhead per database (ms)."""
    out: dict[str, Any] = {}
    for name, case in by_name.items():
        overhead = case.overhead()
        out[name] = {
            "dump": _stats(list(case.dump.values())),
            "cycle": _stats(list(case.cycle.values())),
            "overhead": _stats(list(overhead.values())),
            "databases": len(overhead),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="small databases (both servers)")
    parser.add_argument("--small-mb", type=float, default=5.0)
    parser.add_argument("--large", type=int, default=20, help="large databases (both servers)")
    parser.add_argument("--large-mb", type=float, default=100.0)
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every case (walls: median; per database: every round's values pooled)",
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each case, wait up to this long for other work to use less than a quarter "
        "of a CPU (on a shared machine other work distorts every ratio)",
    )
    parser.add_argument("--no-retention", action="store_true", help="skip the vacuum check")
    parser.add_argument(
        "--catalog",
        type=lambda text: [int(x) for x in text.split(",") if x.strip()],
        default=[1000, 10000, 30000],
        metavar="N,N",
        help="also time listing a target of N backups (each backup, rotation, artifact pays it)",
    )
    parser.add_argument(
        "--inventory",
        type=lambda text: [int(x) for x in text.split(",") if x.strip()],
        default=[1000, 3000, 10000],
        metavar="N,N",
        help="also time the fleet inventory's rows for N databases (7 backups each)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the worker's processes with py-spy during the fleet runs",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--output", default=str(ROOT / ".bench" / "fleet.json"))
    args = parser.parse_args(argv)

    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(out_path.parent / "bench.lock", "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"error: another benchmark holds {lock.name}; wait for it (timings would be "
              "distorted by both runs)", file=sys.stderr)  # fmt: skip
        return 2
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=out_path.parent))
    started = time.monotonic()
    result: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fleet: Fleet | None = None
    try:
        with PgCluster() as a, PgCluster() as b, PgCluster() as p:
            for cluster in (a, b):  # autovacuum would add noise to every timing
                cluster.execute("ALTER SYSTEM SET autovacuum = off")
                cluster.execute("SELECT pg_reload_conf()")
            p.create_database("prefect")
            fleet = Fleet([a, b], p, work, profile=Path(args.profile) if args.profile else None)
            fleet.timed_pg_dump()
            build_set(fleet, "s", args.small, args.small_mb)
            build_set(fleet, "l", args.large, args.large_mb)
            start_prefect(fleet)
            fleet.use("s")
            deploy(work / "deploy", fleet.env(work / "backups"))
            assert fleet.api is not None  # noqa: S101 - started
            fleet.worker = Worker.create("bench", work / "worker", fleet.env(work / "backups"))
            fleet.worker.start()
            wait_for(lambda: fleet.api.online_workers(), 120, "the worker online")  # type: ignore[union-attr]
            _log(f"set-up done in {time.monotonic() - started:.0f} s")

            cases: dict[str, dict[str, Case]] = {}
            prefect_growth: dict[str, Any] = {}
            kinds = (("loop", run_loop), ("--all", run_all), ("fleet", run_fleet))
            for prefix in ("s", "l"):
                fleet.use(prefix)
                count = sum(len(v) for v in fleet.sets[prefix].values())
                _log(f"set {prefix} ({count} databases): warm-up loop")
                run_loop(fleet, prefix)
                runs: dict[str, list[Case]] = {name: [] for name, _ in kinds}
                for round_no in range(args.repeat):
                    for name, run in kinds:
                        if args.wait_idle:
                            wait_for_idle(args.wait_idle)
                        growing = name == "fleet" and round_no == 0
                        if growing:
                            settle(fleet, 5)
                            before = prefect_tables(fleet)
                        case = measure(fleet, prefix, run)
                        runs[name].append(case)
                        _log(f"  {name:<6} {case.wall:7.1f} s")
                        if growing:
                            settle(fleet)
                            grown = growth(before, prefect_tables(fleet))
                            prefect_growth[prefix] = {"databases": count, "tables": grown}
                cases[prefix] = {name: pooled(found) for name, found in runs.items()}
            result["cases"] = {
                prefix: {name: {"wall": round(c.wall, 2), "cpu_other": round(c.cpu_other, 1),
                                **c.extra} for name, c in by_name.items()}
                for prefix, by_name in cases.items()
            }  # fmt: skip
            result["per_database"] = {
                prefix: per_db_report(by_name) for prefix, by_name in cases.items()
            }
            result["prefect_growth"] = prefect_growth
            if args.catalog:
                result["catalog"] = catalog_scale(work, args.catalog)
            if args.inventory:
                result["inventory"] = inventory_scale(work, args.inventory)
            if not args.no_retention:
                _log("retention: Prefect's vacuum over the runs made to look 3 days old")
                result["retention"] = retention(fleet)
            result["datasets"] = {
                prefix: {"databases": sum(len(v) for v in fleet.sets[prefix].values()),
                         "bytes_each": fleet.sizes[prefix]}
                for prefix in fleet.sets
            }  # fmt: skip
    finally:
        if fleet is not None:
            fleet.close()
        shutil.rmtree(work, ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    result["seconds"] = round(time.monotonic() - started, 1)
    checks = report(result)
    result["targets"] = checks
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nresults written to {out_path}")
    return 1 if args.strict and not all(c["pass"] for c in checks) else 0


def report(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Print the tables; return the targets with PASS/FAIL."""
    print()
    for prefix, label in (("s", "small"), ("l", "large")):
        data = result["datasets"][prefix]
        c = result["cases"][prefix]
        loop = c["loop"]["wall"]
        print(f"{label}: {data['databases']} databases of {data['bytes_each'] / MIB:.1f} MiB, "
              "2 servers, one dump at a time per server")  # fmt: skip
        for name in ("loop", "--all", "fleet"):
            wall = c[name]["wall"]
            if c[name]["cpu_other"] > 0.25 * wall:
                name += " *"  # other work on the machine used CPU meanwhile
            more = ""
            if name == "fleet":
                span = c[name]["lanes_span"]
                more = (f"   (lanes {span:.1f} s = {span / loop:.2f}x the loop; fixed per run "
                        f"{c[name]['fixed']:.1f} s)")  # fmt: skip
            print(f"  {name:<8}{wall:8.1f} s  {wall / loop:5.2f}x{more}")
        steps = c["fleet"]["fixed_steps_s"]
        print("  fleet's fixed cost: " + "; ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
        print("  CPU ms per database (the PostgreSQL servers; Prefect's server and database; "
              "the worker and flows; the loop or the CLI):")  # fmt: skip
        for name in ("loop", "--all", "fleet"):
            parts = c[name]["cpu"]
            shown = "  ".join(f"{v / data['databases'] * 1000:6.0f}" for v in parts.values())
            total = sum(parts.values()) / data["databases"] * 1000
            print(f"    {name:<8}{total:7.0f} = {shown}")
    for prefix, label in (("s", "small"), ("l", "large")):
        print(f"\nper database, {label} set (ms; cycle: from its dump's start to the next one's "
              "on its server; overhead: cycle - dump):")  # fmt: skip
        loop_cycle = result["per_database"][prefix]["loop"]["cycle"]["median_ms"]
        for name, row in result["per_database"][prefix].items():
            dump, cycle = row["dump"], row["cycle"]
            print(f"  {name:<8} dump {dump['median_ms']:7.1f} (p95 {dump['p95_ms']:7.1f})"
                  f"  cycle {cycle['median_ms']:7.1f} (p95 {cycle['p95_ms']:7.1f})"
                  f"  overhead {row['overhead']['median_ms']:7.1f} (p95 "
                  f"{row['overhead']['p95_ms']:7.1f})"
                  f"  over the loop {cycle['median_ms'] - loop_cycle:7.1f}")  # fmt: skip
    print("\nPrefect database growth per fleet run:")
    for grown in result["prefect_growth"].values():
        n = grown["databases"]
        total = sum(t["bytes"] for t in grown["tables"].values())
        print(f"  {n} databases: {total / MIB:.2f} MiB ({total / n / 1024:.1f} KiB per database)")
        for table, g in sorted(grown["tables"].items(), key=lambda kv: -kv[1]["bytes"]):
            print(f"    {table:<28} {g['rows']:>7} rows ({g['rows'] / n:5.1f}/db) "
                  f"{g['bytes'] / 1024:>9.0f} KiB")  # fmt: skip
    if result.get("catalog"):
        print("\nreading a local target of N backups (seconds):")
        for count, timings in result["catalog"].items():
            print(f"  {int(count):>7}: " + "; ".join(f"{k} {v}" for k, v in timings.items()))
    if result.get("inventory"):
        print("\nthe fleet inventory of N databases, 7 backups each (seconds):")
        for count, timings in result["inventory"].items():
            shown = {k: v for k, v in timings.items() if k != "databases"}
            print(f"  {int(count):>7}: " + "; ".join(f"{k} {v}" for k, v in shown.items()))
    if "retention" in result:
        r = result["retention"]
        print(f"\nretention (vacuum on, runs 3 days old), after {r['seconds']} s:")
        for table, rows in r["before"].items():
            print(f"  {table:<20} {rows['rows']:>7} -> {r['after'][table]['rows']:>7} rows")
    overhead = result["per_database"]["s"]["fleet"]["overhead"]["median_ms"]
    large = result["cases"]["l"]
    ratio = large["fleet"]["wall"] / large["loop"]["wall"]
    checks = [
        {"target": "small: median overhead per database (ms)", "value": overhead,
         "limit": TARGET_OVERHEAD_MS, "pass": overhead <= TARGET_OVERHEAD_MS},
        {"target": "large: fleet wall / loop wall", "value": round(ratio, 2),
         "limit": TARGET_LARGE_RATIO, "pass": ratio <= TARGET_LARGE_RATIO},
    ]  # fmt: skip
    print()
    for c in checks:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['target']:<44} {c['value']:>8} "
              f"(target {c['limit']})")  # fmt: skip
    return checks


if __name__ == "__main__":
    raise SystemExit(main())
