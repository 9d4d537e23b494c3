"""An HTTP server run as a child process on a free port: start, wait until it answers, stop.

The S3 and GCS test servers are subclasses that only say how to run themselves
(``argv``) and which path answers once they serve (``ready_path``).
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self

from . import free_port


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Poll `url` until it answers any HTTP status; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own http URL
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"server at {url} not ready after {timeout}s:\n{_tail(log)}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Terminate `proc`, killing it if it does not exit within 5 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerProcess:
    """A child-process HTTP server on 127.0.0.1.

    Subclasses give ``name``, ``argv`` and ``ready_path``.
    """

    host = "127.0.0.1"
    name = "server"  # for messages and the log folder's name
    ready_path = "/"
    start_timeout = 30.0  # seconds until it must answer

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def start(self) -> Self:
        """Start the server and wait until it answers; returns self."""
        if self._proc is not None:
            return self
        atexit.register(self.stop)
        self._log_dir = Path(tempfile.mkdtemp(prefix=f"pgkeeper-{self.name}-"))
        log = self._log_dir / f"{self.name}.log"
        last_error: RuntimeError | None = None
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port(self.host)
            with log.open("ab") as out:
                self._proc = subprocess.Popen(
                    self.argv(self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                )
            try:
                wait_http(f"{self.base_url}{self.ready_path}", self._proc, log, self.start_timeout)
                return self
            except RuntimeError as exc:
                last_error = exc
                stop_process(self._proc)
                self._proc = None
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {last_error}")

    def stop(self) -> None:
        """Stop the server and drop its log folder. Idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
