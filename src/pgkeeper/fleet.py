"""Backing up the fleet: every enabled database of the inventory, and its servers' globals,
within the concurrency limits, as one run.

    backup_all ─ for each database, at most BACKUP_SERVER_CONCURRENCY per server and
               │ BACKUP_FLEET_CONCURRENCY in all:
               │     backup_one: dump -> verify -> upload   (pgkeeper.procedure's steps)
               ├ for each '*' server (or globals: true): its globals
               ├ rotate once per set of targets, each database by its own policy
               └ tell once: one evaluation, so 200 failures of one outage are one message

The same pieces serve every door: ``pgkeeper backup --all`` calls ``backup_all``; the Prefect
fan-out runs ``backup_one`` as one task run per database (retried, shown and told per
database) and ``finish`` once per server run. A database that fails does not stop the
others; the run fails at its end naming every one that failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain, zip_longest

from pgkeeper import alerts, procedure
from pgkeeper.backup import BackupOptions
from pgkeeper.errors import PgkeeperError, is_transient
from pgkeeper.inventory import Database, Inventory, Server
from pgkeeper.manifest import Manifest
from pgkeeper.retention import Policy
from pgkeeper.rotate import RotationReport, policies_from_settings, rotate
from pgkeeper.settings import Settings
from pgkeeper.storage import Storage, target_urls, targets
from pgkeeper.upload import UploadReport

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """One database's (or server's globals') part of a fleet run."""

    key: str  # database@host:port, or *@host:port for globals
    database: str
    server: str
    manifest: Manifest | None = None
    error: str | None = None
    upload: UploadReport | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and procedure.upload_problem(self.upload) is None


@dataclass
class FleetRun:
    """Every outcome of a fleet run, and how rotation went."""

    outcomes: list[Outcome] = field(default_factory=list)
    rotations: list[RotationReport] = field(default_factory=list)
    unreachable: dict[str, str] = field(default_factory=dict)  # '*' servers not listed

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def problems(self) -> list[str]:
        lines = []
        for outcome in self.failed:
            why = outcome.error or procedure.upload_problem(outcome.upload)
            lines.append(f"{outcome.key}: {why}")
        lines += [f"{server}: cannot list its databases: {why}"
                  for server, why in self.unreachable.items()]  # fmt: skip
        for report in self.rotations:
            problem = procedure.rotation_problem(report)
            if problem is not None:
                lines.append(problem)
        return lines

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        """Raise one line naming how many failed and the first reasons (exit 1)."""
        problems = self.problems
        if problems:
            shown = "; ".join(problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            done = len(self.outcomes) - len(self.failed)
            raise PgkeeperError(
                f"{len(problems)} of the fleet's backups or steps failed, {done} succeeded: "
                f"{shown}{more}"
            )


class Limits:
    """At most ``per_server`` dumps against one server and ``total`` in all, at once, in this
    process (the Prefect fan-out uses the server's global concurrency limits instead, which
    hold across workers)."""

    def __init__(self, per_server: int, total: int) -> None:
        self.per_server = per_server
        self._total = threading.BoundedSemaphore(total)
        self._servers: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, server: str) -> Iterator[None]:
        with self._lock:
            semaphore = self._servers.setdefault(
                server, threading.BoundedSemaphore(self.per_server)
            )
        with ExitStack() as stack:
            stack.enter_context(semaphore)
            stack.enter_context(self._total)
            yield


class Targets:
    """Storage targets opened once per distinct list of URLs (a database may override them)."""

    def __init__(self) -> None:
        self._opened: dict[tuple[str, ...], list[Storage]] = {}
        self._lock = threading.Lock()

    def of(self, settings: Settings) -> list[Storage]:
        key = tuple(target_urls(settings))
        with self._lock:
            if key not in self._opened:
                self._opened[key] = targets(settings)
            return self._opened[key]


# --- the parts ---------------------------------------------------------------------------------


def backup_one(
    database: Database,
    storages: list[Storage],
    *,
    trigger: str = "fleet",
    verify_level: str | None = None,
    upload: bool = True,
    flow_run_id: str | None = None,
    raise_transient: bool = False,
) -> Outcome:
    """Dump, verify and upload one database (no rotation, no alert: ``finish`` does those for
    the whole run). Never raises for the database's own failures: they are the outcome's
    ``error`` (``raise_transient``: a transient one is raised, for a task's retries)."""
    started = time.monotonic()
    outcome = Outcome(database.key, database.name, database.server)
    settings = database.settings
    try:
        options = BackupOptions(trigger=trigger, flow_run_id=flow_run_id)
        manifest = procedure.dump(settings, options, storages[0])
        manifest = procedure.verify(settings, manifest, storages[0], verify_level)
        outcome.manifest = manifest
        if upload:
            outcome.upload = procedure.upload(settings, manifest, storages)
    except PgkeeperError as exc:
        if raise_transient and is_transient(exc):
            raise
        outcome.error = exc.message
        log.warning("backup of %s failed: %s", database.key, exc.message)
    outcome.seconds = time.monotonic() - started
    return outcome


