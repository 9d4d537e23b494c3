"""Tasks of the fleet's fan-out (``pgkeeper.fleet``): which databases a run covers, one task run
per database (named after it, tagged ``db:`` and ``server:``, retried on transient errors,
inside the server's and the fleet's Prefect concurrency limits), the rotation and alerts of a
server's share, and the fleet inventory artifact.

The concurrency limits are Prefect global concurrency limits, so they hold across every
worker and every overlapping run. A server's share of a fleet run (a ``backup-server`` run)
holds the one slot of ``pgkeeper-server-<host>-<port>`` (one share of a server at a time)
and as many slots of ``pgkeeper-fleet`` (BACKUP_FLEET_CONCURRENCY) as it runs dumps at once,
BACKUP_SERVER_CONCURRENCY, for its whole duration. Held per dump instead, every acquisition
after a release waited ~2 s here (the server's Retry-After on a slot still counted as taken):
over 200 databases that is minutes; per server run it is paid once. ``ensure_limits`` creates
or updates them (serve at start, each fleet run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from prefect import get_run_logger, runtime, task
from prefect.artifacts import create_table_artifact

from deployments.schedules import backup_interval, parse_backup_schedule
from pgkeeper import catalog, fleet
from pgkeeper.errors import PgkeeperError
from pgkeeper.inventory import Database, Inventory, load_inventory
from pgkeeper.manifest import utcnow
from pgkeeper.monitor import expectations
from pgkeeper.settings import Settings, load_settings
from pgkeeper.storage import targets
from tasks.progress import human_size
from tasks.retry import TRANSIENT_RETRIES

FLEET_LIMIT = "pgkeeper-fleet"


def server_limit(server: str) -> str:
    """The name of a server's concurrency limit (Prefect names: letters, digits, '-')."""
    return "pgkeeper-server-" + re.sub(r"[^A-Za-z0-9]+", "-", server).strip("-")


def ensure_limits(settings: Settings, servers: list[str]) -> None:
    """Create (or update) the fleet's and each server's global concurrency limit."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(
            FLEET_LIMIT, settings.backup_fleet_concurrency
        )
        for server in servers:
            client.upsert_global_concurrency_limit_by_name(server_limit(server), 1)


class FleetRunError(PgkeeperError):
    """Some databases of a fleet run failed (each was told as its own alert)."""


@dataclass
class FleetPlan:
    """What a backup run covers: one database (``fleet`` False: ``database`` names it, None
    for DATABASE_URL's), or databases per server (``fleet`` True)."""

    fleet: bool = False
    database: str | None = None
    servers: dict[str, list[str]] = field(default_factory=dict)  # server -> database keys
    globals: list[str] = field(default_factory=list)  # servers whose globals are backed up
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(keys) for keys in self.servers.values())


def _scheduled(database: Database, schedule: str) -> bool:
    """Does this database's BACKUP_SCHEDULE include the run's schedule (a preset or a cron)?"""
    presets, custom = parse_backup_schedule(database.settings.backup_schedule)
    return schedule in presets or schedule == custom


@task(name="fleet-plan", **TRANSIENT_RETRIES)
def plan_run(database: str | None, schedule: str | None) -> FleetPlan:
    """The databases this run backs up: the one named, else every enabled database whose
    schedule this run is (all of them when started by hand); a fleet of one is ``single``."""
    settings = load_settings()
    inventory = load_inventory(settings, expand=database is None)
    if database is not None:
        return FleetPlan(database=inventory.lookup(database).key)
    if inventory.source == "DATABASE_URL":
        return FleetPlan()  # a fleet of one: DATABASE_URL's database, exactly as before
    chosen = [d for d in inventory.enabled if schedule is None or _scheduled(d, schedule)]
    found = FleetPlan(fleet=True, unreachable=dict(inventory.errors))
    for db in chosen:
        found.servers.setdefault(db.server, []).append(db.key)
    found.globals = [s.server for s in inventory.servers if s.server in found.servers]
    get_run_logger().info(
        "%d databases on %d servers (%s)%s", found.size, len(found.servers), inventory.source,
        f", schedule {schedule}" if schedule else "",
    )  # fmt: skip
    return found


