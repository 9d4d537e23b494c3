"""Flow ``backup-server``: one server's share of a fleet backup run, one task run per database.

A fleet run (flow ``backup`` over more than one database) starts one of these per server, on
whatever worker picks it up; it holds the server's Prefect concurrency slot (one share of a
server at a time) and BACKUP_SERVER_CONCURRENCY slots of the fleet's, so the limits hold across
workers. Each database is a task run of its own (named after it, tagged ``db:`` and
``server:``, retried on transient errors, told as its own alert), at most
BACKUP_SERVER_CONCURRENCY at once. Then the server's targets rotate once and every outcome is
told in one evaluation.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any, Literal

from prefect import flow
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pgkeeper.settings import load_settings
from tasks.fleet import (
    FLEET_LIMIT,
    backup_in_fleet,
    ensure_limits,
    finish_server,
    globals_in_fleet,
    outcome_of,
    server_limit,
)

TIMEOUT_SECONDS = 6 * 3600
# The slots are leased: Prefect renews the lease every 3/4 of it while the run lives, and a
# run whose process died (its worker's machine lost) keeps them until the lease expires.
# Prefect's default, 300 s, held the next fleet run's share of that server back ~3 min in the
# scale-out test; its floor, 60 s, frees them before the dead run is even marked Crashed
# (three missed heartbeats), for one renewal request per 45 s per server run.
BACKUP_SLOT_LEASE = 60


def _tell(finished: queue.SimpleQueue[str], key: str) -> Callable[[PrefectFuture[Any]], None]:
    """A task run's done callback: put its database in ``finished``. (Not a poll of each
    future's ``state``: that reads the task run from the API at each call, and polling it every
    20 ms kept the Prefect server busy answering while it had task runs to record.)"""
    return lambda _future: finished.put(key)


@flow(
    name="backup-server",
    timeout_seconds=TIMEOUT_SECONDS,
    # Enough threads to keep every allowed slot busy; the concurrency limits do the limiting.
    task_runner=ThreadPoolTaskRunner(max_workers=16),
)
def backup_server(
    server: str = Field(description="host:port of the server."),
    databases: list[str] = Field(description="The databases to back up (name@host:port)."),
    trigger: str = Field(default="fleet", description="What started the fleet run."),
    verify: Literal["full", "quick", "off"] | None = Field(
        default=None, description="Verification (default: each database's BACKUP_VERIFY)."
    ),
    upload: bool = Field(default=True, description="Copy each backup offsite."),
    rotate: bool = Field(default=True, description="Apply retention afterwards."),
    globals: bool = Field(
        default=False, description="Also back up the server's globals (roles, tablespaces)."
    ),
) -> int:
    """Back up a server's databases of a fleet run: a task run per database, then rotate and
    tell once."""
    settings = load_settings()
    ensure_limits(settings, [server])  # 0. the concurrency limits exist
    lanes = min(settings.backup_server_concurrency, settings.backup_fleet_concurrency)
    limits = concurrency(  # one share of this server at a time
        server_limit(server), occupy=1, strict=True, lease_duration=BACKUP_SLOT_LEASE
    )
    fleet_slots = concurrency(  # its dumps, of the fleet's
        FLEET_LIMIT, occupy=lanes, strict=True, lease_duration=BACKUP_SLOT_LEASE
    )
    with limits, fleet_slots:
        # 1. one task run per database, at most `lanes` (BACKUP_SERVER_CONCURRENCY) at once;
        # each tells `finished` when it ends (see _tell)
        pending, running, futures = list(databases), 0, {}
        finished: queue.SimpleQueue[str] = queue.SimpleQueue()
        while pending or running:
            while pending and running < lanes:
                key = pending.pop(0)
                futures[key] = backup_in_fleet.with_options(
                    task_run_name=f"backup {key}",
                    tags=["pgkeeper", f"db:{key.partition('@')[0]}", f"server:{server}"],
                ).submit(key, trigger, verify, upload)
                futures[key].add_done_callback(_tell(finished, key))
                running += 1
            finished.get()
            running -= 1
        if globals:  # 2. the server's roles etc., after its databases
            key = f"*@{server}"
            futures[key] = globals_in_fleet.with_options(
                task_run_name=f"backup globals of {server}",
                tags=["pgkeeper", "db:*", f"server:{server}"],
            ).submit(server, trigger)
            futures[key].wait()
    outcomes = [outcome_of(key, future) for key, future in futures.items()]
    return finish_server(outcomes, rotate)  # 3. rotate, tell once; fail if any failed
