"""Alerts through a real Prefect server: `alerts install` twice creates nothing twice; a failing
backup flow run reaches the webhook through the installed automation (and not twice); the
proactive dead-man fires for a database whose verified-backup events stopped, with no pgkeeper
process alive (the server evaluates it)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from pgkeeper.alerts import AUTOMATION, database_resource
from pgkeeper.settings import load_settings
from tests.servers.receivers import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("inboxes")]


def _names() -> list[str]:
    from prefect.settings import PREFECT_API_URL

    from pgkeeper.prefect_api import PrefectLink

    link = PrefectLink(api_url=str(PREFECT_API_URL.value()), ui_url=None)
    return sorted(a["name"] for a in link.request("POST", "/automations/filter", {}))


@pytest.fixture
def installed(
    prefect_server: str, webhook_receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BACKUP_NOTIFY_URLS = the webhook receiver; the automations installed (dead-man: 15 s)."""
    from deployments.alerts import install

    monkeypatch.setenv("BACKUP_NOTIFY_URLS", webhook_receiver.url("/prefect"))
    monkeypatch.setenv("BACKUP_MAX_AGE", "15s")
    report = install(load_settings(_env_file=None))
    assert report.ok, report.problem


def _updated() -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    from pgkeeper.prefect_api import PrefectLink

    link = PrefectLink(api_url=str(PREFECT_API_URL.value()), ui_url=None)
    return {a["name"]: a["updated"] for a in link.request("POST", "/automations/filter", {})}


def test_installing_twice_creates_nothing_twice(
    installed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second install (as every start of serve does) leaves identical automations
    untouched, so the dead-man's per-database buckets survive a restart; a changed setting
    updates the one automation it changes, in place."""
    from deployments.alerts import install

    before, stamps = _names(), _updated()
    again = install(load_settings(_env_file=None))

    assert again.ok and _names() == before
    assert {"pgkeeper-alerts", "pgkeeper-dead-man", "pgkeeper-run-crashed"} <= set(before)
    assert all(line.endswith("unchanged") for line in again.lines if "automation" in line)
    assert _updated() == stamps
    monkeypatch.setenv("BACKUP_MAX_AGE", "20s")
    changed = install(load_settings(_env_file=None))
    assert "automation pgkeeper-dead-man: updated" in changed.lines
    assert "automation pgkeeper-alerts: unchanged" in changed.lines
    assert _names() == before


@pytest.mark.slow
def test_a_failing_backup_run_reaches_the_receiver_through_the_automation(
    installed: None, flow_env: Path, sample_db: str, webhook_receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A backup flow run failing (a wrong password) is told through the server's
    pgkeeper-alerts automation, once: the second failing run adds nothing."""
    from flows.backup import backup

    monkeypatch.setenv(
        "DATABASE_URL", sample_db.replace("@", "x@", 1).replace("postgres:", "postgres:wrong", 1)
    )

    state = backup(return_state=True)
    assert state.is_failed()
    hook = webhook_receiver.wait_for(lambda h: h.path == "/prefect", 30)
    assert "backup failed" in hook.body["title"] and "authentication failed" in hook.body["message"]
    assert "/runs/flow-run/" in hook.body["message"]

    assert backup(return_state=True).is_failed()
    time.sleep(3)  # give a wrong second delivery time to arrive
    assert len([h for h in webhook_receiver.items() if h.path == "/prefect"]) == 1


@pytest.mark.slow
def test_the_dead_man_fires_with_no_pgkeeper_process_alive(
    prefect_server_process: str, webhook_receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """On a real `prefect server start`: a database's last verified-backup event, then silence;
    the server itself tells that no verified backup arrived within BACKUP_MAX_AGE (15 s here),
    while this test only waits (no flow, no serve, no worker)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.alerts import install
    from pgkeeper.alerts import _event
    from pgkeeper.prefect_api import PrefectLink

    monkeypatch.setenv("BACKUP_NOTIFY_URLS", webhook_receiver.url("/deadman"))
    monkeypatch.setenv("BACKUP_MAX_AGE", "15s")
    with temporary_settings({PREFECT_API_URL: prefect_server_process}):
        report = install(load_settings(_env_file=None))
    assert report.ok, report.problem
    database = f"deadman_{uuid.uuid4().hex[:6]}"
    resource = database_resource(database, "db.example:5432")
    link = PrefectLink(api_url=prefect_server_process, ui_url=None)
    link.emit([_event("pgkeeper.backup.verified", resource, database, {})])

    started = time.monotonic()
    hook = webhook_receiver.wait_for(lambda h: database in (h.body or {}).get("title", ""), 120)
    waited = time.monotonic() - started

    assert "no verified backup for 15s" in hook.body["title"]
    assert f"{database}@db.example:5432" in hook.body["message"]
    assert waited >= 10  # not before the max age (the server's check runs every few seconds)
    assert AUTOMATION in {a["name"] for a in link.request("POST", "/automations/filter", {})}
