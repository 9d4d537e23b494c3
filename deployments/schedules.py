"""Which deployments exist, which of their schedules are active, and when they fire.

Pure functions of the settings (``BACKUP_SCHEDULE``, ``BACKUP_ENABLED``, ``BACKUP_TIMEZONE``):
no Prefect server, no I/O. ``deployments/serve.py`` and ``deployments/prefect_yaml.py`` both
build from ``plan()``, so serving and ``prefect deploy`` register the same schedules.

``BACKUP_SCHEDULE`` is one of
    hourly | daily | weekly | monthly      one preset, its deployment active (``@daily`` too)
    a comma list of presets                e.g. ``hourly,weekly``: each of them active
    a 5-field cron expression              e.g. ``30 1 * * 1-5``: ``backup-custom`` active
Every backup deployment always exists (the UI can run any of them by hand); the ones not chosen
carry an inactive schedule an operator can switch on in the UI. ``BACKUP_ENABLED=false`` leaves
every schedule inactive. A malformed value raises ConfigError with one line at start-up.

Preset times are staggered (backups at :00, 02:00, Sunday 03:00, the 1st at 04:00; verify at
06:00; restore-test Sunday 05:00 after the weekly backup; rotate 05:30 after the day's backups)
so that two active presets rarely meet; when they do, the engine's per-database lock makes the
second fail with BackupRunningError rather than run two dumps at once. ``monitor`` runs every 30
minutes. ``upload`` is never scheduled: every backup run uploads its own backup, and a copy
missed meanwhile is what the monitor reports and a manual ``upload`` run fills in (a scheduled
catch-up could copy a backup whose verification is still running, and an unverified offsite
copy is one offsite retention later deletes).

Missed runs: every schedule passes ``max_lateness_minutes`` = one period of its cron (the
shortest gap between two of its fire times) as a run parameter. A run that starts later than
that after its scheduled time (the scheduler was down and queued it long ago) is skipped with
a log line, so after downtime at most the newest missed run of each deployment does work.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pgkeeper.errors import ConfigError
from pgkeeper.settings import Settings

# The cron of each BACKUP_SCHEDULE preset and the deployment it activates.
PRESETS: dict[str, str] = {
    "hourly": "0 * * * *",
    "daily": "0 2 * * *",
    "weekly": "0 3 * * 0",
    "monthly": "0 4 1 * *",
}
# The other flows' default crons are settings (BACKUP_VERIFY_SCHEDULE, ...): verify daily at
# 06:00 (re-verify backups not verified for a week: bit rot), restore-test Sunday 05:00 after
# the weekly backup, rotate 05:30 after the presets' backups, monitor every 30 minutes.
VERIFY_AFTER_HOURS = 7 * 24
FLOW_SCHEDULE_HOW_TO_FIX = "use a 5-field cron expression like '0 5 * * 0', or off"

HOW_TO_FIX = (
    "use hourly, daily, weekly, monthly, a comma list of them, "
    "or a 5-field cron expression like '30 1 * * *'"
)

# Flow name -> entrypoint, for prefect.yaml (serve imports the flow objects themselves).
ENTRYPOINTS: dict[str, str] = {
    "backup": "flows/backup.py:backup",
    "verify": "flows/verify.py:verify",
    "restore": "flows/restore.py:restore",
    "restore-test": "flows/restore_test.py:restore_test",
    "upload": "flows/upload.py:upload",
    "rotate": "flows/rotate.py:rotate",
    "monitor": "flows/monitor.py:monitor",
    "backup-server": "flows/backup_server.py:backup_server",
    "base-backup": "flows/base_backup.py:base_backup",
    "pitr-restore-test": "flows/pitr_restore_test.py:pitr_restore_test_flow",
}

# BACKUP_BASE_SCHEDULE presets: base backups at 01:00, before the day's dumps at 02:00.
BASE_PRESETS: dict[str, str] = {
    "hourly": "30 * * * *",
    "daily": "0 1 * * *",
    "weekly": "0 1 * * 0",
    "monthly": "0 1 1 * *",
}


def base_cron(value: str) -> str | None:
    """``BACKUP_BASE_SCHEDULE``: a preset (hourly, daily, weekly, monthly), a cron, or off."""
    word = value.strip().lower().removeprefix("@")
    if word in BASE_PRESETS:
        return BASE_PRESETS[word]
    return flow_cron(value, "BACKUP_BASE_SCHEDULE")


@dataclass(frozen=True)
class ScheduleSpec:
    """One cron schedule of a deployment."""

    cron: str
    timezone: str
    active: bool
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment: its flow, name and schedule (if any)."""

    flow: str  # the flow's name, e.g. "backup"
    name: str  # the deployment's name, e.g. "backup-daily"
    description: str
    schedule: ScheduleSpec | None = None
    # Backups: at most one run per deployment; a run arriving while one runs is cancelled.
    cancel_new_when_busy: bool = False


