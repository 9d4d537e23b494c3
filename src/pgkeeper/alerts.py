"""Alerts: turn outcomes and health checks into messages a person gets once per problem.

    outcome of a run  ─┐                         ┌─> Prefect event ``pgkeeper.alert`` (the server's
    (report_outcome)   ├─> problems ─> reconcile ─┤   automation delivers it), when installed
    health checks     ─┘   per database   with the └─> Apprise (notify.send), otherwise
    (report_health)                    alert state

**Problems** are keyed by rule and subject (``backup-failed`` / ``shop on db:5432``,
``quota`` / ``storage and scheduler``). **Reconciling** them with the alert state gives what
changed: a problem not open yet is *opened* (one message), one still there is *ongoing*
(nothing), an open one the evaluation covered and no longer sees is *resolved* (one message).
Everything that changed in one evaluation goes out as **one message**, and problems with the
same rule and cause are one line naming every database: 200 databases failing in one storage
outage are one message, not 200. When they fail in separate runs (each database's own backup
process), the first is told at once and the others, joining its group within GROUP_WINDOW,
are told together by the first evaluation after it: two messages, not 200.

**The alert state** is a small JSON object on the primary storage target (``_pgkeeper/
alerts.json``, outside the backup-id key space, so the catalog, rotation and upload never see
it). Every door that evaluates shares it: a cron ``pgkeeper backup``/``pgkeeper monitor`` and
the Prefect flows see the same open alerts, so the same problem is not told twice when both
paths are active. When the primary cannot be read (the outage itself) a local copy
(``$XDG_STATE_HOME/pgkeeper``) stands in. An alert whose delivery failed stays marked
undelivered and goes out with the next evaluation. Two evaluations in the same instant may
both open the same problem (the state is read, then written): at worst one duplicate.

**Routing.** When a Prefect server is configured and has pgkeeper's ``pgkeeper-alerts``
automation (``pgkeeper alerts install``), the message is emitted as a Prefect event and the
server delivers it (visible and editable under *Automations*); then the server's proactive
dead-man automation also owns staleness, so the ``freshness`` rule is recorded but not sent
twice. Without a server, or when it does not answer, the process delivers with Apprise itself.
Lifecycle events (``pgkeeper.backup.verified``, ``pgkeeper.<operation>.failed``, the database
as resource ``pgkeeper.database.<db>@<host:port>``) feed the dead-man automation and are there
for automations of your own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pgkeeper import notify, tracking
from pgkeeper.errors import PgkeeperError, StorageError
from pgkeeper.manifest import Manifest, utcnow
from pgkeeper.monitor import MonitorReport, subject_of
from pgkeeper.notify import Channels, Message
from pgkeeper.prefect_api import PrefectLink, PrefectUnavailableError
from pgkeeper.redaction import redact, secrets_of
from pgkeeper.retention import format_size
from pgkeeper.settings import Settings
from pgkeeper.storage.base import Storage, get_bytes, put_bytes

__all__ = [
    "STATE_KEY",
    "AlertState",
    "Changes",
    "Problem",
    "RunOutcome",
    "compose",
    "problems_of",
    "reconcile",
    "report_health",
    "report_outcome",
    "report_outcomes",
    "watch",
]

log = logging.getLogger(__name__)

STATE_KEY = "_pgkeeper/alerts.json"  # never a backup id: ids start with a letter or digit
AUTOMATION = "pgkeeper-alerts"  # the server-side automation that delivers pgkeeper.alert events
ALERT_EVENT = "pgkeeper.alert"
MAX_LINES = 20  # databases named per line of a grouped message; the rest are counted
OPERATIONS = ("backup", "verify", "upload", "rotate", "restore", "restore-test", "monitor")
# Problems that follow from another one on the same subject: told by the first alone.
CONSEQUENCES = {"backup-failed": frozenset({"freshness", "verified", "size"})}
# A problem with the same rule and cause as one told less than this ago (another database's
# backup failing in the same storage outage, reported by its own process) is held back and
# told with every other one that joined, in one grouped message, by the first evaluation
# after the window (the next backup's report or the monitor): 200 separate failures of one
# outage are two messages, the first at once, not 200.
GROUP_WINDOW = timedelta(minutes=10)


# -- problems and the state ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something wrong that a person must hear about once: rule, subject, one-line detail."""

    rule: str
    subject: str
    detail: str

    @property
    def key(self) -> str:
        return f"{self.rule}|{self.subject}"


