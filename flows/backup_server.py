"""Flow ``backup-server``: one server's share of a fleet backup run, one task run per database.

A fleet run (flow ``backup`` over more than one database) starts one of these per server, on
whatever worker picks it up; each database is a task run of its own (named after it, tagged
``db:`` and ``server:``, retried on transient errors, told as its own alert), inside the
server's and the fleet's Prefect concurrency limits. Then the server's targets rotate once and
every outcome is told in one evaluation.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field

from pgkeeper.settings import load_settings
from tasks.fleet import backup_in_fleet, ensure_limits, finish_server, outcome_of

TIMEOUT_SECONDS = 6 * 3600


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
) -> int:
    """Back up a server's databases of a fleet run: a task run per database, then rotate and
    tell once."""
    ensure_limits(load_settings(), [server])  # 0. the concurrency limits exist
    futures = {  # 1. one task run per database, within the limits
        key: backup_in_fleet.with_options(
            task_run_name=f"backup {key}", tags=["pgkeeper", f"db:{key.partition('@')[0]}",
                                                 f"server:{server}"],
        ).submit(key, trigger, verify, upload)
        for key in databases
    }  # fmt: skip
    for future in futures.values():
        future.wait()
    outcomes = [outcome_of(key, future.state) for key, future in futures.items()]
    return finish_server(outcomes, rotate)  # 2. rotate, tell once; fail if any failed
