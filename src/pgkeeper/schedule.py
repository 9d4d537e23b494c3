"""The deployments' schedules on the Prefect server at run time: show them, set them, and the rule
that decides, when ``serve`` starts, whether the environment's schedule or the server's is kept.

**The rule**, per deployment. ``serve`` remembers, in the Prefect variable
``pgkeeper-schedules-from-environment``, the schedule the environment gave each deployment when
it last applied it. At start it applies the environment's schedule again when

- the deployment does not exist on the server yet, or nothing is remembered for it, or
- the environment now gives it, or any deployment governed by the same settings, a different
  schedule than the one remembered: ``BACKUP_SCHEDULE``, ``BACKUP_ENABLED`` or
  ``BACKUP_TIMEZONE`` changed what they give the backup deployments (all of them are then
  applied: the value picks among them), or a ``BACKUP_*_SCHEDULE`` knob what it gives its
  flow's deployment;

otherwise the schedule on the server stays as it is: an edit made in the Prefect UI, with
``pgkeeper schedule set`` or ``PUT /api/schedule`` wins until the environment's value changes.

A schedule is compared as JSON: ``{"cron", "timezone", "active", "parameters"}`` (the cron's
blanks normalised). This module speaks Prefect's REST API through ``PrefectLink`` and never
imports Prefect; turning a ``BACKUP_SCHEDULE``-style value into schedules needs Prefect's cron
arithmetic and lives in ``deployments/schedule_edits.py``. Raises PrefectUnavailableError (503)
when the server is unreachable, DeploymentNotFoundError (404) for an unknown deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pgkeeper.errors import UsageError
from pgkeeper.prefect_api import PGKEEPER_FLOWS, PrefectLink, PrefectUnavailableError

RECORD_VARIABLE = "pgkeeper-schedules-from-environment"
RULE = (
    "at serve start a deployment gets the environment's schedule again only if that schedule "
    "changed since serve last applied it; until then an edit made on the Prefect server (UI, "
    "'pgkeeper schedule set', PUT /api/schedule) stays"
)

Spec = dict[str, Any]  # one cron schedule: {"cron", "timezone", "active", "parameters"}


class DeploymentNotFoundError(UsageError):
    """No deployment of that name on the Prefect server."""

    http_status = 404


def normalise(spec: Spec | None) -> Spec | None:
    """A schedule in the form the rule compares (blanks in the cron collapsed)."""
    if spec is None:
        return None
    return {
        "cron": " ".join(str(spec.get("cron", "")).split()),
        "timezone": spec.get("timezone") or "UTC",
        "active": bool(spec.get("active", True)),
        "parameters": dict(spec.get("parameters") or {}),
    }


def from_server(entry: dict[str, Any]) -> Spec:
    """One schedule of a deployment as the server lists it, in the rule's form. An interval or
    rrule schedule (made in the UI) keeps its own key instead of ``cron``."""
    schedule = entry.get("schedule") or {}
    spec: Spec = {
        "timezone": schedule.get("timezone") or "UTC",
        "active": bool(entry.get("active", True)),
        "parameters": dict(entry.get("parameters") or {}),
    }
    if "cron" in schedule:
        spec["cron"] = " ".join(str(schedule["cron"]).split())
    elif "interval" in schedule:
        spec["interval"] = schedule["interval"]
    elif "rrule" in schedule:
        spec["rrule"] = schedule["rrule"]
    return {key: spec[key] for key in ("cron", "interval", "rrule", "timezone", "active",
                                       "parameters") if key in spec}  # fmt: skip


def describe(spec: Spec | None) -> str:
    """``0 2 * * * UTC, active`` / ``none``: one schedule in a few words."""
    if spec is None:
        return "none"
    when = spec.get("cron") or (
        f"every {spec['interval']}s" if "interval" in spec else spec.get("rrule", "?")
    )
    return f"{when} {spec.get('timezone', 'UTC')}, {'active' if spec.get('active') else 'inactive'}"


@dataclass(frozen=True)
class Decision:
    """What serve does with one deployment's schedule at start, and why (for its log)."""

    deployment: str  # flow/name
    keep_server: bool
    reason: str