@dataclass(frozen=True)
class Scope:
    """What one evaluation looked at: an open alert outside it is neither ongoing nor resolved
    by it (a backup of one database says nothing about another's quota)."""

    rules: frozenset[str]
    subjects: frozenset[str] | None = None  # None: every subject

    def covers(self, rule: str, subject: str) -> bool:
        return rule in self.rules and (self.subjects is None or subject in self.subjects)


@dataclass
class OpenAlert:
    rule: str
    subject: str
    detail: str
    opened_at: str
    delivered: bool = False
    silent: bool = False  # told by another alert (a consequence, or the Prefect dead-man)
    held_until: str | None = None  # joined a just-told group: told with the others after this

    @property
    def problem(self) -> Problem:
        return Problem(self.rule, self.subject, self.detail)


@dataclass
class AlertState:
    """The open alerts, by key; and resolutions whose message has not gone out yet."""

    open: dict[str, OpenAlert] = field(default_factory=dict)
    unsent_resolved: list[Problem] = field(default_factory=list)

    def to_json(self) -> bytes:
        body = {
            "version": 1,
            "open": {k: vars(a) for k, a in sorted(self.open.items())},
            "unsent_resolved": [vars(p) for p in self.unsent_resolved],
        }
        return json.dumps(body, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> AlertState:
        data = json.loads(raw)
        return cls(
            open={k: OpenAlert(**v) for k, v in data.get("open", {}).items()},
            unsent_resolved=[Problem(**p) for p in data.get("unsent_resolved", [])],
        )


@dataclass
class Changes:
    """What one evaluation changed: problems to tell, resolutions to tell, what is ongoing."""

    opened: list[Problem] = field(default_factory=list)
    resolved: list[Problem] = field(default_factory=list)
    ongoing: list[Problem] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.opened or self.resolved)


def reconcile(
    state: AlertState,
    scope: Scope,
    problems: Iterable[Problem],
    now: datetime,
    silent_rules: frozenset[str] = frozenset(),
) -> Changes:
    """Update ``state`` with what an evaluation of ``scope`` found; return what to tell.

    New problems open (silent ones, consequences or ``silent_rules``, are recorded as told);
    open problems of the scope that are gone resolve (silently when they were silent); open
    alerts never delivered are told again. Pure apart from mutating ``state``.
    """
    found = {p.key: p for p in problems}
    changes = Changes()
    opened_keys = {k for k, a in state.open.items() if not a.silent} | set(found)
    for key, problem in found.items():
        causes = [r for r, follow in CONSEQUENCES.items() if problem.rule in follow]
        consequence = any(f"{cause}|{problem.subject}" in opened_keys for cause in causes)
        alert = state.open.get(key)
        if alert is None:
            silent = consequence or problem.rule in silent_rules
            held = None if silent else _join_window(state, problem, now)
            state.open[key] = OpenAlert(
                problem.rule, problem.subject, problem.detail, now.isoformat(), silent, silent,
                held,
            )  # fmt: skip
            if not silent and held is None:
                changes.opened.append(problem)
        else:
            alert.detail = problem.detail
            if alert.delivered:
                changes.ongoing.append(problem)
            elif not _held(alert, now):
                changes.opened.append(problem)
    for key, alert in list(state.open.items()):
        if key in found or not scope.covers(alert.rule, alert.subject):
            retell = key not in found and not alert.delivered and not alert.silent
            if retell and not _held(alert, now):  # its delivery failed, or its group is due
                changes.opened.append(alert.problem)
            continue
        del state.open[key]
        if alert.delivered and not alert.silent:
            changes.resolved.append(alert.problem)
    changes.resolved += state.unsent_resolved
    state.unsent_resolved = []
    return changes


