"""``pgkeeper alerts install``: the notification block and automations on the Prefect server.

Idempotent (run by ``pgkeeper serve`` at start, by ``make demo``, by hand after ``prefect
deploy``): each object is found by name and updated, or created. What it installs, visible and
editable under *Blocks* and *Automations* in the UI:

  block      pgkeeper-alerts         a ``pgkeeper-notification`` block: BACKUP_NOTIFY_URLS
  automation pgkeeper-alerts         delivers every ``pgkeeper.alert`` event pgkeeper emits
                                     (already de-duplicated and grouped by pgkeeper)
  automation pgkeeper-dead-man       Proactive: no ``pgkeeper.backup.verified`` event for a
                                     database within BACKUP_MAX_AGE. The server evaluates it,
                                     so it fires with every pgkeeper process and worker dead
  automation pgkeeper-run-crashed    a pgkeeper flow run crashed (killed, out of memory): its
                                     own process could not tell anyone
  automation pgkeeper-unresponsive-runs
                                     Proactive: a pgkeeper flow run whose heartbeats stopped
                                     (its worker's machine died, the process was SIGKILLed) is
                                     marked Crashed, which frees its deployment's concurrency
                                     slot and tells pgkeeper-run-crashed. Installed even without
                                     BACKUP_NOTIFY_URLS: it needs no block

Without that last automation nothing marks such a run: a process worker that dies with its flow
run leaves it Running in the API for good (FIELD-NOTES), and the fleet run waiting on it waits
until its timeout. Flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds
(Prefect's default 180); a run is unresponsive after three missed ones, as the installing
process reads that setting: give it the value the workers have.

The server must be able to import pgkeeper's block class (``deployments/blocks.py``): it can
when it runs from pgkeeper's environment (``make demo``, ``prefect server start`` from the
venv), since the block is a Prefect collection registered at server start. Otherwise nothing
is installed and the report says why; pgkeeper's processes then deliver alerts themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import SecretStr

from deployments.blocks import BLOCK_TYPE_SLUG, PgkeeperNotification
from deployments.schedules import backup_interval
from pgkeeper import notify
from pgkeeper.alerts import ALERT_EVENT, AUTOMATION
from pgkeeper.monitor import expectations
from pgkeeper.redaction import secrets_of
from pgkeeper.retention import format_duration
from pgkeeper.settings import Settings

BLOCK_NAME = "pgkeeper-alerts"
DEAD_MAN = "pgkeeper-dead-man"
CRASHED = "pgkeeper-run-crashed"
UNRESPONSIVE = "pgkeeper-unresponsive-runs"
MISSED_HEARTBEATS = 3  # heartbeats a run may miss before the server marks it Crashed
TAG = "pgkeeper"  # every pgkeeper deployment carries it (deployments/serve.py, prefect.yaml)


@dataclass
class InstallReport:
    """What was installed (one line each), or the one problem that stopped it."""

    lines: list[str] = field(default_factory=list)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def dead_man_age(settings: Settings) -> timedelta | None:
    """BACKUP_MAX_AGE, or the backup schedule's longest gap + 1 h; None: nothing scheduled."""
    interval = None if settings.backup_max_age else backup_interval(settings)
    return expectations(settings, interval).max_backup_age


def unresponsive_after() -> timedelta | None:
    """How long a pgkeeper flow run may send no heartbeat before it is marked Crashed: three
    of Prefect's heartbeat periods, as this process's Prefect settings say; None when
    heartbeats are off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY unset to null)."""
    from prefect.settings import get_current_settings

    frequency: int | None = get_current_settings().flows.heartbeat_frequency
    if frequency is None:
        return None
    return timedelta(seconds=max(frequency, 30) * MISSED_HEARTBEATS)  # Prefect's floor: 30 s


