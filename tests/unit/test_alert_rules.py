"""Alert rules as a specification: each problem is told once while it lasts, then once resolved;
what an evaluation did not look at is left alone; one evaluation is one message, grouped by
cause (200 databases in one outage are one line); consequences and the Prefect dead-man's rule
are recorded silently; the state survives a round trip through the storage; secrets of every
setting (Apprise tokens included) are scrubbed, in messages and in Sentry events."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgkeeper import tracking
from pgkeeper.alerts import (
    STATE_KEY,
    AlertState,
    Problem,
    Scope,
    compose,
    load_state,
    mark_delivered,
    reconcile,
    save_state,
)
from pgkeeper.catalog import list_backups
from pgkeeper.redaction import redact, secrets_of
from pgkeeper.settings import load_settings
from pgkeeper.storage.local import LocalStorage

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
SHOP = "shop on db:5432"
BACKUP = Scope(frozenset({"backup-failed"}), frozenset({SHOP}))
MONITOR = Scope(frozenset({"freshness", "quota", "verified", "size"}))


def told(changes: Any) -> tuple[list[str], list[str]]:
    return [p.key for p in changes.opened], [p.key for p in changes.resolved]


def test_a_problem_is_told_once_while_it_lasts_then_once_resolved() -> None:
    """Open, ongoing (silent), resolved: three evaluations, two messages."""
    state = AlertState()
    failed = [Problem("backup-failed", SHOP, "authentication failed")]

    first = reconcile(state, BACKUP, failed, NOW)
    mark_delivered(state, first, True)
    second = reconcile(state, BACKUP, failed, NOW)
    third = reconcile(state, BACKUP, [], NOW)

    assert told(first) == ([f"backup-failed|{SHOP}"], [])
    assert told(second) == ([], []) and len(second.ongoing) == 1 and not second
    assert told(third) == ([], [f"backup-failed|{SHOP}"])
    assert state.open == {}


def test_an_undelivered_alert_is_told_again_by_the_next_evaluation() -> None:
    """Delivery failed (SMTP down): the problem stays undelivered and goes out next time; a
    resolution that could not be sent goes out with the next message."""
    state = AlertState()
    failed = [Problem("backup-failed", SHOP, "disk full")]
    mark_delivered(state, reconcile(state, BACKUP, failed, NOW), False)

    again = reconcile(state, BACKUP, failed, NOW)
    mark_delivered(state, again, True)
    gone = reconcile(state, BACKUP, [], NOW)
    mark_delivered(state, gone, False)
    later = reconcile(state, Scope(frozenset({"quota"})), [], NOW)

    assert told(again) == ([f"backup-failed|{SHOP}"], [])
    assert told(gone)[1] == told(later)[1] == [f"backup-failed|{SHOP}"]


def test_an_evaluation_resolves_only_what_it_looked_at() -> None:
    """A backup of one database resolves neither another database's failure nor a quota."""
    state = AlertState()
    other = Problem("backup-failed", "crm on db:5432", "x")
    quota = Problem("quota", "storage and scheduler", "90% of 10 GB")
    mark_delivered(state, reconcile(state, Scope(frozenset({"backup-failed"})), [other], NOW), True)
    mark_delivered(state, reconcile(state, MONITOR, [quota], NOW), True)

    changes = reconcile(state, BACKUP, [], NOW)

    assert not changes and set(state.open) == {other.key, quota.key}


def test_200_databases_failing_at_once_are_one_message_with_one_line() -> None:
    """A storage outage failing every database: one message, one grouped line naming 20 of
    the 200 subjects and counting the rest."""
    state = AlertState()
    problems = [
        Problem("freshness", f"db{i:03} on pg:5432", f"db{i:03}: cannot list s3://bkt: 503")
        for i in range(200)
    ]

    message = compose(reconcile(state, MONITOR, problems, NOW))

    assert message.kind == "failure"
    assert message.subject.startswith("pgkeeper: 200 problems on 200 subjects")
    lines = [line for line in message.body.splitlines() if line.startswith("- ")]
    assert len(lines) == 1
    assert "for 200 databases" in lines[0] and "and 180 more" in lines[0]
    assert "<database>: cannot list s3://bkt: 503" in lines[0]


def test_200_separate_runs_failing_in_one_outage_are_two_messages_not_200() -> None:
    """Each database's backup reports its own failure (200 processes, one storage outage):
    the first is told at once, the other 199 are held and told together, as one grouped
    line, by the first evaluation after the group window (here: the monitor's)."""
    from datetime import timedelta

    from pgkeeper.alerts import GROUP_WINDOW

    state = AlertState()
    messages = []
    for i in range(200):
        subject = f"db{i:03d} on db:5432"
        scope = Scope(frozenset({"backup-failed"}), frozenset({subject}))
        problem = Problem("backup-failed", subject, "no space left on device writing db x")
        changes = reconcile(state, scope, [problem], NOW + timedelta(seconds=i))
        if changes:
            messages.append(compose(changes))
            mark_delivered(state, changes, True)
    assert len(messages) == 1 and "db000" in messages[0].subject
    later = reconcile(state, MONITOR, [], NOW + GROUP_WINDOW + timedelta(seconds=1))
    assert len(later.opened) == 199
    message = compose(later)
    mark_delivered(state, later, True)
    lines = [line for line in message.body.splitlines() if line.startswith("- ")]
    assert len(lines) == 1 and "for 199 databases" in lines[0]
    assert not reconcile(state, MONITOR, [], NOW + 2 * GROUP_WINDOW)  # told: nothing more


