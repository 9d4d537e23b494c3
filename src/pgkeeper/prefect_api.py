"""Prefect's REST API without importing Prefect: where the server is, and the calls pgkeeper makes.

Used by the HTTP API (scheduler status, runs started with ``"wait": false``), by the monitor
(is anything running the schedules?) and by alerts (pgkeeper's own events, is the alert
automation installed?). Importing ``prefect`` costs seconds and tens of MiB, which no API
request or CLI command should pay, so this speaks httpx to ``PREFECT_API_URL`` (from the
environment, or the active Prefect profile; ``PREFECT_API_KEY`` / ``PREFECT_API_AUTH_STRING``
are sent when set). Every failure is a ``PrefectUnavailableError`` (HTTP 503 at the API).
"""

from __future__ import annotations

import os
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, Field

from pgkeeper.errors import PgkeeperError

__all__ = ["PrefectLink", "PrefectUnavailableError", "RunHandle", "RunState"]

PREFECT_TIMEOUT_SECONDS = 5.0
BUSY_RETRIES = 3
# A runner (`prefect serve`) polls every 10 s and Prefect's foreman marks a deployment
# NOT_READY after 60 s without a poll; we allow a little more, for servers whose foreman is off.
POLL_FRESH_SECONDS = 90.0
# Flows whose runs /api/runs/{id} reports: pgkeeper's own, never other flows on the server.
PGKEEPER_FLOWS = frozenset(
    {"backup", "verify", "upload", "rotate", "restore", "restore-test", "monitor"}
)


class PrefectUnavailableError(PgkeeperError):
    """No Prefect server is configured or reachable, or nothing runs the deployment."""

    http_status = 503


class RunHandle(BaseModel):
    id: str
    name: str
    flow: str
    deployment: str | None = None
    state: str
    url: str | None = Field(default=None, description="the run in the Prefect UI")


class RunState(BaseModel):
    id: str
    name: str
    flow: str
    deployment: str | None
    state: str = Field(description="Prefect's state name, e.g. Scheduled, Running, Completed")
    stateType: str
    message: str | None
    createdAt: str | None
    startTime: str | None
    endTime: str | None
    finished: bool
    url: str | None
    backupId: str | None = Field(
        default=None, description="the backup a finished backup run made (from its manifest)"
    )


