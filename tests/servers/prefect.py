"""A real Prefect server (`prefect server start` from the project's venv), with its services.

The session's `prefect_test_harness` server is *ephemeral*: it runs no periodic services, so
proactive automations (pgkeeper's dead-man) are never evaluated there. This one is a plain
server process with its own SQLite database, as `make demo` and `pgkeeper serve` set-ups run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .process import ServerProcess

PREFECT = str(Path(sys.executable).with_name("prefect"))


class PrefectServer(ServerProcess):
    name = "prefect-server"
    ready_path = "/api/health"
    start_timeout = 120.0  # a new SQLite database is migrated first (~15-20 s here, more loaded)

    def argv(self, port: int) -> list[str]:
        return [PREFECT, "server", "start", "--host", self.host, "--port", str(port)]

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api"
