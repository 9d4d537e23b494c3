"""Error tracking: failures captured by Sentry (``SENTRY_DSN``), tagged, with secrets scrubbed.

sentry-sdk is started once per process, lazily, the first time a failure is captured with a
DSN configured, with default integrations off (no logging hooks, no request bodies, no local
variables: a stack frame's locals would hold the settings and their secrets) and a
``before_send`` hook that runs every string of the event through ``redaction.redact`` with
every secret of the settings. Tags: ``database`` (``shop on db:5432``) and ``operation``.
"""

from __future__ import annotations

import logging
from typing import Any

from pgkeeper.redaction import redact, secrets_of
from pgkeeper.settings import Settings

__all__ = ["capture", "scrub"]

log = logging.getLogger(__name__)

_started: dict[str, tuple[str, ...]] = {}  # DSN -> the secrets its hook scrubs


def scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """``value`` (an event, or any part of one) with every string redacted."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(scrub(v, secrets) for v in value)
    return value


def _start(settings: Settings, dsn: str, transport: Any = None) -> None:
    import sentry_sdk

    secrets = secrets_of(settings)
    _started.clear()
    _started[dsn] = secrets

    def before_send(event: Any, hint: Any) -> Any:
        return scrub(event, secrets)

    from pgkeeper import __version__

    sentry_sdk.init(
        dsn=dsn,
        release=f"pgkeeper@{__version__}",
        default_integrations=False,
        auto_enabling_integrations=False,
        include_local_variables=False,
        max_breadcrumbs=0,
        before_send=before_send,
        transport=transport,
    )


def capture(
    settings: Settings,
    error: BaseException,
    *,
    operation: str,
    database: str,
    transport: Any = None,
) -> None:
    """Send ``error`` to Sentry when SENTRY_DSN is set; never raises. ``transport`` (a
    sentry-sdk Transport) is for tests: events go to it instead of the network."""
    if settings.sentry_dsn is None or not settings.sentry_dsn.get_secret_value():
        return
    try:
        import sentry_sdk

        dsn = settings.sentry_dsn.get_secret_value()
        if dsn not in _started or transport is not None:
            _start(settings, dsn, transport)
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("operation", operation)
            scope.set_tag("database", redact(database, _started[dsn]))
            scope.capture_exception(error)
        sentry_sdk.flush(timeout=5)
    except Exception as exc:  # an error tracker must never become the error
        log.warning("failure not sent to Sentry: %s", type(exc).__name__)
