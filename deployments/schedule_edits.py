"""Schedules at run time, in Prefect's terms: what the environment gives each deployment, what
``serve`` keeps at start (the rule of ``pgkeeper.schedule``), and the schedules a
``pgkeeper schedule set`` / ``PUT /api/schedule`` value asks for.

Turning a value into schedules needs Prefect's cron arithmetic (validation, and the period that
becomes ``max_lateness_minutes``), which ``deployments.schedules`` imports lazily: the same
engine the scheduler fires by, so what is set is what runs.

A value without a deployment reads like ``BACKUP_SCHEDULE``: ``hourly``, ``daily``, ``weekly``,
``monthly``, a comma list of them, or a 5-field cron (then ``backup-custom``), and activates
exactly those backup deployments (the others stay registered, inactive); ``off`` makes every
backup schedule inactive. With a deployment (``verify``, ``backup-daily``, ``rotate-pool``,
``monitor/monitor``): a 5-field cron (active), or ``off`` / ``on`` to switch its schedule.
The timezone is ``--timezone``, else the one the deployment's schedule already has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from deployments.schedules import (
    FLOW_SCHEDULE_HOW_TO_FIX,
    PRESETS,
    ScheduleSpec,
    parse_backup_schedule,
    period,
    plan,
    validate_cron,
    validate_timezone,
)
from pgkeeper.errors import ConfigError, UsageError
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.schedule import (
    DeploymentNotFoundError,
    DeploymentSchedule,
    Spec,
    decide,
    describe,
    normalise,
    read_deployment,
    read_record,
    server_specs,
)
from pgkeeper.settings import Settings

BACKUP_DEPLOYMENTS = [f"backup-{preset}" for preset in PRESETS] + ["backup-custom"]
CUSTOM_MORE = re.compile(r"backup-custom-\d+")  # the inventory's further crons (the fleet)
POOL = "-pool"  # prefect.yaml's deployments: the same names with this suffix
OFF = frozenset({"off", "none", "false", "disabled"})
LATENESS = "max_lateness_minutes"


def spec_of(schedule: ScheduleSpec | None) -> Spec | None:
    if schedule is None:
        return None
    return {
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "active": schedule.active,
        "parameters": dict(schedule.parameters),
    }


def environment(settings: Settings) -> dict[str, Spec | None]:
    """``flow/name`` -> the schedule the environment gives that served deployment (or None).

    Raises ConfigError for a malformed BACKUP_SCHEDULE, timezone or flow schedule."""
    return {f"{s.flow}/{s.name}": spec_of(s.schedule) for s in plan(settings)}


def governed(env: dict[str, Spec | None], deployment: str) -> dict[str, Spec | None]:
    """The environment's schedules of ``deployment`` and of the deployments the same settings
    govern: every backup deployment for a backup one (BACKUP_SCHEDULE picks among them)."""
    flow = deployment.split("/", 1)[0]
    return {
        name: spec for name, spec in env.items()
        if name == deployment or flow == name.split("/", 1)[0] == "backup"
    }  # fmt: skip


# --- serve's start ------------------------------------------------------------------------------


@dataclass
class StartPlan:
    """What serve registers: the schedules it keeps (by deployment name), why, and the record
    of the environment's schedules it writes once registered."""

    kept: dict[str, list[Any]] = field(default_factory=dict)  # name -> DeploymentScheduleCreate
    lines: list[str] = field(default_factory=list)
    record: dict[str, Spec | None] = field(default_factory=dict)


