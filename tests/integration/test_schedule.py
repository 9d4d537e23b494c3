"""Changing schedules at run time (the seed's updateConfig), against a real `prefect server start`
and real `pgkeeper serve` processes: a schedule set with `pgkeeper schedule set` (or
PUT /api/schedule) survives a restart of serve with the same environment, and the environment
wins again once its value changes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pgkeeper.api import create_app
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.settings import load_settings
from tests.support.api import AUTH, READ_AUTH, TestClient, assert_error, settings_for
from tests.support.cli import cli_env, one_line_error, run_cli
from tests.support.schedules import clear_pgkeeper, register_all, serve_once

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

@pytest.fixture
def link(prefect_server_process: str) -> Iterator[PrefectLink]:
    link = PrefectLink(api_url=prefect_server_process, ui_url=None, timeout=30)
    clear_pgkeeper(link)
    yield link
    clear_pgkeeper(link)


def schedules(link: PrefectLink, deployment: str) -> list[dict[str, Any]]:
    """[(cron, timezone, active)] of a deployment on the server."""
    found = link.request("GET", f"/deployments/name/{deployment}")
    assert isinstance(found, dict), deployment
    return [
        {"cron": s["schedule"]["cron"], "timezone": s["schedule"]["timezone"],
         "active": s["active"]}
        for s in found["schedules"]
    ]  # fmt: skip


def active_backups(link: PrefectLink) -> list[str]:
    names = ["hourly", "daily", "weekly", "monthly", "custom"]
    return [n for n in names if any(s["active"] for s in schedules(link, f"backup/backup-{n}"))]


@pytest.mark.slow
def test_a_schedule_set_at_run_time_survives_restarts_until_the_environment_changes(
    link: PrefectLink, tmp_path: Path
) -> None:
    """serve (daily); `schedule set hourly` and a verify cron in Berlin time; serve again with
    the same environment: both edits stay (and serve says so); serve with BACKUP_SCHEDULE
    changed to weekly: every backup deployment follows the environment, verify keeps its edit."""
    serve_once(link, tmp_path, BACKUP_SCHEDULE="daily")
    assert active_backups(link) == ["daily"]
    env = cli_env(None, tmp_path / "backups", PREFECT_API_URL=str(link.api_url))

    hourly = run_cli("schedule", "set", "hourly", env=env, cwd=tmp_path)
    assert hourly.returncode == 0, hourly.stderr
    assert "changed backup/backup-hourly" in hourly.stdout
    assert "changed backup/backup-daily" in hourly.stdout
    verify = run_cli("schedule", "set", "15 4 * * *", "--deployment", "verify",
                     "--timezone", "Europe/Berlin", env=env, cwd=tmp_path)  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert active_backups(link) == ["hourly"]
    berlin = [{"cron": "15 4 * * *", "timezone": "Europe/Berlin", "active": True}]
    assert schedules(link, "verify/verify") == berlin
    shown = run_cli("schedule", "show", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = {d["deployment"]: d for d in json.loads(shown.stdout)["deployments"]}
    assert rows["backup/backup-hourly"]["source"] == "edited on the server"
    assert rows["backup/backup-hourly"]["environment"]["active"] is False
    assert rows["backup/backup-weekly"]["source"] == "environment"
    assert rows["verify/verify"]["edited"] is True

    again = serve_once(link, tmp_path, BACKUP_SCHEDULE="daily")
    assert active_backups(link) == ["hourly"]
    assert schedules(link, "verify/verify") == berlin
    assert "schedule of backup/backup-hourly: kept as set on the Prefect server" in again
    assert "schedule of verify/verify: kept as set on the Prefect server" in again
    hourly_params = link.request("GET", "/deployments/name/backup/backup-hourly")["schedules"]
    assert hourly_params[0]["parameters"] == {"schedule": "hourly", "max_lateness_minutes": 60}

    changed = serve_once(link, tmp_path, BACKUP_SCHEDULE="weekly")
    assert active_backups(link) == ["weekly"]
    assert schedules(link, "backup/backup-weekly")[0]["cron"] == "0 3 * * 0"
    assert schedules(link, "verify/verify") == berlin
    assert "backup/backup-hourly: kept" not in changed


def test_schedule_commands_without_a_prefect_server_are_one_line_errors(tmp_path: Path) -> None:
    """No PREFECT_API_URL: show and set stop with one line saying what to set; a malformed value
    is a usage error (exit 2) naming it."""
    env = cli_env(None, tmp_path / "backups", PREFECT_HOME=str(tmp_path / "prefect-home"))
    line = one_line_error(run_cli("schedule", "show", env=env, cwd=tmp_path), 1)
    assert "no Prefect server is configured" in line and "PREFECT_API_URL" in line
    line = one_line_error(run_cli("schedule", "set", "dialy", env=env, cwd=tmp_path), 2)
    assert "unknown schedule 'dialy'" in line and "BACKUP_SCHEDULE" not in line


@pytest.fixture
def registered(link: PrefectLink, tmp_path: Path) -> Iterator[TestClient]:
    """Every deployment registered from the default environment (as serve does) and recorded;
    an API client whose Prefect is that server."""
    register_all(link, load_settings(_env_file=None))
    app = create_app(settings_for(None, tmp_path / "backups"), prefect=link)
    with TestClient(app) as client:
        yield client


def test_put_api_schedule_changes_the_schedules_get_shows_them(registered: TestClient) -> None:
    """PUT /api/schedule (admin) sets backups like BACKUP_SCHEDULE would and one deployment's
    cron; GET (read token) shows them as edited beside the environment's."""
    client = registered
    response = client.put("/api/schedule", json={"schedule": "hourly,weekly"}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and "serve" in body["rule"]
    assert set(body["changed"]) == {
        "backup/backup-hourly", "backup/backup-daily", "backup/backup-weekly",
    }  # fmt: skip
    response = client.put("/api/schedule", headers=AUTH,
                          json={"schedule": "off", "deployment": "monitor"})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.json()["changed"] == ["monitor/monitor"]

    shown = client.get("/api/schedule", headers=READ_AUTH).json()
    rows = {d["deployment"]: d for d in shown["deployments"]}
    assert rows["backup/backup-weekly"]["schedules"][0]["active"] is True
    assert rows["backup/backup-weekly"]["edited"] is True
    assert rows["backup/backup-daily"]["schedules"][0]["active"] is False
    assert rows["monitor/monitor"]["schedules"][0]["active"] is False
    assert rows["monitor/monitor"]["schedules"][0]["cron"] == "*/30 * * * *"
    assert rows["verify/verify"]["source"] == "environment"
    again = client.put("/api/schedule", json={"schedule": "hourly,weekly"}, headers=AUTH)
    assert again.json()["changed"] == []


def test_put_api_schedule_refuses_bad_requests_and_changes_nothing(
    registered: TestClient, link: PrefectLink
) -> None:
    """Unknown field 422 naming it; read token 403; not JSON 415; a malformed schedule or
    timezone 400; an unknown deployment 404; nothing changed by any of them."""
    client = registered
    before = client.get("/api/schedule", headers=AUTH).json()["deployments"]
    assert_error(client.put("/api/schedule", json={"schedule": "daily", "when": "now"},
                            headers=AUTH), 422, "when")  # fmt: skip
    assert_error(client.put("/api/schedule", json={"schedule": "daily"}, headers=READ_AUTH), 403)
    assert_error(client.put("/api/schedule", content=b"daily", headers=AUTH | {
        "Content-Type": "text/plain"}), 415, "application/json")  # fmt: skip
    assert_error(client.put("/api/schedule", json={"schedule": "dialy"}, headers=AUTH), 400,
                 "unknown schedule 'dialy'")  # fmt: skip
    assert_error(client.put("/api/schedule", json={"schedule": "61 * * * *",
                                                   "deployment": "verify"}, headers=AUTH), 400)
    assert_error(client.put("/api/schedule", json={"schedule": "daily", "timezone": "Mars/Base"},
                            headers=AUTH), 400, "Mars/Base")  # fmt: skip
    assert_error(client.put("/api/schedule", json={"schedule": "off", "deployment": "nope"},
                            headers=AUTH), 404, "nope")  # fmt: skip
    assert client.get("/api/schedule", headers=AUTH).json()["deployments"] == before


def test_api_schedule_without_prefect_is_503(tmp_path: Path) -> None:
    """No Prefect server configured: GET and PUT answer 503 saying what to set."""
    app = create_app(settings_for(None, tmp_path), prefect=PrefectLink(None, None))
    with TestClient(app) as client:
        assert_error(client.get("/api/schedule", headers=AUTH), 503, "PREFECT_API_URL")
        assert_error(client.put("/api/schedule", json={"schedule": "daily"}, headers=AUTH), 503,
                     "PREFECT_API_URL")  # fmt: skip