def _prefect_profile() -> dict[str, str]:
    """Settings of the active Prefect profile (``prefect config set`` writes them there)."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    active = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = data.get("profiles", {}).get(active, {})
    if not isinstance(profile, dict):
        return {}
    return {str(k): str(v) for k, v in profile.items()}


def _without_userinfo(url: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class PrefectLink:
    """Where the Prefect server is, and the few calls the API makes to it."""

    api_url: str | None
    ui_url: str | None
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    timeout: float = PREFECT_TIMEOUT_SECONDS

    @classmethod
    def from_environment(cls) -> PrefectLink:
        """PREFECT_API_URL (+ PREFECT_UI_URL, PREFECT_API_KEY, PREFECT_API_AUTH_STRING) from the
        environment, else from the active Prefect profile."""
        profile = _prefect_profile()

        def setting(name: str) -> str | None:
            return os.environ.get(name) or profile.get(name) or None

        api_url = setting("PREFECT_API_URL")
        ui_url = setting("PREFECT_UI_URL")
        if api_url and not ui_url:
            base = _without_userinfo(api_url).rstrip("/")
            ui_url = base.removesuffix("/api")
        headers: dict[str, str] = {}
        if key := setting("PREFECT_API_KEY"):
            headers["Authorization"] = f"Bearer {key}"
        elif auth := setting("PREFECT_API_AUTH_STRING"):
            import base64

            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        return cls(api_url=api_url.rstrip("/") if api_url else None, ui_url=ui_url, headers=headers)

    @property
    def shown(self) -> str:
        return _without_userinfo(self.api_url) if self.api_url else "(none)"

    def run_url(self, run_id: str) -> str | None:
        return f"{self.ui_url.rstrip('/')}/runs/flow-run/{run_id}" if self.ui_url else None

    def request(
        self, method: str, path: str, body: dict[str, Any] | list[Any] | None = None
    ) -> Any:
        """One call; returns the JSON answer, or None for 404. Raises PrefectUnavailableError."""
        if not self.api_url:
            raise PrefectUnavailableError(
                "no Prefect server is configured (set PREFECT_API_URL, e.g. "
                "http://127.0.0.1:4200/api, and run 'pgkeeper serve' against it)"
            )
        import httpx  # lazy: only calls that need Prefect pay for it

        for attempt in range(BUSY_RETRIES + 1):
            try:
                response = httpx.request(
                    method, self.api_url + path, json=body, headers=self.headers,
                    timeout=self.timeout,
                )  # fmt: skip
            except httpx.HTTPError as exc:
                raise PrefectUnavailableError(
                    f"the Prefect server at {self.shown} is unreachable ({type(exc).__name__}); "
                    "start it or fix PREFECT_API_URL"
                ) from None
            # A SQLite-backed server answers 503 now and then under load: a short retry.
            if response.status_code != 503 or attempt == BUSY_RETRIES:
                break
            time.sleep(0.5 * (attempt + 1))
        if response.status_code == 404:
            return None
        if response.status_code == 204:
            return None
        if response.status_code >= 400:
            raise PrefectUnavailableError(
                f"the Prefect server at {self.shown} answered {response.status_code} to "
                f"{method} {path} (check PREFECT_API_URL and its credentials)"
            )
        try:
            return response.json()
        except ValueError:
            raise PrefectUnavailableError(
                f"{self.shown} did not answer like a Prefect server (check PREFECT_API_URL)"
            ) from None

    def deployments_of(self, flow: str) -> list[dict[str, Any]]:
        found = self.request(
            "POST", "/deployments/filter", {"flows": {"name": {"any_": [flow]}}, "limit": 200}
        )
        return [d for d in found or [] if isinstance(d, dict)]

    def scheduler_status(self, fresh_seconds: float = POLL_FRESH_SECONDS) -> tuple[bool, str]:
        """Whether a scheduler really runs backups: some backup deployment is not paused, has
        an active schedule, and a runner/worker polled it in the last ``fresh_seconds`` (and,
        for the default short window, Prefect calls it READY)."""
        if not self.api_url:
            return False, "no Prefect server is configured (set PREFECT_API_URL)"
        try:
            deployments = self.deployments_of("backup")
        except PrefectUnavailableError as exc:
            return False, exc.message
        if not deployments:
            return False, f"no backup deployment on {self.shown} (run 'pgkeeper serve')"
        now = datetime.now(UTC)
        scheduled = [
            d
            for d in deployments
            if not d.get("paused") and any(s.get("active") for s in d.get("schedules") or [])
        ]
        if not scheduled:
            return False, "every backup deployment is paused or has no active schedule"
        for deployment in sorted(scheduled, key=lambda d: str(d.get("name"))):
            polled = _parse_time(deployment.get("last_polled"))
            fresh = polled is not None and now - polled < timedelta(seconds=fresh_seconds)
            # Prefect's foreman turns a deployment NOT_READY 60 s after its last poll: for a
            # longer window the poll time alone decides.
            ready = deployment.get("status") == "READY" or fresh_seconds > POLL_FRESH_SECONDS
            if ready and fresh:
                return True, f"backup/{deployment.get('name')} is served and scheduled"
        return False, (
            "no scheduler has polled the backup deployments in the last "
            f"{fresh_seconds:.0f}s (start 'pgkeeper serve' or a worker)"
        )

    def scheduler_check(self, fresh_seconds: float) -> tuple[bool, str] | None:
        """``scheduler_status`` for the monitor, or None when there is nothing to check: no
        server configured, or one without backup deployments (backups run from cron)."""
        if not self.api_url:
            return None
        try:
            if not self.deployments_of("backup"):
                return None
        except PrefectUnavailableError as exc:
            return False, exc.message
        return self.scheduler_status(fresh_seconds)

    def emit(self, events: list[dict[str, Any]]) -> None:
        """Record events (``POST /events``); raises PrefectUnavailableError when refused."""
        self.request("POST", "/events", events)

    def automation_enabled(self, name: str) -> bool:
        """Whether an enabled automation of that name exists on the server."""
        found = self.request("POST", "/automations/filter", {"limit": 200})
        return any(
            isinstance(a, dict) and a.get("name") == name and a.get("enabled", True)
            for a in found or []
        )

    def start_run(self, flow: str, parameters: dict[str, Any]) -> RunHandle:
        """Create a flow run of ``flow`` on a deployment something is serving.

        Prefers a deployment with an active schedule (the one the operator chose). Refuses with
        PrefectUnavailableError when nothing polls the flow's deployments: a run nobody picks up
        would wait forever.
        """
        deployments = self.deployments_of(flow)
        if not deployments:
            raise PrefectUnavailableError(
                f"no {flow} deployment on {self.shown} (run 'pgkeeper serve' or "
                "'prefect deploy --all'); nothing was started"
            )
        ready = [d for d in deployments if d.get("status") == "READY" and not d.get("paused")]
        if not ready:
            raise PrefectUnavailableError(
                f"nothing is serving the {flow} deployments on {self.shown} (start "
                "'pgkeeper serve' or a worker); nothing was started"
            )
        ready.sort(
            key=lambda d: (
                not any(s.get("active") for s in d.get("schedules") or []),
                str(d.get("name")),
            )
        )
        chosen = ready[0]
        run = self.request(
            "POST",
            f"/deployments/{chosen['id']}/create_flow_run",
            {"parameters": parameters, "tags": ["pgkeeper-api"]},
        )
        if not isinstance(run, dict) or "id" not in run:
            raise PrefectUnavailableError(
                f"the Prefect server at {self.shown} did not create the {flow} run"
            )
        state = run.get("state") or {}
        return RunHandle(
            id=str(run["id"]),
            name=str(run.get("name", "")),
            flow=flow,
            deployment=f"{flow}/{chosen.get('name')}",
            state=str(state.get("name") or run.get("state_name") or "Scheduled"),
            url=self.run_url(str(run["id"])),
        )

    def read_run(self, run_id: uuid.UUID) -> RunState | None:
        """A pgkeeper flow run's state, or None when there is none (or it is not ours)."""
        run = self.request("GET", f"/flow_runs/{run_id}")
        if not isinstance(run, dict):
            return None
        flow = self.request("GET", f"/flows/{run.get('flow_id')}") if run.get("flow_id") else None
        flow_name = flow.get("name") if isinstance(flow, dict) else None
        if flow_name not in PGKEEPER_FLOWS:
            return None
        deployment_name = None
        if run.get("deployment_id"):
            deployment = self.request("GET", f"/deployments/{run['deployment_id']}")
            if isinstance(deployment, dict):
                deployment_name = f"{flow_name}/{deployment.get('name')}"
        state = run.get("state") or {}
        state_type = str(state.get("type") or run.get("state_type") or "UNKNOWN")
        return RunState(
            id=str(run["id"]),
            name=str(run.get("name", "")),
            flow=str(flow_name),
            deployment=deployment_name,
            state=str(state.get("name") or run.get("state_name") or state_type.title()),
            stateType=state_type,
            message=state.get("message") or None,
            createdAt=run.get("created"),
            startTime=run.get("start_time"),
            endTime=run.get("end_time"),
            finished=state_type in {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"},
            url=self.run_url(str(run["id"])),
        )