def validate_timezone(name: str) -> str:
    """Return an IANA timezone name; raise ConfigError for anything else."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"BACKUP_TIMEZONE {name!r} is not a timezone (use an IANA name like "
            "'UTC' or 'Europe/Berlin')"
        ) from None
    return name


def validate_cron(expression: str, what: str = "BACKUP_SCHEDULE", how: str = HOW_TO_FIX) -> str:
    """Return a 5-field cron expression that Prefect accepts; raise ConfigError otherwise."""
    from prefect.schedules import Cron  # Prefect's own validation: what the server accepts

    cron = " ".join(expression.split())
    if len(cron.split(" ")) != 5:
        raise ConfigError(f"{what} {expression!r} is not a schedule ({how})")
    try:
        Cron(cron)
    except ValueError:
        raise ConfigError(f"{what} {expression!r} is not a valid cron expression ({how})") from None
    return cron


def flow_cron(value: str, what: str) -> str | None:
    """One of the BACKUP_*_SCHEDULE knobs of the other flows: a cron, or None for ``off``."""
    if value.strip().lower() in ("off", "none", "false", ""):
        return None
    return validate_cron(value, what, FLOW_SCHEDULE_HOW_TO_FIX)


def parse_backup_schedule(value: str) -> tuple[list[str], str | None]:
    """Split ``BACKUP_SCHEDULE`` into the presets it names and a custom cron (or None).

    Raises ConfigError with one line for an empty, unknown or malformed value.
    """
    text = value.strip()
    if not text:
        raise ConfigError(f"BACKUP_SCHEDULE is empty ({HOW_TO_FIX})")
    words = [w.strip().lower().removeprefix("@") for w in text.split(",")]
    if all(w in PRESETS for w in words):
        return list(dict.fromkeys(words)), None
    if all(w.isalpha() for w in words):
        unknown = ", ".join(repr(w) for w in words if w not in PRESETS)
        raise ConfigError(f"BACKUP_SCHEDULE has unknown schedule {unknown} ({HOW_TO_FIX})")
    return [], validate_cron(text)


def fleet_schedules(settings: Settings) -> tuple[list[str], list[str]]:
    """The presets and the custom crons some database uses: BACKUP_SCHEDULE's, and with an
    inventory (BACKUP_DATABASES / BACKUP_INVENTORY) every database's and '*' server's own.

    Raises ConfigError like ``parse_backup_schedule`` (naming the bad value).
    """
    presets, custom = parse_backup_schedule(settings.backup_schedule)
    customs = [custom] if custom else []
    if settings.backup_inventory or settings.backup_databases:
        from pgkeeper.inventory import load_inventory  # no server is asked

        inventory = load_inventory(settings, expand=False)
        own = [d.settings for d in inventory.enabled] + list(inventory.templates.values())
        for database_settings in own:
            more, cron = parse_backup_schedule(database_settings.backup_schedule)
            presets += [p for p in more if p not in presets]
            if cron and cron not in customs:
                customs.append(cron)
    return presets, customs


def fire_times(cron: str, timezone: str, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` fire times of a cron after ``start``, in ``timezone``."""
    # Prefect's vendored croniter is what its scheduler uses, so the two agree on every edge
    # (day-of-month OR day-of-week, DST); Prefect is pinned, so the private path is stable.
    from prefect._vendor.croniter import croniter

    local = start.astimezone(ZoneInfo(timezone))
    it = croniter(cron, local)
    return [it.get_next(datetime) for _ in range(count)]