def decide(
    deployment: str,
    environment: dict[str, Spec | None],
    record: dict[str, Spec | None] | None,
    on_server: dict[str, Any] | None,
) -> Decision:
    """The rule (see the module docstring): keep the server's schedules of ``deployment``, or
    apply the environment's?

    ``environment``: what the environment gives ``deployment`` and the deployments governed by
    the same settings (every backup deployment: BACKUP_SCHEDULE picks among them), by
    ``flow/name``; ``record``: what serve remembered (None: nothing at all); ``on_server``: the
    deployment as the server has it (None: not there). Changing BACKUP_SCHEDULE from daily to
    weekly thus applies the environment to every backup deployment, the hourly one included.
    """
    if on_server is None:
        return Decision(deployment, False, "new deployment: the environment's schedule")
    if record is None or any(name not in record for name in environment):
        return Decision(deployment, False, "no record of the environment's last schedule")
    if any(normalise(record[name]) != normalise(spec) for name, spec in environment.items()):
        return Decision(deployment, False, "the environment's schedule changed since applied")
    return Decision(deployment, True, "the environment's schedule is unchanged since applied")


def server_specs(deployment: dict[str, Any]) -> list[Spec]:
    return [from_server(s) for s in deployment.get("schedules") or [] if isinstance(s, dict)]


# --- the record -----------------------------------------------------------------------------


def read_record(link: PrefectLink) -> dict[str, Spec | None] | None:
    """What serve last applied from the environment, per deployment; None when never recorded
    (or the variable was deleted, or holds something else)."""
    variable = link.request("GET", f"/variables/name/{RECORD_VARIABLE}")
    value = variable.get("value") if isinstance(variable, dict) else None
    if not isinstance(value, dict):
        return None
    return {str(k): v if isinstance(v, dict) else None for k, v in value.items()}


def write_record(link: PrefectLink, record: dict[str, Spec | None]) -> None:
    """Remember what the environment gave each deployment (serve calls it once registered)."""
    value = {name: normalise(spec) for name, spec in record.items()}
    if link.request("GET", f"/variables/name/{RECORD_VARIABLE}") is None:
        link.request(
            "POST", "/variables/", {"name": RECORD_VARIABLE, "value": value, "tags": ["pgkeeper"]}
        )
    else:
        link.request("PATCH", f"/variables/name/{RECORD_VARIABLE}", {"value": value})


# --- show ----------------------------------------------------------------------------------------


@dataclass
class DeploymentSchedule:
    """One pgkeeper deployment's schedules on the server, beside what the environment gave it."""

    deployment: str  # flow/name
    paused: bool
    schedules: list[Spec]
    environment: Spec | None = None  # what serve last applied from the environment
    managed: bool = False  # serve applies the rule to it (a -pool deployment: prefect deploy)

    @property
    def edited(self) -> bool | None:
        """The server's schedule differs from the environment's (kept until that changes)."""
        if not self.managed:
            return None
        current = [normalise(s) if "cron" in s else s for s in self.schedules]
        wanted = [] if self.environment is None else [normalise(self.environment)]
        return current != wanted

    @property
    def source(self) -> str:
        if not self.managed:
            return "prefect deploy (prefect.yaml)" if self.deployment.endswith("-pool") else "-"
        return "edited on the server" if self.edited else "environment"

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "paused": self.paused,
            "schedules": self.schedules,
            "environment": normalise(self.environment) if self.managed else None,
            "edited": self.edited,
            "source": self.source,
        }


@dataclass
class ScheduleReport:
    deployments: list[DeploymentSchedule] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def find(self, deployment: str) -> DeploymentSchedule | None:
        return next((d for d in self.deployments if d.deployment == deployment), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": RULE,
            "deployments": [d.to_dict() for d in self.deployments],
            "changed": self.changed,
        }

    def as_table(self) -> list[dict[str, str]]:
        rows = []
        for d in self.deployments:
            shown = [describe(s) for s in d.schedules] or ["none"]
            rows.append(
                {
                    "deployment": d.deployment + (" (paused)" if d.paused else ""),
                    "schedule": "; ".join(shown),
                    "environment's": describe(d.environment) if d.managed else "-",
                    "source": d.source,
                }
            )
        return rows