def _group_key(problem: Problem) -> tuple[str, str]:
    return problem.rule, re.sub(r"\d+(\.\d+)?", "#", _cause(problem))


def _held(alert: OpenAlert, now: datetime) -> bool:
    return alert.held_until is not None and datetime.fromisoformat(alert.held_until) > now


def _join_window(state: AlertState, problem: Problem, now: datetime) -> str | None:
    """When an alert with the same rule and cause on another subject was told (or held)
    within GROUP_WINDOW, the time until which ``problem`` waits to be told with its group."""
    group = _group_key(problem)
    for other in state.open.values():
        if other.silent or other.subject == problem.subject or _group_key(other.problem) != group:
            continue
        if other.held_until is not None:
            return other.held_until
        opened = datetime.fromisoformat(other.opened_at)
        if other.delivered and now - opened < GROUP_WINDOW:
            return (opened + GROUP_WINDOW).isoformat()
    return None


def mark_delivered(state: AlertState, changes: Changes, delivered: bool) -> None:
    """Record the outcome of telling ``changes``: undelivered ones are told next time."""
    for problem in changes.opened:
        alert = state.open.get(problem.key)
        if alert is not None:
            alert.delivered = delivered
    if not delivered:
        state.unsent_resolved = list(changes.resolved)


# -- where the state lives ----------------------------------------------------------------------


def _local_copy(primary: Storage) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(primary.url.encode()).hexdigest()[:16]
    return base / "pgkeeper" / f"alerts-{digest}.json"


def load_state(primary: Storage) -> AlertState:
    """The alert state from the primary target (or its local stand-in when the target cannot
    be read). A missing or unreadable state is an empty one: at worst an alert is told again."""
    try:
        if primary.stat(STATE_KEY) is None:
            return AlertState()
        return AlertState.from_json(get_bytes(primary, STATE_KEY))
    except StorageError as exc:
        log.warning("alert state unreadable on %s (%s): using the local copy", primary.url, exc)
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("alert state on %s is malformed (%s): starting afresh", primary.url, exc)
        return AlertState()
    try:
        return AlertState.from_json(_local_copy(primary).read_bytes())
    except (OSError, ValueError, TypeError, KeyError):
        return AlertState()


def save_state(primary: Storage, state: AlertState) -> None:
    """Write the alert state to the primary target and its local copy; never raises."""
    data = state.to_json()
    try:
        put_bytes(primary, STATE_KEY, data)
    except StorageError as exc:
        log.warning("alert state not saved on %s (%s): kept locally", primary.url, exc)
    try:
        local = _local_copy(primary)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(local)
    except OSError as exc:
        log.debug("local alert state not saved: %s", exc)


# -- messages -----------------------------------------------------------------------------------

_RULE_TITLE = {
    "backup-failed": "backup failed",
    "verify-failed": "verification failed",
    "upload-failed": "upload failed",
    "rotate-failed": "rotation failed",
    "restore-failed": "restore failed",
    "restore-test-failed": "restore test failed",
    "monitor-failed": "health check failed",
    "freshness": "no recent verified backup",
    "verified": "newest backup not verified",
    "size": "backup size",
    "restore-test": "restore test",
    "offsite": "offsite copy missing",
    "usage": "storage usage",
    "quota": "storage quota",
    "disk": "disk space",
    "storage": "storage unreachable",
    "scheduler": "nothing runs the schedules",
    "inventory": "databases not found",
}


def _title(rule: str) -> str:
    return _RULE_TITLE.get(rule, rule)


_BACKUP_ID = re.compile(r"\b[A-Za-z0-9][A-Za-z0-9_-]{0,62}_\d{4}-\d\d-\d\dT[\d.-]+Z\b")


def _cause(problem: Problem) -> str:
    """The detail with the database's own name (also inside backup ids) and its backup ids
    taken out, so one outage's problems read the same and group together."""
    name = problem.subject.split(" on ", 1)[0]
    text = problem.detail.replace(problem.subject, "<database>")
    text = _BACKUP_ID.sub("<backup>", text)
    return text.replace(name, "<database>") if len(name) >= 3 else text


