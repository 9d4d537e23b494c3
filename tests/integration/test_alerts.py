"""Alerts without Prefect, delivered for real: the `pgkeeper` command against a real SMTP server
(aiosmtpd) and a webhook receiver. A failure reaches a person once, then once "resolved"; a
verified backup mails when asked; a delivery failure is one warning line that changes nothing;
a malformed channel is one config error at start; no secret is in anything delivered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.servers.postgres import PgCluster
from tests.servers.receivers import SMTP_PASSWORD, SmtpServer, WebhookReceiver
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("inboxes")]

API_TOKEN = "api-token-planted-7f3e2a9b4c"
AWS_KEY = "aws-secret-planted-0b8d6e1f2a"


def env_for(
    pg: PgCluster,
    db: str,
    backups: Path,
    channels: str,
    *,
    password: str | None = None,
    **extra: str,
) -> dict[str, str]:
    """The CLI's environment: the database (optionally a wrong password), the channels and
    planted secrets that must never be delivered anywhere."""
    return cli_env(
        pg.url(db, password=password),
        backups,
        BACKUP_NOTIFY_URLS=channels,
        BACKUP_API_TOKEN=API_TOKEN,
        AWS_SECRET_ACCESS_KEY=AWS_KEY,
        XDG_STATE_HOME=str(backups.parent / "state"),
        **extra,
    )


def assert_no_secret(text: str, pg: PgCluster) -> None:
    for secret in (pg.password, API_TOKEN, AWS_KEY, SMTP_PASSWORD):
        assert secret not in text


@pytest.fixture
def db(pg_cluster: PgCluster, sample_db: str) -> str:
    return sample_db.rsplit("/", 1)[1].split("?")[0]


def test_a_failing_backup_mails_once_then_resolved_once(
    pg_cluster: PgCluster, db: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """Two failing cron backups (a wrong password) give one mail; the next good backup gives one
    "resolved" mail; the failure's own exit code and error line are unchanged."""
    backups = tmp_path / "backups"
    bad = env_for(pg_cluster, db, backups, smtp_server.url(), password="wrong-pass")

    first = run_cli("backup", env=bad, cwd=tmp_path)
    assert "authentication failed" in one_line_error(first, 2)
    mail = smtp_server.wait_for(lambda m: "backup failed" in m.subject, 10)
    assert db in mail.subject and mail.recipients == ["ops@example.com"]
    assert "authentication failed" in mail.body and "pgkeeper backup" in mail.body

    second = run_cli("backup", env=bad, cwd=tmp_path)
    one_line_error(second, 2)
    good = run_cli("backup", env=env_for(pg_cluster, db, backups, smtp_server.url()), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    resolved = smtp_server.wait_for(lambda m: "resolved" in m.subject, 10)

    mails = smtp_server.items()
    assert [m.subject for m in mails] == [mail.subject, resolved.subject]
    assert db in resolved.subject and "backup failed" in resolved.subject
    for m in mails:
        assert_no_secret(m.raw, pg_cluster)


def test_a_verified_backup_mails_with_notify_on_success(
    pg_cluster: PgCluster, db: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """BACKUP_NOTIFY_ON=success: every verified backup is one mail naming the backup."""
    env = env_for(pg_cluster, db, tmp_path / "b", smtp_server.url(), BACKUP_NOTIFY_ON="success")

    done = run_cli("backup", "--json", env=env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    backup_id = json.loads(done.stdout)["id"]
    mail = smtp_server.wait_for(lambda m: backup_id in m.subject, 10)
    assert "verified" in mail.subject and db in mail.body
    assert_no_secret(mail.raw, pg_cluster)


def test_a_webhook_gets_the_failure(
    pg_cluster: PgCluster, db: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    """A json:// channel posts the alert: title and message in Apprise's JSON shape."""
    env = env_for(pg_cluster, db, tmp_path / "b", webhook_receiver.url(), password="nope-nope")

    one_line_error(run_cli("backup", env=env, cwd=tmp_path), 2)

    hook = webhook_receiver.wait_for(lambda h: h.path == "/hook", 10)
    assert "backup failed" in hook.body["title"] and db in hook.body["title"]
    assert "authentication failed" in hook.body["message"]
    assert_no_secret(hook.raw.decode(), pg_cluster)


def test_a_wrong_smtp_host_is_one_warning_and_the_backup_outcome_stands(
    pg_cluster: PgCluster, db: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    """Nothing listens on the SMTP port: a good backup still exits 0 and a failed one keeps its
    exit code and error line; each adds one warning line naming the channel, no password; the
    other channel still gets the alert."""
    dead = "mailto://alerts:smtp-secret-123@127.0.0.1:1?from=pgkeeper@example.com&to=o@example.com"
    channels = f"{dead},{webhook_receiver.url()}"

    bad = run_cli(
        "backup", env=env_for(pg_cluster, db, tmp_path / "b", channels, password="x-wrong"),
        cwd=tmp_path,
    )  # fmt: skip

    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("error: ") and "authentication" in lines[-1]
    assert "alert delivery to mailto://" in lines[0] and "failed" in lines[0]
    assert "smtp-secret-123" not in bad.stderr
    webhook_receiver.wait_for(lambda h: "backup failed" in h.body["title"], 10)

    good = run_cli(
        "backup", env=env_for(pg_cluster, db, tmp_path / "b", dead, BACKUP_NOTIFY_ON="all"),
        cwd=tmp_path,
    )  # fmt: skip
    assert good.returncode == 0
    warnings = good.stderr.strip().splitlines()
    assert len(warnings) == 1 and "alert delivery to mailto://" in warnings[0]


def test_a_malformed_channel_is_one_config_error_before_any_work(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """A URL Apprise cannot read stops the command at start: exit 2, one line naming the
    entry by position and scheme, never the URL; no backup was made."""
    channels = "json://127.0.0.1:9/ok,mailto://user:TopSecret99@"
    env = env_for(pg_cluster, db, tmp_path / "b", channels)

    line = one_line_error(run_cli("backup", env=env, cwd=tmp_path), 2)

    assert "BACKUP_NOTIFY_URLS entry 2 (mailto://...)" in line
    assert "TopSecret99" not in line
    assert not list((tmp_path / "b").glob("*/manifest.json"))


def test_the_heartbeat_pings_start_and_success_then_fail(
    pg_cluster: PgCluster, db: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    """BACKUP_HEARTBEAT_URL: /start then the URL on success; /start then /fail on failure."""
    beat = f"{webhook_receiver.base_url}/ping/abc123"
    good = env_for(pg_cluster, db, tmp_path / "b", "", BACKUP_HEARTBEAT_URL=beat)
    assert run_cli("backup", env=good, cwd=tmp_path).returncode == 0
    bad = env_for(pg_cluster, db, tmp_path / "b", "", BACKUP_HEARTBEAT_URL=beat, password="no!")
    one_line_error(run_cli("backup", env=bad, cwd=tmp_path), 2)

    paths = [h.path for h in webhook_receiver.items()]
    assert paths == [
        "/ping/abc123/start",
        "/ping/abc123",
        "/ping/abc123/start",
        "/ping/abc123/fail",
    ]


def test_monitor_tells_a_stale_database_once_and_its_resolution(
    pg_cluster: PgCluster, db: str, tmp_path: Path, smtp_server: SmtpServer
) -> None:
    """`pgkeeper monitor`: a database with no backup fails freshness (exit 1) and mails once;
    running it again mails nothing new; after a backup it passes and mails "resolved"."""
    env = env_for(
        pg_cluster, db, tmp_path / "b", smtp_server.url(),
        BACKUP_MAX_AGE="1h", BACKUP_RESTORE_TEST_MAX_AGE="off",
    )  # fmt: skip

    first = run_cli("monitor", "--json", env=env, cwd=tmp_path)
    assert first.returncode == 1, first.stderr
    report = json.loads(first.stdout)
    assert report["ok"] is False
    mail = smtp_server.wait_for(lambda m: "no recent verified backup" in m.subject, 10)
    assert db in mail.subject and "pgkeeper backup" in mail.body
    assert run_cli("monitor", env=env, cwd=tmp_path).returncode == 1

    assert run_cli("backup", env=env, cwd=tmp_path).returncode == 0
    healthy = run_cli("monitor", env=env, cwd=tmp_path)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    smtp_server.wait_for(lambda m: "resolved" in m.subject, 10)
    assert len(smtp_server.items()) == 2
    assert "freshness" in healthy.stdout and "scheduler" in healthy.stdout


def test_200_stale_databases_are_one_mail(tmp_path: Path, smtp_server: SmtpServer) -> None:
    """A target holding 200 databases whose backups all stopped two days ago (an outage):
    `pgkeeper monitor` sends one mail, one grouped line naming the first 20 and counting the
    rest; the next run sends nothing."""
    from datetime import timedelta

    from pgkeeper import naming
    from pgkeeper.catalog import write_manifest
    from pgkeeper.manifest import Manifest, StoredObject, Verification, utcnow
    from pgkeeper.storage.local import LocalStorage

    storage = LocalStorage(str(tmp_path / "b"))
    when = utcnow() - timedelta(days=2)
    for i in range(200):
        write_manifest(
            storage,
            Manifest(
                id=naming.make_id(f"db{i:03}", when), name=f"db{i:03}", database=f"db{i:03}",
                server="pg:5432", format="custom", compression="zstd",
                objects=[StoredObject(name="x.dump.zst", size=10, sha256="0" * 64)], size=10,
                started_at=when, finished_at=when, verification=Verification(ok=True, at=when),
            ),
        )  # fmt: skip
    env = cli_env(
        None, tmp_path / "b", BACKUP_NOTIFY_URLS=smtp_server.url(), BACKUP_MAX_AGE="25h",
        BACKUP_RESTORE_TEST_MAX_AGE="off", XDG_STATE_HOME=str(tmp_path / "state"),
    )  # fmt: skip

    assert run_cli("monitor", env=env, cwd=tmp_path).returncode == 1
    mail = smtp_server.wait_for(lambda m: "200 problems" in m.subject, 20)
    assert run_cli("monitor", env=env, cwd=tmp_path).returncode == 1

    assert len(smtp_server.items()) == 1
    lines = [line for line in mail.body.splitlines() if line.startswith("- ")]
    assert len(lines) == 1 and "for 200 databases" in lines[0] and "and 180 more" in lines[0]
