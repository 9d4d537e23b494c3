"""The rule serve applies to schedules at start (pgkeeper.schedule.decide): the environment's
schedule wins only when it changed since serve last applied it, for every deployment the same
setting governs; otherwise the server's (edited) schedule stays."""

from __future__ import annotations

from typing import Any

from deployments.schedule_edits import environment, governed
from pgkeeper.schedule import DeploymentSchedule, decide, describe, from_server, normalise
from pgkeeper.settings import load_settings

DEPLOYMENT: dict[str, Any] = {"id": "x", "schedules": []}


def env_of(**settings: Any) -> dict[str, Any]:
    return environment(load_settings(_env_file=None, **settings))


def test_an_unchanged_environment_keeps_the_servers_schedule() -> None:
    """Same settings as last applied: the server's schedule (edited or not) is kept."""
    env = env_of(backup_schedule="daily")
    decision = decide("backup/backup-daily", governed(env, "backup/backup-daily"), env, DEPLOYMENT)
    assert decision.keep_server


def test_a_new_deployment_or_no_record_gets_the_environments_schedule() -> None:
    """Nothing on the server yet, no record at all (first start, variable deleted) or none for
    this deployment: the environment's schedule is applied."""
    env = env_of()
    mine = governed(env, "verify/verify")
    assert not decide("verify/verify", mine, env, None).keep_server
    assert not decide("verify/verify", mine, None, DEPLOYMENT).keep_server
    partial = {k: v for k, v in env.items() if k != "verify/verify"}
    assert not decide("verify/verify", mine, partial, DEPLOYMENT).keep_server


def test_changing_backup_schedule_applies_the_environment_to_every_backup_deployment() -> None:
    """daily -> weekly: backup-hourly's own schedule is the same (inactive) in both, but
    BACKUP_SCHEDULE governs it too, so it is applied (a UI-activated hourly does not survive);
    verify, which BACKUP_SCHEDULE does not govern, keeps the server's."""
    before, after = env_of(backup_schedule="daily"), env_of(backup_schedule="weekly")
    assert normalise(before["backup/backup-hourly"]) == normalise(after["backup/backup-hourly"])
    hourly = decide("backup/backup-hourly", governed(after, "backup/backup-hourly"), before,
                    DEPLOYMENT)  # fmt: skip
    assert not hourly.keep_server and "changed" in hourly.reason
    assert decide("verify/verify", governed(after, "verify/verify"), before, DEPLOYMENT).keep_server


def test_a_flows_own_knob_governs_only_that_flow() -> None:
    """BACKUP_VERIFY_SCHEDULE changed: verify gets the environment's; backups keep theirs."""
    before, after = env_of(), env_of(backup_verify_schedule="0 7 * * *")
    assert not decide("verify/verify", governed(after, "verify/verify"), before,
                      DEPLOYMENT).keep_server  # fmt: skip
    assert decide("backup/backup-daily", governed(after, "backup/backup-daily"), before,
                  DEPLOYMENT).keep_server  # fmt: skip


def test_the_timezone_or_enabled_changes_every_schedule() -> None:
    """BACKUP_TIMEZONE and BACKUP_ENABLED shape every schedule: nothing is kept."""
    before = env_of()
    for after in (env_of(backup_timezone="Europe/Berlin"), env_of(backup_enabled=False)):
        for name in ("backup/backup-daily", "verify/verify", "monitor/monitor"):
            assert not decide(name, governed(after, name), before, DEPLOYMENT).keep_server


def test_cron_blanks_do_not_count_as_a_change() -> None:
    """'0  2 * * *' and '0 2 * * *' are the same schedule."""
    env = env_of()
    spaced = {k: (v and {**v, "cron": v["cron"].replace(" ", "  ")}) for k, v in env.items()}
    assert decide("backup/backup-daily", governed(env, "backup/backup-daily"), spaced,
                  DEPLOYMENT).keep_server  # fmt: skip


def test_edited_compares_the_servers_schedules_with_the_environments() -> None:
    """A deployment shows as edited when the server's schedules are not exactly the
    environment's one; an interval schedule made in the UI is shown as such."""
    env = env_of()["backup/backup-daily"]
    assert env is not None
    same = {"schedule": {"cron": env["cron"], "timezone": "UTC", "day_or": True},
            "active": True, "parameters": env["parameters"]}  # fmt: skip
    other = {**same, "schedule": {"interval": 3600.0, "timezone": "UTC"}}
    as_env = DeploymentSchedule("backup/backup-daily", False, [from_server(same)], env, True)
    assert as_env.edited is False and as_env.source == "environment"
    edited = DeploymentSchedule("backup/backup-daily", False, [from_server(other)], env, True)
    assert edited.edited is True and edited.source == "edited on the server"
    assert describe(from_server(other)) == "every 3600.0s UTC, active"
    pool = DeploymentSchedule("backup/backup-daily-pool", False, [from_server(same)])
    assert pool.edited is None and pool.source == "prefect deploy (prefect.yaml)"