def _grouped(problems: Sequence[Problem]) -> list[str]:
    """One line per rule and cause, naming every subject it hit (the first MAX_LINES). Numbers
    do not split a group (2d ago, 47h ago); the line shows the first member's wording."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        key = _group_key(problem)
        groups.setdefault(key, []).append(problem)
    lines = []
    for (rule, _), members in groups.items():
        if len(members) == 1:
            lines.append(f"- {_title(rule)}: {members[0].subject}: {members[0].detail}")
            continue
        names = ", ".join(m.subject for m in members[:MAX_LINES])
        more = f" and {len(members) - MAX_LINES} more" if len(members) > MAX_LINES else ""
        cause = _cause(members[0])
        lines.append(f"- {_title(rule)} for {len(members)} databases ({names}{more}): {cause}")
    return lines


def compose(changes: Changes, *, success: str | None = None, link: str | None = None) -> Message:
    """The one message telling ``changes`` (and a success note, when one is asked for)."""
    opened, resolved = changes.opened, changes.resolved
    subjects = {p.subject for p in opened}
    if opened:
        kind: notify.Kind = "failure"
        first = opened[0]
        if len(opened) == 1:
            subject = f"pgkeeper: {_title(first.rule)}: {first.subject}"
        elif len(subjects) == 1:
            subject = f"pgkeeper: {len(opened)} problems: {first.subject}"
        else:
            rules = sorted({_title(p.rule) for p in opened})
            subject = f"pgkeeper: {len(opened)} problems on {len(subjects)} subjects: " + ", ".join(
                rules[:3]
            )
    elif resolved:
        kind = "resolved"
        if len(resolved) == 1:
            subject = f"pgkeeper: resolved: {_title(resolved[0].rule)}: {resolved[0].subject}"
        else:
            subject = f"pgkeeper: {len(resolved)} problems resolved"
    else:
        kind = "success"
        subject = f"pgkeeper: {success or 'all good'}"
    body: list[str] = []
    if opened:
        body += ["PROBLEMS", *_grouped(opened), ""]
    if resolved:
        body += ["RESOLVED", *_grouped(resolved), ""]
    if success:
        body += [success, ""]
    if changes.ongoing:
        body += [f"still open: {len(changes.ongoing)} earlier problem(s)", ""]
    if link:
        body.append(f"details: {link}")
    body.append("status: pgkeeper monitor (or the monitor-report artifact in the Prefect UI)")
    return Message(subject, "\n".join(body).strip(), kind)


# -- routing ------------------------------------------------------------------------------------


@dataclass
class Route:
    """Where messages go: the Prefect server (its automation delivers) or Apprise from here."""

    channels: Channels
    prefect: PrefectLink
    via_prefect: bool

    @classmethod
    def of(cls, settings: Settings, prefect: PrefectLink | None = None) -> Route:
        """Look the route up: the Prefect server when it answers and has the automation."""
        channels = notify.channels(settings, secrets_of(settings))
        link = prefect or PrefectLink.from_environment()
        via = False
        if link.api_url:
            try:
                via = link.automation_enabled(AUTOMATION)
            except PrefectUnavailableError as exc:
                log.info("alerts go out directly: %s", exc.message)
        return cls(channels, link, via)

    def deliver(self, message: Message, related: Sequence[str] = ()) -> bool:
        """Send one message; True when it went out (to the server, or to every channel)."""
        secrets = self.channels.secrets
        if self.via_prefect:
            payload = {
                "subject": redact(message.subject, secrets),
                "body": redact(message.body, secrets),
                "kind": message.kind,
            }
            event = _event(ALERT_EVENT, "pgkeeper.alerts", "pgkeeper alerts", payload, related)
            try:
                self.prefect.emit([event])
                return True
            except PrefectUnavailableError as exc:
                log.warning("alert not handed to Prefect (%s): sending it directly", exc.message)
        if not self.channels:
            log.warning("alert not sent (BACKUP_NOTIFY_URLS is not set): %s", message.subject)
            return False
        return notify.send(self.channels, message)


def database_resource(database: str, server: str) -> str:
    """The Prefect resource id of a database: ``pgkeeper.database.shop@db.internal:5432``."""
    return f"pgkeeper.database.{database}@{server}"


def _event(
    name: str, resource: str, label: str, payload: dict[str, Any], related: Sequence[str] = ()
) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "occurred": utcnow().isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": resource, "prefect.resource.name": label},
        "related": [
            {"prefect.resource.id": r, "prefect.resource.role": "database"} for r in related[:50]
        ],
        "payload": payload,
    }


EVENTS_PER_POST = 200  # a fleet run's events go in a few requests, not two per database


def _emit_lifecycle(
    link: PrefectLink,
    name: str,
    database: str,
    server: str,
    payload: dict[str, Any],
    batch: list[dict[str, Any]] | None = None,
) -> None:
    """Send one of pgkeeper's events now, or add it to ``batch`` (see ``_emit_batch``)."""
    if not link.api_url:
        return
    event = _event(name, database_resource(database, server), database, payload)
    if batch is not None:
        batch.append(event)
        return
    try:
        link.emit([event])
    except PrefectUnavailableError as exc:
        log.info("event %s not sent: %s", name, exc.message)