PERIOD_REFERENCE = datetime(2025, 1, 1, tzinfo=UTC)


def period(cron: str) -> timedelta:
    """One period of a cron: the shortest gap between consecutive fire times over its next 60
    from a fixed date (in UTC: a DST hour is not a period), so it is deterministic and an
    irregular schedule (weekdays only) never lets a run be later than its shortest gap."""
    times = fire_times(cron, "UTC", PERIOD_REFERENCE, 61)
    return min(b - a for a, b in itertools.pairwise(times))


@functools.lru_cache(maxsize=256)
def longest_gap(cron: str) -> timedelta:
    """The longest time between two fire times of a cron over its next 60 (from the same fixed
    date as ``period``): a weekday-only schedule waits 3 days over a weekend."""
    times = fire_times(cron, "UTC", PERIOD_REFERENCE, 61)
    return max(b - a for a, b in itertools.pairwise(times))


def backup_interval(settings: Settings) -> timedelta | None:
    """The longest time these settings' active backup schedules (BACKUP_SCHEDULE, with
    BACKUP_ENABLED) leave between two backups: the monitor's freshness yardstick of one
    database; None when none is active.

    With several schedules (``hourly,weekly``) the shortest of their longest gaps: the union
    of schedules never waits longer than any one of them. Only these settings' own schedule
    counts: a fleet database's settings are its own (inventory overrides applied), so a daily
    database is not expected hourly because another one is, and the inventory is not read
    again for each database (that made the fleet inventory quadratic: ~4 min at 1,000).
    Raises ConfigError like ``plan``.
    """
    validate_timezone(settings.backup_timezone)
    if not settings.backup_enabled:
        return None
    presets, custom = parse_backup_schedule(settings.backup_schedule)
    crons = [PRESETS[preset] for preset in presets] + ([custom] if custom else [])
    return min((longest_gap(cron) for cron in crons), default=None)


def is_missed(scheduled: datetime, now: datetime, max_lateness: timedelta | None) -> bool:
    """True when a run scheduled at ``scheduled`` is more than ``max_lateness`` late at ``now``."""
    return max_lateness is not None and now - scheduled > max_lateness