def unresponsive_runs(after: timedelta) -> object:
    """The automation that marks a silent pgkeeper flow run Crashed (Prefect's documented
    zombie-flow pattern, limited to runs tagged ``pgkeeper``): after a heartbeat, the run must
    send another one or end within ``after``."""
    from prefect.automations import EventTrigger, Posture
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore as Automation

    heartbeat = "prefect.flow-run.heartbeat"
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    seconds = int(after.total_seconds())
    return Automation(
        name=UNRESPONSIVE,
        description=(
            f"A pgkeeper flow run that sent no heartbeat for {seconds} s is marked Crashed: "
            "its process or machine died without telling anyone."
        ),
        trigger=EventTrigger(
            after={heartbeat},
            expect={heartbeat, *ends},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.id": f"prefect.tag.{TAG}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=after,
        ),
        actions=[
            ChangeFlowRunState(
                name=None,
                force=False,
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {seconds} s: the process running this flow run (or its "
                    "machine) died; a backup it was writing has no manifest and is removed by "
                    "the next backup of that database"
                ),
            )
        ],
    )


def automations(settings: Settings, block_id: object) -> list[object]:
    """The automations to install, as Prefect ``AutomationCore`` objects (what the client's
    create and update calls take)."""
    from prefect.automations import EventTrigger, Posture, SendNotification
    from prefect.events.schemas.automations import AutomationCore as Automation

    alert = Automation(
        name=AUTOMATION,
        description="Delivers pgkeeper's alerts (de-duplicated and grouped by pgkeeper).",
        trigger=EventTrigger(
            expect={ALERT_EVENT},
            match={"prefect.resource.id": "pgkeeper.alerts"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="{{ event.payload.subject }}",
                body="{{ event.payload.body }}",
            )
        ],
    )
    crashed = Automation(
        name=CRASHED,
        description="A pgkeeper flow run crashed: its process died before it could tell anyone.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match_related={"prefect.resource.id": f"prefect.tag.{TAG}"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[
            SendNotification(
                block_document_id=block_id,
                subject="pgkeeper: {{ flow.name }} run {{ flow_run.name }} crashed",
                body=(
                    "The {{ flow.name }} run {{ flow_run.name }} crashed: "
                    "{{ flow_run.state.message }}\n"
                    "Its process died (killed, out of memory, the machine stopped). Look at the "
                    "run: {{ flow_run|ui_url }}\nthen start it again, or run the same pgkeeper "
                    "command by hand."
                ),
            )
        ],
    )
    found: list[object] = [alert, crashed]
    max_age = dead_man_age(settings)
    if max_age is not None:
        expected = "pgkeeper.backup.verified"
        age = format_duration(max_age)
        found.append(
            Automation(
                name=DEAD_MAN,
                description=(
                    f"No verified backup of a database for {age}. Evaluated by the Prefect "
                    "server: fires even when every pgkeeper process is down."
                ),
                # A bucket per database opens with each verified backup (after) and must see
                # the next one (expect) within the max age; without `after`, a bucket that
                # saw its one expected event would be dropped as satisfied and never fire.
                trigger=EventTrigger(
                    after={expected},
                    expect={expected},
                    match={"prefect.resource.id": "pgkeeper.database.*"},
                    for_each={"prefect.resource.id"},
                    posture=Posture.Proactive,
                    threshold=1,
                    within=max_age,
                ),
                actions=[
                    SendNotification(
                        block_document_id=block_id,
                        subject=(
                            "pgkeeper: no verified backup for "
                            f"{age}: {{{{ labels['prefect.resource.id']"
                            " | replace('pgkeeper.database.', '') }}"
                        ),
                        body=(
                            f"No verified backup of {{{{ labels['prefect.resource.id'] | "
                            "replace('pgkeeper.database.', '') }}"
                            f" arrived for {age} (BACKUP_MAX_AGE).\n"
                            "The Prefect server noticed: pgkeeper serve, the workers or the "
                            "backups themselves may be down. Check 'pgkeeper monitor' and the "
                            "backup runs in the Prefect UI."
                        ),
                    )
                ],
            )
        )
    return found