def _emit_batch(link: PrefectLink, events: list[dict[str, Any]]) -> None:
    """Send events EVENTS_PER_POST at a time (one request each took ~0.15 s per event on a
    loaded server: minutes at the end of a fleet run of a thousand databases)."""
    for start in range(0, len(events), EVENTS_PER_POST):
        try:
            link.emit(events[start : start + EVENTS_PER_POST])
        except PrefectUnavailableError as exc:
            log.info("%d events not sent: %s", len(events) - start, exc.message)
            return


# -- the two entry points -----------------------------------------------------------------------


def _tell(
    settings: Settings,
    primary: Storage,
    scope: Scope,
    problems: Sequence[Problem],
    *,
    success: str | None = None,
    link: str | None = None,
    route: Route | None = None,
) -> bool:
    """Reconcile, compose, deliver, record; True when nothing needed telling or it went out."""
    route = route or Route.of(settings)
    if not route.channels and not route.via_prefect:
        return True  # no alerts configured: nothing to tell, no state to keep
    silent = frozenset({"freshness"}) if route.via_prefect else frozenset()
    state = load_state(primary)
    changes = reconcile(state, scope, problems, utcnow(), silent)
    wants_success = success is not None and settings.backup_notify_on in ("success", "all")
    delivered = True
    if changes or wants_success:
        message = compose(changes, success=success if wants_success else None, link=link)
        related = sorted({p.subject for p in changes.opened + changes.resolved})
        delivered = route.deliver(message, [_resource_of(s) for s in related])
        mark_delivered(state, changes, delivered)
    if changes or state.open or primary.stat(STATE_KEY) is not None:
        save_state(primary, state)
    return delivered


def _resource_of(subject: str) -> str:
    database, _, server = subject.partition(" on ")
    return database_resource(database, server) if server else f"pgkeeper.{subject}"


def report_outcome(
    settings: Settings,
    primary: Storage,
    operation: str,
    *,
    database: str,
    server: str,
    error: BaseException | str | None = None,
    manifest: Manifest | None = None,
    link: str | None = None,
    route: Route | None = None,
) -> bool:
    """Tell the outcome of one run of ``operation`` on a database: a failure opens (or keeps)
    the ``<operation>-failed`` alert, a success resolves it; a verified backup is news only
    with BACKUP_NOTIFY_ON=success|all. Also pings the heartbeat (backups), captures the failure
    in Sentry, and emits ``pgkeeper.<operation>.failed`` / ``pgkeeper.backup.verified``.

    Returns whether the message (if any) went out. Never raises: telling must not change the
    outcome it tells about (a delivery failure is one warning line).
    """
    try:
        return _report_outcome(
            settings, primary, operation, database, server, error, manifest, link, route
        )
    except PgkeeperError as exc:  # a bad setting, the state unwritable: say so, go on
        log.warning("alert for %s of %s not sent: %s", operation, database, exc.message)
    except Exception as exc:  # a bug here must never turn a good backup into a failed one
        log.warning("alert for %s of %s not sent: %s: %s", operation, database,
                    type(exc).__name__, redact(str(exc), secrets_of(settings)))  # fmt: skip
    return False