def backup_globals_of(
    server: Server, storages: list[Storage], *, trigger: str = "fleet",
    flow_run_id: str | None = None, raise_transient: bool = False,
) -> Outcome:  # fmt: skip
    """The server's globals (roles, memberships, role settings, tablespaces): dump, verify,
    upload, as ``backup_one`` does for a database."""
    from pgkeeper.server_globals import backup_globals  # lazy: only '*' servers need it

    started = time.monotonic()
    outcome = Outcome(f"*@{server.server}", "*", server.server)
    try:
        manifest = backup_globals(
            server.settings, server.url, storage=storages[0], trigger=trigger,
            flow_run_id=flow_run_id,
        )  # fmt: skip
        outcome.manifest = procedure.verify(server.settings, manifest, storages[0])
        outcome.upload = procedure.upload(server.settings, outcome.manifest, storages)
    except PgkeeperError as exc:
        if raise_transient and is_transient(exc):
            raise
        outcome.error = exc.message
        log.warning("globals backup of %s failed: %s", server.server, exc.message)
    outcome.seconds = time.monotonic() - started
    return outcome


def group_policy(
    inventory: Inventory, storages: Sequence[Storage]
) -> Callable[[str, str], Policy | None]:
    """``(target URL, database@server) -> policy`` for rotation: a fleet database's own rules
    (its overrides, then BACKUP_RETENTION_TARGETS for the target); None for a group the
    inventory does not cover (the target's policy then)."""
    cache: dict[str, dict[str, Policy] | None] = {}

    def lookup(url: str, group: str) -> Policy | None:
        if group not in cache:
            own = inventory.settings_for(group)
            cache[group] = None if own is None else policies_from_settings(own, storages)
        policies = cache[group]
        return None if policies is None else policies.get(url)

    return lookup


def finish(
    settings: Settings,
    inventory: Inventory,
    outcomes: Sequence[Outcome],
    storages: list[Storage],
    *,
    rotate_after: bool = True,
    link: str | None = None,
) -> RotationReport | None:
    """After the backups of a fleet run (or one server's share of it): rotate the targets once,
    each database by its own policy, and tell every outcome in one evaluation."""
    rotation = None
    if rotate_after:
        base = policies_from_settings(settings, storages)
        rotation = rotate(storages, base, group_policy=group_policy(inventory, storages))
    told = [alerts.RunOutcome(o.database, o.server, error=o.error, manifest=o.manifest)
            for o in outcomes]  # fmt: skip
    alerts.report_outcomes(settings, storages[0], "backup", told, link=link)
    for outcome in outcomes:
        if outcome.upload is not None:
            problem = procedure.upload_problem(outcome.upload)
            procedure.tell_step(
                settings, storages[0], outcome.database, outcome.server, "upload", problem
            )
    return rotation


# --- the whole run -------------------------------------------------------------------------------


def across_servers(databases: Sequence[Database]) -> list[Database]:
    """``databases`` in turns of their servers (a1 b1 a2 b2 a3 ...), each server's in its own
    order: a pool of threads taking them in this order keeps every server busy at once,
    where inventory order had every thread waiting on the first server's slot."""
    by_server: dict[str, list[Database]] = {}
    for database in databases:
        by_server.setdefault(database.server, []).append(database)
    turns = zip_longest(*by_server.values())
    return [database for database in chain.from_iterable(turns) if database is not None]