def _inventory() -> tuple[Settings, Inventory]:
    settings = load_settings()
    return settings, load_inventory(settings, expand=False)


@task(name="backup-database", **TRANSIENT_RETRIES)
def backup_in_fleet(key: str, trigger: str, verify: str | None, upload: bool) -> fleet.Outcome:
    """Dump, verify and upload one database of the fleet (its server run holds the limits)."""
    _, inventory = _inventory()
    database = inventory.lookup(key)
    storages = targets(database.settings)
    outcome = fleet.backup_one(
        database, storages, trigger=trigger, verify_level=verify, upload=upload,
        flow_run_id=runtime.flow_run.id, raise_transient=True,
    )  # fmt: skip
    logger = get_run_logger()
    if outcome.manifest is not None and outcome.ok:
        logger.info("backup %s of %s: %s in %.1fs", outcome.manifest.id, key,
                    human_size(outcome.manifest.size), outcome.seconds)  # fmt: skip
    else:
        logger.error("backup of %s failed: %s", key, outcome.error or "the upload failed")
    return outcome


@task(name="backup-globals", **TRANSIENT_RETRIES)
def globals_in_fleet(server: str, trigger: str) -> fleet.Outcome:
    """Back up, verify and upload a server's globals (its server run holds the limits)."""
    _, inventory = _inventory()
    found = next((s for s in inventory.servers if s.server == server), None)
    if found is None:
        return fleet.Outcome(f"*@{server}", "*", server, error="no longer in the inventory")
    outcome = fleet.backup_globals_of(
        found, targets(found.settings), trigger=trigger, flow_run_id=runtime.flow_run.id,
        raise_transient=True,
    )  # fmt: skip
    if outcome.error:
        get_run_logger().error("globals backup of %s failed: %s", server, outcome.error)
    return outcome


@task(name="server-verdict", **TRANSIENT_RETRIES)
def finish_server(outcomes: list[fleet.Outcome], rotate: bool) -> int:
    """Rotate the targets once for this server's databases (each by its own policy), tell
    every outcome in one evaluation (one grouped message), and fail the run naming the
    databases that failed; return how many were backed up."""
    settings, inventory = _inventory()
    run = fleet.FleetRun(outcomes=list(outcomes))
    databases = [o for o in outcomes if o.database != "*"]
    own = inventory.lookup(databases[0].key).settings if databases else settings
    rotation = fleet.finish(own, inventory, run.outcomes, targets(own), rotate_after=rotate)
    if rotation is not None:
        run.rotations.append(rotation)
    problems = run.problems
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise FleetRunError("; ".join(problems[:3]) + more)
    return len(run.outcomes)


def outcome_of(key: str, future: Any) -> fleet.Outcome:
    """A database task's Outcome from its finished future (its exception when it failed)."""
    result = future.result(raise_on_failure=False)
    if isinstance(result, fleet.Outcome):
        return result
    text = str(result).strip() if isinstance(result, BaseException) else ""
    name, _, server = key.partition("@")
    state = future.state
    reason = text.splitlines()[0] if text else (state.message or state.name or "failed")
    return fleet.Outcome(key, name, server, error=reason)


