"""BACKUP_SCHEDULE / BACKUP_ENABLED / BACKUP_TIMEZONE decide which deployments are scheduled,
when, and which late runs count as missed (deployments/schedules.py, no Prefect server)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployments import schedules
from deployments.schedules import (
    DeploymentSpec,
    backup_interval,
    is_missed,
    longest_gap,
    parse_backup_schedule,
    period,
    plan,
)
from pgkeeper.errors import ConfigError
from pgkeeper.inventory import Inventory, load_inventory
from pgkeeper.settings import Settings, load_settings

ALL_NAMES = [
    "backup-hourly", "backup-daily", "backup-weekly", "backup-monthly", "backup-custom",
    "verify", "upload", "rotate", "restore", "restore-test", "monitor", "backup-server",
    "base-backup", "pitr-restore-test",
]  # fmt: skip
# Scheduled whatever BACKUP_SCHEDULE says (while BACKUP_ENABLED is true).
HOUSEKEEPING = {
    "verify": "0 6 * * *", "rotate": "30 5 * * *", "restore-test": "0 5 * * 0",
    "monitor": "*/30 * * * *",
}  # fmt: skip


def _settings(**overrides: object) -> Settings:
    return load_settings(_env_file=None, **overrides)


def _by_name(specs: list[DeploymentSpec]) -> dict[str, DeploymentSpec]:
    return {s.name: s for s in specs}


def _active(specs: list[DeploymentSpec]) -> dict[str, str]:
    return {s.name: s.schedule.cron for s in specs if s.schedule and s.schedule.active}


@pytest.mark.parametrize(
    ("value", "backups"),
    [
        ("hourly", {"backup-hourly": "0 * * * *"}),
        ("daily", {"backup-daily": "0 2 * * *"}),
        ("weekly", {"backup-weekly": "0 3 * * 0"}),
        ("monthly", {"backup-monthly": "0 4 1 * *"}),
        ("@daily", {"backup-daily": "0 2 * * *"}),
        (" Hourly , WEEKLY ", {"backup-hourly": "0 * * * *", "backup-weekly": "0 3 * * 0"}),
        ("daily,daily", {"backup-daily": "0 2 * * *"}),
        ("30 1 * * 1-5", {"backup-custom": "30 1 * * 1-5"}),
        ("0 1,13 * * *", {"backup-custom": "0 1,13 * * *"}),  # a comma inside a cron
        ("*/15   *  * * *", {"backup-custom": "*/15 * * * *"}),
    ],
)
def test_each_backup_schedule_value_activates_its_deployments(
    value: str, backups: dict[str, str]
) -> None:
    """Each BACKUP_SCHEDULE value activates exactly its backup deployments with their cron;
    verify, rotate, restore-test and monitor stay scheduled, restore and upload never are."""
    specs = plan(_settings(backup_schedule=value))

    assert [s.name for s in specs] == ALL_NAMES
    assert _active(specs) == {**backups, **HOUSEKEEPING}
    assert _by_name(specs)["restore"].schedule is None
    assert _by_name(specs)["upload"].schedule is None


def test_presets_not_chosen_exist_with_an_inactive_schedule() -> None:
    """Unchosen presets are registered with inactive schedules (switchable in the UI); the
    custom deployment has no schedule unless BACKUP_SCHEDULE is a cron."""
    specs = _by_name(plan(_settings(backup_schedule="daily")))

    hourly = specs["backup-hourly"].schedule
    assert hourly is not None and hourly.cron == "0 * * * *" and not hourly.active
    assert specs["backup-custom"].schedule is None


def test_backup_enabled_false_leaves_every_schedule_inactive() -> None:
    """BACKUP_ENABLED=false: every deployment is still registered, no schedule is active."""
    specs = plan(_settings(backup_enabled=False, backup_schedule="hourly,weekly"))

    assert [s.name for s in specs] == ALL_NAMES
    assert _active(specs) == {}
    assert all(s.schedule is None or not s.schedule.active for s in specs)


def test_the_timezone_is_carried_by_every_schedule() -> None:
    """BACKUP_TIMEZONE is the timezone of every schedule (cron times are local times)."""
    specs = plan(_settings(backup_timezone="Europe/Berlin", backup_schedule="15 4 * * *"))

    assert {s.schedule.timezone for s in specs if s.schedule} == {"Europe/Berlin"}


def test_backups_cancel_a_new_run_while_one_runs_and_others_do_not() -> None:
    """Backup deployments (and restore-test, rotate, monitor) use CANCEL_NEW; restore, verify
    and upload queue."""
    specs = _by_name(plan(_settings()))

    assert {n for n, s in specs.items() if s.cancel_new_when_busy} == {
        "backup-hourly", "backup-daily", "backup-weekly", "backup-monthly", "backup-custom",
        "restore-test", "rotate", "monitor", "base-backup", "pitr-restore-test",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("value", "cron"),
    [("off", None), ("weekly", "0 1 * * 0"), ("daily", "0 1 * * *"), ("15 3 * * 6", "15 3 * * 6")],
)
def test_base_backup_schedule_is_a_preset_a_cron_or_off(value: str, cron: str | None) -> None:
    """BACKUP_BASE_SCHEDULE schedules the base-backup deployment (off: by hand only); the
    PITR restore test has its own BACKUP_PITR_RESTORE_TEST_SCHEDULE, off by default."""
    specs = _by_name(plan(_settings(backup_base_schedule=value)))

    schedule = specs["base-backup"].schedule
    assert (schedule.cron if schedule else None) == cron
    assert schedule is None or schedule.active
    assert specs["pitr-restore-test"].schedule is None
    tested = _by_name(plan(_settings(backup_pitr_restore_test_schedule="0 4 * * 0")))
    assert tested["pitr-restore-test"].schedule is not None


def test_a_malformed_base_backup_schedule_is_one_line_naming_the_setting() -> None:
    """A bad BACKUP_BASE_SCHEDULE fails at start-up with the setting's name."""
    with pytest.raises(ConfigError, match="BACKUP_BASE_SCHEDULE"):
        plan(_settings(backup_base_schedule="fortnightly"))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "BACKUP_SCHEDULE is empty"),
        ("   ", "BACKUP_SCHEDULE is empty"),
        ("dialy", "unknown schedule 'dialy'"),
        ("daily,fortnightly", "unknown schedule 'fortnightly'"),
        ("* * *", "is not a schedule"),
        ("0 0 * * * *", "is not a schedule"),  # 6 fields (seconds) are not accepted
        ("61 * * * *", "is not a valid cron expression"),
        ("0 25 * * *", "is not a valid cron expression"),
        ("H * * * *", "is not a valid cron expression"),  # hashed crons: Prefect refuses them
        ("daily,0 3 * * *", "is not a valid cron expression"),
    ],
)
def test_a_malformed_schedule_is_one_clear_line(value: str, message: str) -> None:
    """Malformed BACKUP_SCHEDULE values raise ConfigError: one line, saying what to use."""
    with pytest.raises(ConfigError, match=message) as info:
        plan(_settings(backup_schedule=value))

    text = str(info.value)
    assert "\n" not in text
    assert "use hourly, daily, weekly, monthly" in text


