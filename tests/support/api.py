"""Driving the HTTP API in tests: tokens, settings, the error shape, and a live uvicorn server.

`live_api_server` runs the real `serve_api` in a subprocess on a free port (configured by
environment, like `pgkeeper api`), so tests can send real sockets, lazy bodies and raw bytes
and watch the server's RSS; `RssWatch` samples it while a request runs.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pgkeeper.settings import Settings, load_settings
from tests.servers import free_port, guarded_script_argv

with warnings.catch_warnings():
    # Starlette 1.x asks for `httpx2` under its TestClient; the installed httpx works the same.
    # Imported here once, so every later import (schemathesis's too) finds it cached.
    from starlette.exceptions import StarletteDeprecationWarning

    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient`",
        category=StarletteDeprecationWarning,
    )  # fmt: skip
    from starlette.testclient import TestClient

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
READ_AUTH = {"Authorization": f"Bearer {READ}"}
MIB = 1024 * 1024


def settings_for(database_url: str | None, backup_dir: Path, **overrides: Any) -> Settings:
    """Settings read from no .env: local storage in ``backup_dir``, both tokens set."""
    values: dict[str, Any] = {
        "_env_file": None,
        "backup_dir": str(backup_dir),
        "backup_compression_threads": 1,
        "backup_api_token": ADMIN,
        "backup_api_read_token": READ,
    }
    if database_url is not None:
        values["database_url"] = database_url
    return load_settings(**(values | overrides))


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """The response is the API's error shape with ``status``; its text contains ``words``."""
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and "\n" not in body["error"]
    assert "Traceback" not in response.text
    for word in words:
        assert word in body["error"], body["error"]
    error: str = body["error"]
    return error


def backup_folders(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.iterdir()) if backup_dir.exists() else []


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


_SERVE = """
import sys
from pgkeeper.api import serve_api
from pgkeeper.settings import load_settings
serve_api(load_settings(_env_file=None), port=int(sys.argv[1]))
"""


@dataclass
class LiveServer:
    url: str
    port: int
    pid: int
    backup_dir: Path

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


class RssWatch:
    """Samples a process's RSS every 20 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, server: LiveServer) -> None:
        self._server = server
        self.peak = server.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._server.rss())

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def live_api_server(tmp_path: Path, backup_dir: Path, **env: str) -> Iterator[LiveServer]:
    """`serve_api` in a uvicorn subprocess on a free port of 127.0.0.1, configured by the
    environment plus ``env`` (both tokens unless ``env`` blanks them)."""
    port = free_port()
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BACKUP_API_")},
        "BACKUP_DIR": str(backup_dir),
        "BACKUP_API_TOKEN": ADMIN,
        "BACKUP_API_READ_TOKEN": READ,
        "BACKUP_COMPRESSION_THREADS": "1",
        **env,
    }
    log_path = tmp_path / f"server-{port}.log"
    log = log_path.open("wb")
    (tmp_path / "serve_api.py").write_text(_SERVE)
    proc = subprocess.Popen(
        guarded_script_argv("serve_api.py", str(port)), env=environ, cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = LiveServer(f"http://127.0.0.1:{port}", port, proc.pid, backup_dir)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text())
        try:
            return httpx.get(f"{server.url}/api/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "the API server to start")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


__all__ = [
    "ADMIN", "AUTH", "MIB", "READ", "READ_AUTH", "LiveServer", "RssWatch", "TestClient",
    "assert_error", "backup_folders", "live_api_server", "settings_for", "wait_until",
]  # fmt: skip