@task(name="fleet-inventory", **TRANSIENT_RETRIES)
def publish_fleet() -> int:
    """Publish every database of the inventory in one table: newest verified backup, its age,
    the newest restore test, and whether it is within its RPO (marked when not)."""
    settings = load_settings()
    inventory = load_inventory(settings)  # '*' servers asked again: the table shows them all
    manifests = [e.manifest for e in catalog.list_all(targets(settings))]

    def max_age(own: Settings) -> timedelta | None:
        interval = None if own.backup_max_age else backup_interval(own)
        return expectations(own, interval).max_age

    rows = fleet.status(inventory, manifests, max_age)
    now = utcnow()
    table = []
    outside = 0
    for row in rows:
        within = row.within_rpo(now)
        outside += within is False
        table.append({
            "database": row.database,
            "server": row.server,
            "schedule": row.schedule if row.enabled else "disabled",
            "newest verified": row.newest_verified or "none",
            "age": str(now - row.verified_at).split(".")[0] if row.verified_at else "-",
            "size": human_size(row.size) if row.size is not None else "-",
            "restore test": row.restore_test or "never",
            "within RPO": {True: "yes", False: "NO", None: "-"}[within],
        })  # fmt: skip
    create_table_artifact(
        key="fleet-inventory",
        table=table or [{"database": "(none)"}],
        description=f"{len(rows)} databases, {outside} outside their RPO ({inventory.source})",
    )
    return outside



# --- the fan-out --------------------------------------------------------------------------------

SERVER_FLOW = "backup-server"
POLL_SECONDS = 2.0


def _served_server_deployment() -> str | None:
    """``backup-server/<name>`` of a deployment something serves now (READY: a serve process
    or worker polled it), preferring the same way of running as this run (``-pool``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, FlowFilter, FlowFilterName

    mine = runtime.deployment.name or ""
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[SERVER_FLOW])),
            deployment_filter=DeploymentFilter(),
        )
    ready = [d for d in deployments if str(getattr(d, "status", "")).endswith("READY")]
    ready.sort(key=lambda d: (d.name.endswith("-pool") != mine.endswith("-pool"), d.name))
    return f"{SERVER_FLOW}/{ready[0].name}" if ready else None


def fan_out(covered: FleetPlan, trigger: str, verify: str | None, rotate: bool) -> int:
    """Run each server's share of the fleet as a ``backup-server`` flow run (on the workers
    or serve, when its deployment is served; else here, one after another), wait for all,
    publish the fleet inventory, and fail naming the servers whose share failed."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.backup_server import backup_server

    logger = get_run_logger()
    ensure_limits(load_settings(), list(covered.servers))
    deployment = _served_server_deployment()
    failures: list[str] = [f"{server}: cannot list its databases: {why}"
                           for server, why in covered.unreachable.items()]  # fmt: skip
    parameters = {"trigger": trigger, "verify": verify, "rotate": rotate}
    if deployment is not None:
        runs = {
            server: run_deployment(
                deployment,
                parameters={"server": server, "databases": keys,
                            "globals": server in covered.globals, **parameters},
                timeout=0, flow_run_name=f"backup {server}",
                tags=["pgkeeper", f"server:{server}"],
            )
            for server, keys in covered.servers.items()
        }  # fmt: skip
        logger.info("started %d server runs on %s", len(runs), deployment)
        pending = dict(runs)
        with get_client(sync_client=True) as client:
            while pending:
                time.sleep(POLL_SECONDS)
                for server, flow_run in list(pending.items()):
                    state = client.read_flow_run(flow_run.id).state
                    if state is not None and state.is_final():
                        del pending[server]
                        if not state.is_completed():
                            failures.append(f"{server}: {state.name}: {state.message or ''}")
    else:
        logger.info("no served %s deployment: backing up the servers here", SERVER_FLOW)
        for server, keys in covered.servers.items():
            state = backup_server(server=server, databases=keys, return_state=True,
                                  globals=server in covered.globals, **parameters)  # fmt: skip
            if not state.is_completed():
                failures.append(f"{server}: {state.message or state.name}")
    outside = publish_fleet()
    if failures:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise FleetRunError("fleet run failed for " + "; ".join(failures[:3]) + more)
    logger.info("%d databases backed up; %d outside their RPO", covered.size, outside)
    return covered.size
