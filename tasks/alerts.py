"""Flow hooks that tell a run's outcome (``pgkeeper.alerts.report_outcome``), once per run.

Attached to the backup, verify, upload, rotate and restore-test flows: a Failed run opens (or
keeps) that operation's alert for the database, a Completed run resolves it, and a verified
backup is news with BACKUP_NOTIFY_ON=success|all. Task retries happen inside the run, so a
failure that needed three tries is still one alert. A Crashed run (its process killed) cannot
run hooks: the server's ``pgkeeper-run-crashed`` automation tells that one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pgkeeper import alerts, catalog, naming, notify
from pgkeeper.postgres import ConnInfo
from pgkeeper.prefect_api import PrefectLink
from pgkeeper.procedure import AfterBackupError
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from tasks.fleet import FleetRunError
from tasks.inventory import settings_for

log = logging.getLogger(__name__)

Hook = Callable[[Any, Any, Any], None]


def prefect_link() -> PrefectLink:
    """The Prefect server this process talks to, from Prefect's own settings (a profile, the
    environment, or a test harness's temporary settings)."""
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, PREFECT_UI_URL

    link = PrefectLink.from_environment()
    api = PREFECT_API_URL.value()
    if api:
        link.api_url = str(api).rstrip("/")
        link.ui_url = str(PREFECT_UI_URL.value() or link.api_url.removesuffix("/api"))
        if key := PREFECT_API_KEY.value():
            link.headers["Authorization"] = f"Bearer {key.get_secret_value()}"
    return link


def _tell(operation: str, flow_run: Any, state: Any) -> None:
    error = None if state.is_completed() else state.result(raise_on_failure=False)
    if isinstance(error, FleetRunError) or isinstance(state.result(raise_on_failure=False), int):
        return  # a fleet run: each database was told by its server's run
    database = (getattr(flow_run, "parameters", None) or {}).get("database")
    settings = settings_for(database) if database else load_settings()
    if settings.database_url is None or not settings.database_url.get_secret_value():
        return  # nothing to name the alert after (the flow failed on that already)
    source = ConnInfo.parse(settings.require_database_url())
    primary = targets(settings)[0]
    link = prefect_link()
    route = alerts.Route.of(settings, link)
    run_url = link.run_url(str(flow_run.id))
    if state.is_completed():
        if state.name == "Skipped":
            return  # a missed run that did no work: nothing to tell
        result = state.result(raise_on_failure=False)
        manifest = None
        if isinstance(result, str) and naming.ID_RE.match(result):
            manifest = catalog.read_manifest(primary, result)
        elif operation == "backup":
            return  # a skipped (missed) run made no backup: nothing to tell
        alerts.report_outcome(
            settings, primary, operation, database=source.dbname, server=source.server,
            manifest=manifest, link=run_url, route=route,
        )  # fmt: skip
        return
    error = state.result(raise_on_failure=False)
    if isinstance(error, AfterBackupError):
        # The backup was made and verified; its upload/rotation problems were told by the
        # run's last step, each as its own alert. The backup itself is a success.
        alerts.report_outcome(
            settings, primary, operation, database=source.dbname, server=source.server,
            manifest=catalog.read_manifest(primary, error.backup_id), link=run_url, route=route,
        )  # fmt: skip
        return
    if not isinstance(error, BaseException):
        error = state.message or f"{state.name}"
    alerts.report_outcome(
        settings, primary, operation, database=source.dbname, server=source.server,
        error=error, link=run_url, route=route,
    )  # fmt: skip


def outcome_hooks(operation: str) -> dict[str, list[Hook]]:
    """``on_completion`` / ``on_failure`` (and for backups ``on_running``: the heartbeat's
    ``/start``) keyword arguments for ``@flow``."""

    def told(flow: Any, flow_run: Any, state: Any) -> None:
        try:
            _tell(operation, flow_run, state)
        except Exception as exc:  # never let telling change the run's outcome
            log.warning("outcome of %s not told: %s: %s", operation, type(exc).__name__, exc)

    def started(flow: Any, flow_run: Any, state: Any) -> None:
        try:
            notify.heartbeat(load_settings(), "start")
        except Exception as exc:
            log.warning("heartbeat not sent: %s", type(exc).__name__)

    hooks: dict[str, list[Hook]] = {"on_completion": [told], "on_failure": [told]}
    if operation == "backup":
        hooks["on_running"] = [started]
    return hooks