_FLOWS = ["backup", "verify", "upload", "rotate", "restore", "restore-test", "monitor"]
_BACKUPS = ["hourly", "daily", "weekly", "monthly", "custom"]


def _order(name: str) -> tuple[int, int, str]:
    """The order serve registers them in (the UI's): flows, then backups by frequency."""
    flow, _, deployment = name.partition("/")
    preset = deployment.removeprefix("backup-").removesuffix("-pool")
    return (
        _FLOWS.index(flow) if flow in _FLOWS else len(_FLOWS),
        _BACKUPS.index(preset) if flow == "backup" and preset in _BACKUPS else len(_BACKUPS),
        name,
    )


def show(link: PrefectLink) -> ScheduleReport:
    """Every pgkeeper deployment on the server with its schedules and the environment's."""
    record = read_record(link) or {}
    found: list[DeploymentSchedule] = []
    for flow in sorted(PGKEEPER_FLOWS):
        for deployment in link.deployments_of(flow):
            name = f"{flow}/{deployment.get('name')}"
            found.append(
                DeploymentSchedule(
                    deployment=name,
                    paused=bool(deployment.get("paused")),
                    schedules=server_specs(deployment),
                    environment=record.get(name),
                    managed=name in record,
                )
            )
    if not found:
        raise DeploymentNotFoundError(
            f"no pgkeeper deployment on the Prefect server at {link.shown} (start "
            "'pgkeeper serve', or 'prefect deploy --all')"
        )
    found.sort(key=lambda d: _order(d.deployment))
    return ScheduleReport(found)


# --- set -----------------------------------------------------------------------------------------


def read_deployment(link: PrefectLink, deployment: str) -> dict[str, Any]:
    """A deployment (``flow/name``) as the server has it; DeploymentNotFoundError if none."""
    flow, _, name = deployment.partition("/")
    found = link.request("GET", f"/deployments/name/{flow}/{name}") if name else None
    if not isinstance(found, dict):
        raise DeploymentNotFoundError(
            f"no deployment {deployment!r} on the Prefect server at {link.shown} (see "
            "'pgkeeper schedule show')"
        )
    return found


def _body(spec: Spec) -> dict[str, Any]:
    return {
        "schedule": {"cron": spec["cron"], "timezone": spec["timezone"]},
        "active": spec["active"],
        "parameters": spec.get("parameters") or {},
    }


def apply(link: PrefectLink, wanted: dict[str, Spec]) -> list[str]:
    """Give each deployment (``flow/name``) exactly the one schedule ``wanted`` says: its first
    schedule is updated in place, any other one deleted (none: one is created). Every
    deployment is read before any is changed, so an unknown name changes nothing. Returns the
    deployments whose schedule changed."""
    current = {name: read_deployment(link, name) for name in wanted}
    changed = []
    for name, spec in wanted.items():
        deployment = current[name]
        spec = normalise(spec) or {}
        if [normalise(s) for s in server_specs(deployment)] == [spec]:
            continue
        schedules = [s for s in deployment.get("schedules") or [] if isinstance(s, dict)]
        base = f"/deployments/{deployment['id']}/schedules"
        if schedules:
            link.request("PATCH", f"{base}/{schedules[0]['id']}", _body(spec))
            for extra in schedules[1:]:
                link.request("DELETE", f"{base}/{extra['id']}")
        else:
            link.request("POST", base, [_body(spec)])
        changed.append(name)
    return changed


def set_schedules(link: PrefectLink, wanted: dict[str, Spec]) -> ScheduleReport:
    """``apply``, then the report ``show`` gives, with what changed."""
    changed = apply(link, wanted)
    report = show(link)
    report.changed = changed
    return report


__all__ = [
    "RECORD_VARIABLE",
    "RULE",
    "Decision",
    "DeploymentNotFoundError",
    "DeploymentSchedule",
    "PrefectUnavailableError",
    "ScheduleReport",
    "apply",
    "decide",
    "read_record",
    "set_schedules",
    "show",
    "write_record",
]
