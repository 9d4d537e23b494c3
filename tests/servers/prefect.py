"""A real Prefect server (`prefect server start` from the project's venv), with its services.

The session's `prefect_test_harness` server is *ephemeral*: it runs no periodic services, so
proactive automations (pgkeeper's dead-man) are never evaluated there. This one is a plain
server process with its own database: SQLite in its PREFECT_HOME by default (as `make demo`
and `pgkeeper serve` set-ups run), or a PostgreSQL database (`database_url`, a
``postgresql+asyncpg://`` URL) as a production server for several workers would use.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .process import ServerProcess

PREFECT = str(Path(sys.executable).with_name("prefect"))


class PrefectServer(ServerProcess):
    name = "prefect-server"
    ready_path = "/api/health"
    start_timeout = 120.0  # a new database is migrated first (~15-20 s here, more loaded)

    def __init__(
        self,
        home: Path | None = None,
        database_url: str | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.home = home
        self.database_url = database_url
        self.settings = dict(settings or {})  # more PREFECT_SERVER_* settings

    def argv(self, port: int) -> list[str]:
        return [PREFECT, "server", "start", "--host", self.host, "--port", str(port)]

    def environment(self) -> dict[str, str] | None:
        env = dict(os.environ)
        env.update(
            {
                # The UI asks this port for the API (see FIELD-NOTES); telemetry off.
                "PREFECT_SERVER_API_PORT": str(self.port),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1",
            }
        )
        if self.home is not None:
            env["PREFECT_HOME"] = str(self.home)
        if self.database_url is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        env.update(self.settings)
        return env

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api"