def test_the_other_flows_follow_their_schedule_knobs_and_off_leaves_them_by_hand() -> None:
    """BACKUP_VERIFY/RESTORE_TEST/ROTATE/MONITOR_SCHEDULE set those deployments' crons; "off"
    keeps the deployment (runnable from the UI) without a schedule."""
    defaults = _active(plan(_settings()))
    wanted = {"verify": "0 6 * * *", "restore-test": "0 5 * * 0", "rotate": "30 5 * * *",
              "monitor": "*/30 * * * *"}  # fmt: skip
    assert {name: defaults[name] for name in wanted} == wanted
    specs = _by_name(plan(_settings(
        backup_verify_schedule="15 7 * * *", backup_restore_test_schedule="0 4 1 * *",
        backup_rotate_schedule="off", backup_monitor_schedule=" */5  * * * * ",
    )))  # fmt: skip
    assert specs["verify"].schedule is not None
    assert specs["verify"].schedule.cron == "15 7 * * *"
    assert specs["verify"].schedule.parameters["older_than_hours"] == 7 * 24
    assert specs["restore-test"].schedule is not None
    assert specs["restore-test"].schedule.cron == "0 4 1 * *"
    assert specs["monitor"].schedule is not None
    assert specs["monitor"].schedule.cron == "*/5 * * * *"
    assert specs["rotate"].schedule is None and "by hand" in specs["rotate"].description


def test_a_malformed_flow_schedule_names_its_knob() -> None:
    with pytest.raises(ConfigError, match="BACKUP_RESTORE_TEST_SCHEDULE 'weekly' is not a") as info:
        plan(_settings(backup_restore_test_schedule="weekly"))
    assert "or off" in str(info.value) and "\n" not in str(info.value)