def test_different_causes_stay_on_their_own_lines() -> None:
    """Two rules (or two different errors) are two lines of the same message."""
    state = AlertState()
    problems = [
        Problem("freshness", SHOP, "stale"),
        Problem("quota", "storage and scheduler", "92% of 10 GB"),
    ]

    message = compose(reconcile(state, MONITOR, problems, NOW))

    assert len([x for x in message.body.splitlines() if x.startswith("- ")]) == 2


def test_consequences_of_a_failed_backup_are_recorded_but_not_told() -> None:
    """While a backup failure is open for a database, its staleness is the same story."""
    state = AlertState()
    mark_delivered(
        state, reconcile(state, BACKUP, [Problem("backup-failed", SHOP, "x")], NOW), True
    )

    changes = reconcile(state, MONITOR, [Problem("freshness", SHOP, "stale")], NOW)
    resolved = reconcile(state, MONITOR, [], NOW)

    assert (not changes and f"freshness|{SHOP}" in state.open) or not resolved
    assert told(resolved) == ([], [])


def test_silent_rules_are_recorded_not_told() -> None:
    """With the Prefect dead-man installed, staleness is the server's to tell."""
    state = AlertState()

    changes = reconcile(
        state, MONITOR, [Problem("freshness", SHOP, "x")], NOW, frozenset({"freshness"})
    )

    assert not changes and state.open[f"freshness|{SHOP}"].silent


def test_a_success_note_is_its_own_message() -> None:
    """Nothing changed but a verified backup is news (BACKUP_NOTIFY_ON=success)."""
    message = compose(reconcile(AlertState(), BACKUP, [], NOW), success="backup x is verified")

    assert message.kind == "success" and message.subject == "pgkeeper: backup x is verified"


def test_the_state_lives_on_the_primary_outside_the_catalog(tmp_path: Path) -> None:
    """Saved as _pgkeeper/alerts.json on the target, read back equal; the catalog ignores it."""
    storage = LocalStorage(str(tmp_path))
    state = AlertState()
    reconcile(state, BACKUP, [Problem("backup-failed", SHOP, "x")], NOW)

    save_state(storage, state)

    assert storage.stat(STATE_KEY) is not None and list_backups(storage) == []
    assert load_state(storage).open.keys() == state.open.keys()


def test_secrets_of_every_setting_are_scrubbed_apprise_tokens_included() -> None:
    """The DB password, API token, AWS key, SMTP password and Slack tokens never survive."""
    settings = load_settings(
        _env_file=None,
        database_url="postgresql://app:DbPa55word@db:5432/shop",
        backup_api_token="api-token-123456",
        aws_secret_access_key="aws-key-abcdef",
        backup_notify_urls="mailtos://ops:MailPa55@smtp.example.com,slack://T0AAA0000/B0BBB0000/xoxbTokenZZZZ",
    )
    text = (
        "failed: postgresql://app:DbPa55word@db:5432/shop password=DbPa55word api-token-123456 "
        "aws-key-abcdef MailPa55 xoxbTokenZZZZ B0BBB0000 T0AAA0000 shop"
    )

    clean = redact(text, secrets_of(settings))

    for secret in ("DbPa55word", "api-token-123456", "aws-key-abcdef", "MailPa55",
                   "xoxbTokenZZZZ", "B0BBB0000", "T0AAA0000"):  # fmt: skip
        assert secret not in clean
    assert clean.endswith(" shop") and "db:5432" in clean


def test_sentry_events_carry_tags_and_no_secret() -> None:
    """SENTRY_DSN set: a failure becomes one event tagged with database and operation, every
    secret scrubbed (captured by sentry-sdk's transport hook: no network)."""
    import sentry_sdk
    from sentry_sdk.transport import Transport

    sent: list[Any] = []

    class Capture(Transport):
        def capture_envelope(self, envelope: Any) -> None:
            sent.extend(item.payload.json for item in envelope.items if item.payload.json)

    settings = load_settings(
        _env_file=None,
        database_url="postgresql://app:DbPa55word@db:5432/shop",
        backup_api_token="api-token-123456",
        sentry_dsn="https://publickey@sentry.example.com/1",
    )
    try:
        raise RuntimeError("dump failed: postgresql://app:DbPa55word@db:5432/shop api-token-123456")
    except RuntimeError as exc:
        error = exc
    try:
        tracking.capture(settings, error, operation="backup", database=SHOP, transport=Capture)
    finally:
        sentry_sdk.get_client().close()
        tracking._started.clear()

    assert len(sent) == 1
    event = sent[0]
    assert event["tags"] == {"operation": "backup", "database": SHOP}
    raw = str(event)
    assert "DbPa55word" not in raw and "api-token-123456" not in raw and "dump failed" in raw