def _report_outcome(
    settings: Settings,
    primary: Storage,
    operation: str,
    database: str,
    server: str,
    error: BaseException | str | None,
    manifest: Manifest | None,
    link: str | None,
    route: Route | None,
) -> bool:
    secrets = secrets_of(settings)
    subject = subject_of(database, server)
    route = route or Route.of(settings)
    if operation == "backup":
        notify.heartbeat(settings, "fail" if error is not None else "success")
    if error is not None:
        text = error if isinstance(error, str) else (str(error) or type(error).__name__)
        detail = redact(text.strip().splitlines()[0] if text.strip() else "failed", secrets)
        if isinstance(error, BaseException):
            tracking.capture(settings, error, operation=operation, database=subject)
        _emit_lifecycle(route.prefect, f"pgkeeper.{operation}.failed", database, server,
                        {"error": detail, "server": server})  # fmt: skip
        problems = [Problem(f"{operation}-failed", subject, _what_to_do(operation, detail))]
        success = None
    else:
        problems = []
        success = None
        if manifest is not None:
            payload = {"backup_id": manifest.id, "size": manifest.size, "server": server}
            _emit_lifecycle(route.prefect, f"pgkeeper.{operation}.completed", database, server,
                            payload)  # fmt: skip
            if operation == "backup" and (manifest.verified or settings.backup_verify == "off"):
                _emit_lifecycle(route.prefect, "pgkeeper.backup.verified", database, server,
                                payload)  # fmt: skip
                took = (manifest.finished_at - manifest.started_at).total_seconds()
                success = (
                    f"backup {manifest.id} of {subject} is {manifest.state} "
                    f"({format_size(manifest.size)}, {took:.0f}s)"
                )
    scope = Scope(frozenset({f"{operation}-failed"}), frozenset({subject}))
    return _tell(settings, primary, scope, problems, success=success, link=link, route=route)


@dataclass(frozen=True)
class RunOutcome:
    """How one database's run of an operation ended: an error, or the backup it made."""

    database: str
    server: str
    error: BaseException | str | None = None
    manifest: Manifest | None = None


def report_outcomes(
    settings: Settings,
    primary: Storage,
    operation: str,
    outcomes: Sequence[RunOutcome],
    *,
    link: str | None = None,
    route: Route | None = None,
) -> bool:
    """Tell the outcomes of one fleet run of ``operation`` as ONE evaluation: the failures
    open (or keep) their databases' alerts in one grouped message (200 databases failing in
    one outage are one message), the successes resolve theirs; events and Sentry per database,
    the heartbeat once. Never raises (see ``report_outcome``)."""
    try:
        return _report_outcomes(settings, primary, operation, outcomes, link, route)
    except PgkeeperError as exc:
        log.warning("alerts for the %s run not sent: %s", operation, exc.message)
    except Exception as exc:
        log.warning("alerts for the %s run not sent: %s: %s", operation, type(exc).__name__,
                    redact(str(exc), secrets_of(settings)))  # fmt: skip
    return False