def test_a_malformed_timezone_is_one_clear_line() -> None:
    """An unknown BACKUP_TIMEZONE raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="BACKUP_TIMEZONE 'Mars/Olympus' is not a timezone"):
        plan(_settings(backup_timezone="Mars/Olympus"))


def test_parse_returns_presets_in_order_or_a_normalised_cron() -> None:
    """Presets keep the operator's order without duplicates; a cron's spacing is normalised."""
    assert parse_backup_schedule("weekly,hourly,weekly") == (["weekly", "hourly"], None)
    assert parse_backup_schedule(" 0  3 * * 1 ") == ([], "0 3 * * 1")


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("0 * * * *", timedelta(hours=1)),
        ("0 2 * * *", timedelta(days=1)),
        ("0 3 * * 0", timedelta(days=7)),
        ("0 4 1 * *", timedelta(days=28)),  # the shortest month
        ("30 1 * * 1-5", timedelta(days=1)),  # weekdays: the shortest gap, not the weekend
        ("0 1,13 * * *", timedelta(hours=12)),
    ],
)
def test_one_period_is_the_shortest_gap_between_fire_times(cron: str, expected: timedelta) -> None:
    """The missed-run threshold of a cron is its shortest gap between two fire times."""
    assert period(cron) == expected


def test_every_schedule_passes_its_period_as_the_missed_run_threshold() -> None:
    """Each schedule's parameters carry max_lateness_minutes = one period of its cron."""
    specs = _by_name(plan(_settings(backup_schedule="hourly,daily,weekly,monthly")))

    minutes = {
        n: s.schedule.parameters["max_lateness_minutes"] for n, s in specs.items() if s.schedule
    }
    assert minutes == {
        "backup-hourly": 60, "backup-daily": 1440, "backup-weekly": 10080,
        "backup-monthly": 40320, "verify": 1440, "restore-test": 10080, "rotate": 1440,
        "monitor": 30,
    }  # fmt: skip
    assert specs["verify"].schedule is not None
    assert specs["verify"].schedule.parameters["older_than_hours"] == schedules.VERIFY_AFTER_HOURS


def test_a_run_later_than_one_period_is_missed_and_manual_runs_never_are() -> None:
    """A run more than max_lateness late is missed; within it, or with no threshold, it runs."""
    scheduled = datetime(2025, 3, 1, 2, 0, tzinfo=UTC)
    hour = timedelta(hours=1)

    assert not is_missed(scheduled, scheduled + timedelta(minutes=5), hour)
    assert not is_missed(scheduled, scheduled + hour, hour)
    assert is_missed(scheduled, scheduled + hour + timedelta(seconds=1), hour)
    assert not is_missed(scheduled, scheduled + timedelta(days=30), None)


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("0 2 * * *", timedelta(days=1)),
        ("30 1 * * 1-5", timedelta(days=3)),  # Friday to Monday
        ("0 4 1 * *", timedelta(days=31)),  # the longest month
        ("0 1,13 * * *", timedelta(hours=12)),
    ],
)
def test_the_longest_gap_of_a_cron_covers_weekends_and_long_months(
    cron: str, expected: timedelta
) -> None:
    """The monitor's yardstick is a cron's longest gap, so a weekday schedule is not stale on
    Sunday."""
    assert longest_gap(cron) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("daily", timedelta(days=1)),
        ("hourly,weekly", timedelta(hours=1)),  # the union waits no longer than the hourly
        ("weekly,monthly", timedelta(days=7)),
        ("30 1 * * 1-5", timedelta(days=3)),
    ],
)
def test_the_backup_interval_is_the_shortest_longest_gap_of_the_active_schedules(
    value: str, expected: timedelta
) -> None:
    """BACKUP_SCHEDULE decides how often the monitor expects a backup."""
    assert backup_interval(_settings(backup_schedule=value)) == expected


def test_with_backups_disabled_no_backup_is_expected() -> None:
    """BACKUP_ENABLED=false: no active backup schedule, so no interval."""
    assert backup_interval(_settings(backup_enabled=False)) is None


def _fleet(tmp_path: Path, count: int) -> Inventory:
    """An inventory file: ``hot`` backed up hourly, ``count`` other databases daily."""
    names = "".join(f"      db{i:04d}: {{}}\n" for i in range(count))
    (tmp_path / "inventory.yaml").write_text(
        "servers:\n"
        "  - url: postgresql://backup@db1.internal:5432/hot\n"
        "    schedule: hourly\n"
        "  - url: postgresql://backup@db2.internal:5432/*\n"
        "    schedule: daily\n"
        "    databases:\n" + names
    )
    return load_inventory(_settings(backup_inventory=tmp_path / "inventory.yaml"), expand=False)


def test_each_database_of_a_fleet_is_expected_on_its_own_schedule(tmp_path: Path) -> None:
    """A daily database is not expected hourly because another database of the fleet is
    (the fleet artifact, the inventory and the monitor judge each one by its own RPO)."""
    inventory = _fleet(tmp_path, 2)
    intervals = {d.name: backup_interval(d.settings) for d in inventory.databases}
    assert intervals == {"hot": timedelta(hours=1), "db0000": timedelta(days=1),
                         "db0001": timedelta(days=1)}  # fmt: skip


def test_the_intervals_of_a_large_fleet_cost_no_inventory_reads(tmp_path: Path) -> None:
    """Each database's interval comes from its own settings: 1,000 databases take well under
    a second in all, where reading the whole inventory again for each one (and 60 cron fire
    times per schedule) took ~4 min at 1,000 databases, at the end of every fleet run."""
    inventory = _fleet(tmp_path, 1000)
    started = time.monotonic()
    intervals = [backup_interval(d.settings) for d in inventory.databases]
    assert time.monotonic() - started < 2
    assert intervals.count(timedelta(days=1)) == 1000
