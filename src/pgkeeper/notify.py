"""Deliver alert messages to people: Apprise URLs (``BACKUP_NOTIFY_URLS``) and a heartbeat URL.

One library instead of a client per service: Apprise speaks ``mailto://``/``mailtos://``
(SMTP), Slack, Microsoft Teams, Discord, ntfy, PagerDuty, Opsgenie, plain ``json://`` /
``form://`` webhooks and ~100 more. The URLs hold passwords and tokens, so they are a secret
setting, and this module never shows one: a malformed URL is named by its position and scheme,
a failed delivery by Apprise's own privacy-masked form of the URL.

Delivery never raises: a channel that fails (a wrong SMTP host, a webhook answering 500) is one
warning line in the log, and the caller learns it from the returned bool. An alert that could
not be delivered must never hide or change the outcome it was about.

``BACKUP_HEARTBEAT_URL`` follows the healthchecks.io / Uptime Kuma convention: ``<url>/start``
when a backup starts, ``<url>`` when it succeeded, ``<url>/fail`` when it failed; the service
alerts when the pings stop, which works when pgkeeper and its host are gone.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pgkeeper.errors import ConfigError
from pgkeeper.redaction import redact
from pgkeeper.settings import Settings

__all__ = ["Channels", "Message", "channels", "heartbeat", "send"]

log = logging.getLogger(__name__)

Kind = Literal["failure", "warning", "resolved", "success"]
# Apprise's notify types: they colour Slack/Teams cards and pick e-mail icons.
_NOTIFY_TYPE = {
    "failure": "failure",
    "warning": "warning",
    "resolved": "success",
    "success": "info",
}
HEARTBEAT_TIMEOUT_SECONDS = 10.0
HOW_TO_WRITE = "see https://github.com/caronc/apprise/wiki, e.g. mailtos://user:pass@smtp.host"


@dataclass(frozen=True)
class Message:
    """One notification: a subject line, a plain-text body, and what kind of news it is."""

    subject: str
    body: str
    kind: Kind = "failure"


@dataclass
class Channels:
    """Validated Apprise URLs; ``shown`` is each one privacy-masked, for logs and listings."""

    urls: list[str] = field(repr=False)
    shown: list[str]
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __bool__(self) -> bool:
        return bool(self.urls)


def load_apprise() -> Any:
    """The apprise module, imported on first use (~0.2 s for its ~160 plugins)."""
    with warnings.catch_warnings():
        # apprise 2's e-mail plugin, loaded on the first URL, imports the stdlib's imghdr,
        # deprecated on Python 3.11/3.12: imported here once, quietly, so it is never again.
        warnings.simplefilter("ignore", DeprecationWarning)
        with contextlib.suppress(ImportError):
            import imghdr  # noqa: F401
        import apprise

    return apprise


@contextmanager
def _apprise_log(level: int = logging.WARNING) -> Iterator[list[str]]:
    """Collect Apprise's own log lines (which can be many per failure) instead of printing
    them; the caller writes one line of its own."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage().splitlines()[0] if record.getMessage() else "")

    logger = logging.getLogger("apprise")
    handler = Collect(level)
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


def channels(settings: Settings, secrets: tuple[str, ...] = ()) -> Channels:
    """The configured channels, each URL checked by Apprise now (at start, not at 3 a.m.).

    Raises ConfigError naming the entry (position and scheme, never the URL: it holds secrets).
    An unset BACKUP_NOTIFY_URLS gives empty (false) Channels.
    """
    raw = settings.backup_notify_urls.get_secret_value() if settings.backup_notify_urls else ""
    urls = [u.strip() for u in raw.split(",") if u.strip()]
    if not urls:
        return Channels([], [], secrets)
    apprise = load_apprise()
    shown: list[str] = []
    for position, url in enumerate(urls, start=1):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        client = apprise.Apprise()
        with _apprise_log():
            accepted = client.add(url)
        if not accepted or len(client) != 1:
            what = f"{scheme}://..." if scheme else "it has no scheme://"
            raise ConfigError(
                f"BACKUP_NOTIFY_URLS entry {position} ({what}) is not a valid Apprise URL "
                f"({HOW_TO_WRITE})"
            )
        shown.append(redact(client[0].url(privacy=True)))  # apprise masks its tokens
    return Channels(urls, shown, secrets)


def send(to: Channels, message: Message) -> bool:
    """Send ``message`` to every channel; True when every one accepted it.

    Subject and body are redacted first (every secret of the settings, passwords in URLs).
    A failing channel is one warning line naming it (masked) and Apprise's first complaint;
    the others are still tried. Never raises.
    """
    if not to:
        return True
    subject = redact(message.subject, to.secrets)
    body = redact(message.body, to.secrets)
    delivered = True
    try:
        apprise = load_apprise()
    except ImportError as exc:  # pragma: no cover - apprise ships with Prefect
        log.warning("alert not sent: apprise is not installed (%s)", exc)
        return False
    for url, shown in zip(to.urls, to.shown, strict=True):
        client = apprise.Apprise()
        with _apprise_log() as complaints:
            try:
                client.add(url)
                # Plain text as written: lines stay lines in e-mail and chat alike.
                ok = bool(
                    client.notify(
                        title=subject,
                        body=body,
                        notify_type=_NOTIFY_TYPE[message.kind],
                        body_format=apprise.NotifyFormat.TEXT,
                    )
                )
            except Exception as exc:  # a plugin bug must not stop the others nor the caller
                ok = False
                complaints.append(f"{type(exc).__name__}: {exc}")
        if not ok:
            delivered = False
            why = next((c for c in complaints if c), "no detail from apprise")
            log.warning(
                "alert delivery to %s failed: %s (check BACKUP_NOTIFY_URLS; the alert is kept "
                "and sent again by the next check)",
                shown,
                redact(why, to.secrets),
            )
    return delivered


def heartbeat(settings: Settings, phase: Literal["start", "success", "fail"]) -> bool:
    """Ping BACKUP_HEARTBEAT_URL (``/start``, the URL itself, ``/fail``); True when it answered
    2xx or when no URL is set. A failed ping is one warning line; never raises."""
    if settings.backup_heartbeat_url is None:
        return True
    base = settings.backup_heartbeat_url.get_secret_value().strip().rstrip("/")
    if not base:
        return True
    url = base if phase == "success" else f"{base}/{phase}"
    import httpx  # lazy, as in prefect_api

    try:
        response = httpx.get(url, timeout=HEARTBEAT_TIMEOUT_SECONDS, follow_redirects=True)
    except httpx.HTTPError as exc:
        log.warning(
            "heartbeat %s ping failed: %s (check BACKUP_HEARTBEAT_URL)", phase, type(exc).__name__
        )
        return False
    if response.status_code >= 300:
        log.warning(
            "heartbeat %s ping answered %d (check BACKUP_HEARTBEAT_URL)",
            phase,
            response.status_code,
        )
        return False
    return True