def _report_outcomes(
    settings: Settings,
    primary: Storage,
    operation: str,
    outcomes: Sequence[RunOutcome],
    link: str | None,
    route: Route | None,
) -> bool:
    secrets = secrets_of(settings)
    route = route or Route.of(settings)
    failed = [o for o in outcomes if o.error is not None]
    if operation == "backup" and outcomes:
        notify.heartbeat(settings, "fail" if failed else "success")
    problems = []
    verified = []
    events: list[dict[str, Any]] = []
    for outcome in outcomes:
        subject = subject_of(outcome.database, outcome.server)
        if outcome.error is not None:
            error = outcome.error
            text = error if isinstance(error, str) else (str(error) or type(error).__name__)
            detail = redact(text.strip().splitlines()[0] if text.strip() else "failed", secrets)
            if isinstance(error, BaseException):
                tracking.capture(settings, error, operation=operation, database=subject)
            failure: dict[str, Any] = {"error": detail, "server": outcome.server}
            _emit_lifecycle(route.prefect, f"pgkeeper.{operation}.failed", outcome.database,
                            outcome.server, failure, events)  # fmt: skip
            what = _what_to_do(operation, detail)
            problems.append(Problem(f"{operation}-failed", subject, what))
        elif outcome.manifest is not None:
            manifest = outcome.manifest
            payload = {"backup_id": manifest.id, "size": manifest.size, "server": outcome.server}
            _emit_lifecycle(route.prefect, f"pgkeeper.{operation}.completed", outcome.database,
                            outcome.server, payload, events)  # fmt: skip
            if operation == "backup" and (manifest.verified or settings.backup_verify == "off"):
                _emit_lifecycle(route.prefect, "pgkeeper.backup.verified", outcome.database,
                                outcome.server, payload, events)  # fmt: skip
                verified.append(manifest)
    _emit_batch(route.prefect, events)
    success = None
    if verified:
        total = sum(m.size for m in verified)
        success = f"{len(verified)} backups verified ({format_size(total)})"
    subjects = frozenset(subject_of(o.database, o.server) for o in outcomes)
    scope = Scope(frozenset({f"{operation}-failed"}), subjects)
    return _tell(settings, primary, scope, problems, success=success, link=link, route=route)


def _what_to_do(operation: str, detail: str) -> str:
    """The one-line error and the command that shows more (or retries)."""
    commands = {
        "backup": "pgkeeper backup",
        "verify": "pgkeeper verify latest",
        "upload": "pgkeeper upload",
        "rotate": "pgkeeper rotate --dry-run",
        "restore-test": "pgkeeper restore-test",
    }
    command = commands.get(operation)
    return f"{detail} (fix it, then run '{command}')" if command else detail


def problems_of(reports: Sequence[MonitorReport]) -> list[Problem]:
    """Every failed check of the health reports as a problem of its report's subject."""
    return [Problem(c.name, r.subject, c.detail) for r in reports for c in r.failed]


MONITOR_RULES = frozenset(
    {"freshness", "verified", "size", "restore-test", "offsite", "usage", "quota", "disk",
     "storage", "scheduler", "inventory"}
)  # fmt: skip


def report_health(
    settings: Settings,
    primary: Storage,
    reports: Sequence[MonitorReport],
    *,
    link: str | None = None,
    route: Route | None = None,
) -> bool:
    """Tell what the health checks found: new problems, and problems of the checked subjects
    that are gone. Returns whether the message (if any) went out; never raises."""
    try:
        scope = Scope(MONITOR_RULES, frozenset(r.subject for r in reports))
        return _tell(settings, primary, scope, problems_of(reports), link=link, route=route)
    except PgkeeperError as exc:
        log.warning("health alerts not sent: %s", exc.message)
    except Exception as exc:
        log.warning("health alerts not sent: %s: %s", type(exc).__name__,
                    redact(str(exc), secrets_of(settings)))  # fmt: skip
    return False


@dataclass
class Watch:
    """What a watched run reports at its end: the manifest it made, if any."""

    manifest: Manifest | None = None


@contextmanager
def watch(
    settings: Settings,
    primary: Storage,
    operation: Literal["backup", "verify", "upload", "rotate", "restore-test"],
    database: str,
    server: str,
) -> Iterator[Watch]:
    """Run a block of work as one watched run: the channels checked first (a malformed
    BACKUP_NOTIFY_URLS raises ConfigError before any work), heartbeat ``/start`` (backups),
    then the outcome told by ``report_outcome`` (the block's exception, re-raised; or its
    ``Watch.manifest``). KeyboardInterrupt (Ctrl-C, SIGTERM) is told as a failure too."""
    route = Route.of(settings)
    if operation == "backup":
        notify.heartbeat(settings, "start")
    outcome = Watch()
    try:
        yield outcome
    except BaseException as exc:
        report_outcome(
            settings, primary, operation, database=database, server=server, error=exc, route=route
        )
        raise
    report_outcome(
        settings, primary, operation, database=database, server=server,
        manifest=outcome.manifest, route=route,
    )  # fmt: skip