def _definition(automation: object) -> dict[str, object]:
    """What an automation does (name, trigger, actions...), without the ids and times the
    server or the trigger's constructor add: two equal definitions need no update."""
    from prefect.events.schemas.automations import AutomationCore

    assert isinstance(automation, AutomationCore)  # noqa: S101 - read or built as one
    data = automation.model_dump(mode="json", include=set(AutomationCore.model_fields))
    trigger = data.get("trigger")
    if isinstance(trigger, dict):
        trigger.pop("id", None)
    return data


def _apply(client: Any, automation: object, report: InstallReport) -> None:
    """Create ``automation``, update it in place, or leave an identical one alone."""
    from prefect.events.schemas.automations import AutomationCore

    assert isinstance(automation, AutomationCore)  # noqa: S101 - built here
    existing = client.read_automations_by_name(automation.name)
    for extra in existing[1:]:  # an earlier race made two: keep one
        client.delete_automation(extra.id)
    if existing and _definition(existing[0]) == _definition(automation):
        # Left alone, not rewritten: an update restarts a Proactive trigger's
        # per-database buckets, and a database whose backups are broken would then
        # never open one again (every restart of serve would blind the dead-man).
        report.lines.append(f"automation {automation.name}: unchanged")
    elif existing:
        client.update_automation(existing[0].id, automation)
        report.lines.append(f"automation {automation.name}: updated")
    else:
        client.create_automation(automation)
        report.lines.append(f"automation {automation.name}: created")


def install(settings: Settings) -> InstallReport:
    """Create or update the block and automations; see the module docstring."""
    channels = notify.channels(settings, secrets_of(settings))  # a bad URL: ConfigError now
    report = InstallReport()
    no_channels = (
        "BACKUP_NOTIFY_URLS is not set: nothing to deliver to (set it to one or more "
        "Apprise URLs, e.g. mailtos://user:pass@smtp.example.com?to=ops@example.com)"
    )
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not channels and not PREFECT_API_URL.value():
        report.problem = no_channels  # no server to install crash detection on either
        return report
    api = PREFECT_API_URL.value() or "(no PREFECT_API_URL)"
    with get_client(sync_client=True) as client:
        silent = unresponsive_after()
        if silent is not None:  # needs no block: installed with or without channels
            _apply(client, unresponsive_runs(silent), report)
        else:
            for stale in client.read_automations_by_name(UNRESPONSIVE):
                client.delete_automation(stale.id)
            report.lines.append(
                f"automation {UNRESPONSIVE}: not installed (flow run heartbeats are off: "
                "set PREFECT_FLOWS_HEARTBEAT_FREQUENCY)"
            )
        if not channels:
            report.problem = no_channels
            return report
        try:
            client.read_block_type_by_slug(BLOCK_TYPE_SLUG)
        except ObjectNotFound:
            report.problem = (
                f"the Prefect server at {api} cannot load pgkeeper's notification block "
                "(it runs where pgkeeper is not installed): start it from pgkeeper's "
                "environment (.venv/bin/prefect server start), or rely on pgkeeper's own "
                "delivery and BACKUP_HEARTBEAT_URL; nothing else was installed"
            )
            return report
        raw = settings.backup_notify_urls.get_secret_value() if settings.backup_notify_urls else ""
        block = PgkeeperNotification(urls=SecretStr(raw), notify_type="failure")
        block_id = block.save(BLOCK_NAME, overwrite=True)
        report.lines.append(f"block {BLOCK_NAME}: {', '.join(channels.shown)}")
        wanted = automations(settings, block_id)
        names = {getattr(a, "name") for a in wanted}  # noqa: B009 - Automation objects
        for automation in wanted:
            _apply(client, automation, report)
        if DEAD_MAN not in names:
            for stale in client.read_automations_by_name(DEAD_MAN):
                client.delete_automation(stale.id)
                report.lines.append(f"automation {DEAD_MAN}: removed (no backup is scheduled)")
    return report