def backup_all(
    settings: Settings,
    inventory: Inventory,
    *,
    databases: Sequence[Database] | None = None,
    with_globals: bool = True,
    verify_level: str | None = None,
    upload: bool = True,
    rotate_after: bool = True,
    trigger: str = "fleet",
    on_done: Callable[[Outcome], None] | None = None,
) -> FleetRun:
    """Back up ``databases`` (default: every enabled one) and (``with_globals``) the globals of
    the inventory's '*' / ``globals: true`` servers within BACKUP_SERVER_CONCURRENCY /
    BACKUP_FLEET_CONCURRENCY, then rotate and tell once per set of targets. ``on_done`` sees
    each outcome as it finishes (for progress)."""
    chosen = list(databases) if databases is not None else inventory.enabled
    limits = Limits(settings.backup_server_concurrency, settings.backup_fleet_concurrency)
    opened = Targets()
    run = FleetRun(unreachable=dict(inventory.errors))

    def one(database: Database) -> Outcome:
        with limits.slot(database.server):
            outcome = backup_one(
                database, opened.of(database.settings), trigger=trigger,
                verify_level=verify_level, upload=upload,
            )  # fmt: skip
        if on_done is not None:
            on_done(outcome)
        return outcome

    def server_globals(server: Server) -> Outcome:
        with limits.slot(server.server):
            outcome = backup_globals_of(server, opened.of(server.settings), trigger=trigger)
        if on_done is not None:
            on_done(outcome)
        return outcome

    servers = inventory.servers if with_globals else []
    workers = max(1, min(settings.backup_fleet_concurrency, len(chosen) + len(servers)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pgkeeper-fleet") as pool:
        started = {id(d): pool.submit(one, d) for d in across_servers(chosen)}
        futures = [started[id(d)] for d in chosen]  # outcomes in the inventory's order
        futures += [pool.submit(server_globals, s) for s in servers]
        run.outcomes = [f.result() for f in futures]
    # Rotation and alerts once per set of targets (most fleets: one).
    by_targets: dict[tuple[str, ...], list[Outcome]] = {}
    settings_of = {d.key: d.settings for d in inventory.databases}
    settings_of |= {f"*@{s.server}": s.settings for s in inventory.servers}
    for outcome in run.outcomes:
        key = tuple(target_urls(settings_of.get(outcome.key, settings)))
        by_targets.setdefault(key, []).append(outcome)
    for outcomes in by_targets.values():
        own = settings_of.get(outcomes[0].key, settings)
        rotation = finish(own, inventory, outcomes, opened.of(own), rotate_after=rotate_after)
        if rotation is not None:
            run.rotations.append(rotation)
    return run


# --- the inventory's state ------------------------------------------------------------------------


@dataclass
class DatabaseStatus:
    """One row of ``pgkeeper inventory``, ``GET /api/databases`` and the fleet artifact."""

    database: str
    server: str
    schedule: str
    enabled: bool
    newest_verified: str | None = None
    verified_at: datetime | None = None
    size: int | None = None
    restore_test: str | None = None  # passed / FAILED
    restore_tested_at: datetime | None = None
    max_age: timedelta | None = None  # the RPO: BACKUP_MAX_AGE or the schedule's gap + 1 h
    backups: int = 0

    def within_rpo(self, now: datetime) -> bool | None:
        """True/False when an RPO applies (None: nothing is scheduled for it)."""
        if self.max_age is None or not self.enabled:
            return None
        return self.verified_at is not None and now - self.verified_at <= self.max_age

    def to_public(self, now: datetime) -> dict[str, object]:
        def stamp(when: datetime | None) -> str | None:
            return when.isoformat().replace("+00:00", "Z") if when else None

        return {
            "database": self.database,
            "server": self.server,
            "schedule": self.schedule,
            "enabled": self.enabled,
            "backups": self.backups,
            "newestVerified": self.newest_verified,
            "verifiedAt": stamp(self.verified_at),
            "size": self.size,
            "restoreTest": self.restore_test,
            "restoreTestedAt": stamp(self.restore_tested_at),
            "maxAgeSeconds": int(self.max_age.total_seconds()) if self.max_age else None,
            "withinRpo": self.within_rpo(now),
        }


def status(
    inventory: Inventory,
    manifests: Sequence[Manifest],
    max_age_of: Callable[[Settings], timedelta | None],
) -> list[DatabaseStatus]:
    """Every database of the inventory (disabled ones too) with its newest verified backup,
    its newest restore test and its RPO, from the listed ``manifests`` (newest first)."""
    rows = []
    for database in inventory.databases:
        mine = [m for m in manifests if m.database == database.name and m.server == database.server]
        row = DatabaseStatus(
            database.name, database.server, database.settings.backup_schedule,
            database.enabled, backups=len(mine), max_age=max_age_of(database.settings),
        )  # fmt: skip
        verified = next((m for m in mine if m.verified), None)
        if verified is not None:
            row.newest_verified, row.verified_at = verified.id, verified.started_at
            row.size = verified.size
        tests = [(t, m) for m in mine for t in m.restore_tests]
        if tests:
            test, _ = max(tests, key=lambda pair: pair[0].at)
            row.restore_test = "passed" if test.ok else "FAILED"
            row.restore_tested_at = test.at
        rows.append(row)
    return rows