def at_start(settings: Settings, link: PrefectLink) -> StartPlan:
    """Apply the rule to every served deployment (one read each, and the record)."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    env = environment(settings)
    record = read_record(link)
    start = StartPlan(record=env)
    for full, wanted in env.items():
        flow, name = full.split("/", 1)
        found = link.request("GET", f"/deployments/name/{flow}/{name}")
        on_server = found if isinstance(found, dict) else None
        decision = decide(full, governed(env, full), record, on_server)
        if on_server is None or not decision.keep_server:
            continue
        raw = [s for s in on_server.get("schedules") or [] if isinstance(s, dict)]
        start.kept[name] = [
            DeploymentScheduleCreate(
                schedule=s["schedule"], active=s.get("active", True),
                parameters=s.get("parameters") or {}, slug=s.get("slug"),
                max_scheduled_runs=s.get("max_scheduled_runs"),
            )
            for s in raw
        ]  # fmt: skip
        current = DeploymentSchedule(full, False, server_specs(on_server), wanted, managed=True)
        if current.edited:
            shown = "; ".join(describe(s) for s in current.schedules) or "none"
            start.lines.append(
                f"schedule of {full}: kept as set on the Prefect server ({shown}); the "
                f"environment's ({describe(wanted)}) is unchanged since serve applied it"
            )
    return start


# --- pgkeeper schedule set -----------------------------------------------------------------------


def _schedule(cron: str, timezone: str, active: bool, parameters: dict[str, Any]) -> Spec:
    return {"cron": cron, "timezone": timezone, "active": active, "parameters": parameters}


def _lateness(cron: str) -> int:
    return int(period(cron).total_seconds() // 60)


def _first_cron(deployment: dict[str, Any]) -> Spec | None:
    return next((normalise(s) for s in server_specs(deployment) if "cron" in s), None)


def _timezone(wanted: str | None, *found: dict[str, Any]) -> str | None:
    if wanted is not None:
        try:
            return validate_timezone(wanted)
        except ConfigError:
            raise ConfigError(
                f"timezone {wanted[:80]!r} is not a timezone (use an IANA name like 'UTC' or "
                "'Europe/Berlin')"
            ) from None
    for deployment in found:
        if (spec := _first_cron(deployment)) is not None:
            return str(spec["timezone"])
    return None


def full_name(settings: Settings, deployment: str) -> str:
    """``flow/name`` of a deployment given as ``name`` or ``flow/name`` (``-pool`` included)."""
    if "/" in deployment:
        return deployment
    flows = {s.name: s.flow for s in plan(settings)}
    flow = flows.get(deployment.removesuffix(POOL))
    if flow is None:
        raise DeploymentNotFoundError(
            f"no pgkeeper deployment named {deployment!r} (use one of {', '.join(flows)}, "
            "or its -pool twin)"
        )
    return f"{flow}/{deployment}"


def _parameters(deployment: dict[str, Any], cron: str, **wanted: Any) -> dict[str, Any]:
    """A schedule's run parameters, as ``deployments.schedules`` gives them, for those the
    deployment's flow takes: its missed-run limit, and for backups the schedule it is (the
    fleet backs up the databases whose own schedule names it)."""
    schema = deployment.get("parameter_openapi_schema") or {}
    takes = schema.get("properties") or {}
    parameters = {key: value for key, value in wanted.items() if key in takes}
    if LATENESS in takes:
        parameters[LATENESS] = _lateness(cron)
    return parameters


def _backup_family(link: PrefectLink, suffix: str) -> dict[str, dict[str, Any]]:
    """Serve's backup deployments (``suffix`` ""), or prefect.yaml's (``-pool``), by name."""
    found = {}
    for deployment in link.deployments_of("backup"):
        full = str(deployment.get("name", ""))
        if full.endswith(POOL) != bool(suffix):
            continue
        name = full.removesuffix(suffix)
        if name in BACKUP_DEPLOYMENTS or CUSTOM_MORE.fullmatch(name):
            found[name] = deployment
    return found


def _backup_schedules(
    settings: Settings, link: PrefectLink, value: str, timezone: str | None
) -> dict[str, Spec]:
    """A BACKUP_SCHEDULE-style value (or ``off``) for every backup deployment on the server:
    serve's family and prefect.yaml's ``-pool`` one, whichever exist. ``off`` switches every
    backup schedule off; a value sets the presets and ``backup-custom`` and leaves the
    inventory's own crons (``backup-custom-2``...) as they are."""
    off = value.lower() in OFF
    try:
        presets, custom = ([], None) if off else parse_backup_schedule(value)
    except ConfigError as exc:  # its text names the environment variable; here it is an argument
        text = exc.message.replace("BACKUP_SCHEDULE has unknown", "unknown", 1)
        raise ConfigError(text.replace("BACKUP_SCHEDULE", "the schedule", 1)) from None
    wanted: dict[str, Spec] = {}
    families = 0
    for suffix in ("", POOL):
        existing = _backup_family(link, suffix)
        if not existing:
            continue
        families += 1
        zone = _timezone(timezone, *existing.values()) or settings.backup_timezone
        for name, deployment in existing.items():
            current = _first_cron(deployment)
            preset = name.removeprefix("backup-")
            if off:
                if current is not None:
                    wanted[f"backup/{name}{suffix}"] = {**current, "active": False}
                continue
            if preset in PRESETS:
                cron, active, which = PRESETS[preset], preset in presets, preset
            elif name == "backup-custom" and custom is not None:
                cron, active, which = custom, True, custom
            elif name == "backup-custom" and current is not None:
                cron, active, which = str(current["cron"]), False, str(current["cron"])
            else:
                continue  # without a cron, or one of the inventory's: as it is
            parameters = _parameters(deployment, cron, schedule=which)
            wanted[f"backup/{name}{suffix}"] = _schedule(cron, zone, active, parameters)
    if not families:
        raise DeploymentNotFoundError(
            f"no backup deployment on the Prefect server at {link.shown} (start 'pgkeeper "
            "serve', or 'prefect deploy --all')"
        )
    return wanted


def _one_schedule(
    settings: Settings, link: PrefectLink, deployment: str, value: str, timezone: str | None
) -> dict[str, Spec]:
    found = read_deployment(link, deployment)
    current = _first_cron(found)
    word = value.lower()
    if word in OFF or word == "on":
        if current is None:
            raise UsageError(
                f"deployment {deployment!r} has no schedule to switch {word} (give it a cron: "
                f"pgkeeper schedule set '0 5 * * *' --deployment {deployment.split('/')[-1]})"
            )
        zone = _timezone(timezone, found) or str(current["timezone"])
        return {deployment: {**current, "timezone": zone, "active": word == "on"}}
    cron = validate_cron(value, "the schedule", FLOW_SCHEDULE_HOW_TO_FIX)
    zone = _timezone(timezone, found) or settings.backup_timezone
    base = environment(settings).get(deployment.removesuffix(POOL)) or {}
    parameters = dict((current or base).get("parameters") or {})
    if "schedule" in parameters:  # a backup deployment's runs say which schedule they are
        parameters["schedule"] = cron
    parameters.update(_parameters(found, cron))
    return {deployment: _schedule(cron, zone, True, parameters)}


def requested(
    settings: Settings,
    link: PrefectLink,
    value: str,
    deployment: str | None = None,
    timezone: str | None = None,
) -> dict[str, Spec]:
    """The schedules ``value`` asks for, by ``flow/name`` (see the module docstring).

    Raises ConfigError for a malformed value or timezone, DeploymentNotFoundError when the
    deployment (or any backup deployment) is not on the server, UsageError for ``on``/``off``
    on a deployment without a schedule."""
    text = " ".join(value.split())
    if not text:
        raise UsageError("the schedule is empty (use daily, a cron like '30 1 * * *', or off)")
    if deployment is None:
        return _backup_schedules(settings, link, text, timezone)
    return _one_schedule(settings, link, full_name(settings, deployment), text, timezone)