def _schedule(cron: str, timezone: str, active: bool, **parameters: Any) -> ScheduleSpec:
    minutes = int(period(cron).total_seconds() // 60)
    return ScheduleSpec(cron, timezone, active, {**parameters, "max_lateness_minutes": minutes})


def plan(settings: Settings) -> list[DeploymentSpec]:
    """Every deployment pgkeeper registers, in the order the UI should list them.

    Raises ConfigError for a malformed BACKUP_SCHEDULE or BACKUP_TIMEZONE.
    """
    timezone = validate_timezone(settings.backup_timezone)
    presets, customs = fleet_schedules(settings)
    custom = customs[0] if customs else None
    enabled = settings.backup_enabled
    verify_cron = flow_cron(settings.backup_verify_schedule, "BACKUP_VERIFY_SCHEDULE")
    rotate_cron = flow_cron(settings.backup_rotate_schedule, "BACKUP_ROTATE_SCHEDULE")
    test_cron = flow_cron(settings.backup_restore_test_schedule, "BACKUP_RESTORE_TEST_SCHEDULE")
    monitor_cron = flow_cron(settings.backup_monitor_schedule, "BACKUP_MONITOR_SCHEDULE")
    base = base_cron(settings.backup_base_schedule)
    pitr_test_cron = flow_cron(
        settings.backup_pitr_restore_test_schedule, "BACKUP_PITR_RESTORE_TEST_SCHEDULE"
    )

    def scheduled(cron: str | None, **parameters: Any) -> ScheduleSpec | None:
        return _schedule(cron, timezone, enabled, **parameters) if cron else None

    specs: list[DeploymentSpec] = []
    for preset, cron in PRESETS.items():
        specs.append(
            DeploymentSpec(
                flow="backup",
                name=f"backup-{preset}",
                description=f"{preset.capitalize()} backup ({cron}, {timezone}).",
                schedule=_schedule(
                    cron, timezone, enabled and preset in presets, schedule=preset
                ),
                cancel_new_when_busy=True,
            )
        )
    specs.append(
        DeploymentSpec(
            flow="backup",
            name="backup-custom",
            description=(
                f"Backup on the cron from BACKUP_SCHEDULE ({custom}, {timezone})."
                if custom
                else "Backup on a custom cron: set BACKUP_SCHEDULE to a cron expression."
            ),
            schedule=_schedule(custom, timezone, enabled, schedule=custom) if custom else None,
            cancel_new_when_busy=True,
        )
    )
    for index, cron in enumerate(customs[1:], 2):  # more crons, from the inventory
        specs.append(
            DeploymentSpec(
                flow="backup",
                name=f"backup-custom-{index}",
                description=f"Backup of the inventory's databases on {cron} ({timezone}).",
                schedule=_schedule(cron, timezone, enabled, schedule=cron),
                cancel_new_when_busy=True,
            )
        )
    specs.append(
        DeploymentSpec(
            flow="verify",
            name="verify",
            description=(
                "Re-verify stored backups not verified for a week "
                f"({verify_cron or 'by hand'}), or one by id."
            ),
            schedule=scheduled(verify_cron, older_than_hours=VERIFY_AFTER_HOURS),
        )
    )
    specs.append(
        DeploymentSpec(
            flow="upload",
            name="upload",
            description=(
                "Copy backups to the offsite targets, proven by checksum: one by id, or every "
                "copy missing. Not scheduled: each backup run uploads its own backup."
            ),
        )
    )
    specs.append(
        DeploymentSpec(
            flow="rotate",
            name="rotate",
            description=(
                f"Apply the retention policy on every target ({rotate_cron or 'by hand'}; "
                "also after backups)."
            ),
            schedule=scheduled(rotate_cron),
            cancel_new_when_busy=True,
        )
    )
    specs.append(
        DeploymentSpec(
            flow="restore",
            name="restore",
            description=(
                "Restore a backup. Defaults are safe: the newest verified backup into a NEW "
                "database; replacing a database with data needs confirm = its name."
            ),
        )
    )
    specs.append(
        DeploymentSpec(
            flow="restore-test",
            name="restore-test",
            description=(
                "Restore the newest backup on staging, compare row counts, run checks "
                f"({test_cron or 'by hand'})."
            ),
            schedule=scheduled(test_cron),
            cancel_new_when_busy=True,
        )
    )
    specs.append(
        DeploymentSpec(
            flow="monitor",
            name="monitor",
            description=(
                "Check backup freshness, verification, restore tests, offsite copies and "
                f"usage; the run fails when any check fails ({monitor_cron or 'by hand'})."
            ),
            schedule=scheduled(monitor_cron),
            cancel_new_when_busy=True,
        )
    )
    specs.append(
        DeploymentSpec(
            flow="backup-server",
            name="backup-server",
            description=(
                "One server's share of a fleet backup run (started by the backup runs, one "
                "task run per database): not scheduled."
            ),
        )
    )
    specs.append(
        DeploymentSpec(
            flow="base-backup",
            name="base-backup",
            description=(
                "Base backup of the whole cluster for point-in-time recovery, then verify, "
                f"upload (with the WAL) and rotate ({base or 'by hand: set BACKUP_BASE_SCHEDULE'})."
            ),
            schedule=scheduled(base),
            cancel_new_when_busy=True,
        )
    )
    specs.append(
        DeploymentSpec(
            flow="pitr-restore-test",
            name="pitr-restore-test",
            description=(
                "Restore the newest base backup and all archived WAL on a scratch server, read "
                f"it back, record the RTO ({pitr_test_cron or 'by hand'})."
            ),
            schedule=scheduled(pitr_test_cron),
            cancel_new_when_busy=True,
        )
    )
    return specs
