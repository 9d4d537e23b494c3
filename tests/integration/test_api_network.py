"""The HTTP API over the network (issue 14): TLS, the plain-text warning, token guessing.

`pgkeeper api --ssl-certfile/--ssl-keyfile` serves https with uvicorn's TLS; listening beyond
loopback without TLS warns once at start; a client whose tokens keep failing is slowed down
(api_guard.FailedTokens), measured here on the real app.
"""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pgkeeper.api import PrefectLink, create_app
from tests.servers import free_port
from tests.support.api import ADMIN, AUTH, TestClient, settings_for, wait_until
from tests.support.cli import PGKEEPER, cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

OPENSSL = shutil.which("openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl, as an operator would)."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Api:
    port: int
    output: str = ""  # stdout and stderr, once stopped


@contextmanager
def running_api(tmp_path: Path, *args: str) -> Iterator[Api]:
    """`pgkeeper api ARGS --port P` with an admin token; stopped (SIGINT) at the end."""
    api = Api(free_port())
    env = cli_env(None, tmp_path / "backups", BACKUP_API_TOKEN=ADMIN)
    proc = subprocess.Popen(
        [str(PGKEEPER), "api", "--port", str(api.port), *args], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        yield api
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            api.output, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            api.output, _ = proc.communicate()


def _answers(url: str, verify: ssl.SSLContext | bool = True) -> bool:
    try:
        return httpx.get(url, timeout=1, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_api_serves_https_with_a_certificate(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    """With --ssl-certfile/--ssl-keyfile the API answers https (the certificate verifies) and
    no plain http; listening on loopback, it warns about nothing."""
    cert, key = certificate
    trusted = ssl.create_default_context(cafile=str(cert))
    with running_api(tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)) as api:
        url = f"https://127.0.0.1:{api.port}"
        wait_until(lambda: _answers(f"{url}/api/health", verify=trusted), 60, "https")
        listed = httpx.get(f"{url}/api/backups", headers=AUTH, verify=trusted, timeout=5)
        assert listed.status_code == 200
        assert not _answers(f"http://127.0.0.1:{api.port}/api/health")
    assert "without TLS" not in api.output


def test_a_bind_beyond_loopback_without_tls_warns_once(tmp_path: Path) -> None:
    """`pgkeeper api --host 0.0.0.0` (a token set) starts and says once that it is plain text."""
    with running_api(tmp_path, "--host", "0.0.0.0") as api:  # noqa: S104 - under test
        wait_until(lambda: _answers(f"http://127.0.0.1:{api.port}/api/health"), 60, "the API")
    assert api.output.count("without TLS") == 1, api.output
    assert ADMIN not in api.output


def test_half_a_tls_pair_is_a_one_line_error(
    certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = certificate
    env = cli_env(None, tmp_path / "backups", BACKUP_API_TOKEN=ADMIN)
    proc = run_cli("api", "--ssl-certfile", str(cert), env=env, cwd=tmp_path)
    assert "--ssl-keyfile" in one_line_error(proc, 2)
    proc = run_cli("api", "--ssl-certfile", str(cert), "--ssl-keyfile", str(tmp_path / "none"),
                   env=env, cwd=tmp_path)  # fmt: skip
    assert "not a readable file" in one_line_error(proc, 2)


def test_repeated_failed_tokens_from_one_client_are_slowed_down(tmp_path: Path) -> None:
    """Five wrong tokens are answered at once; after that each try from that client waits for
    a slot spaced ever wider (0.25 s, 0.5 s, 1 s, ...), the right token too, which then clears
    the record: the next wrong one is answered at once again."""
    settings = settings_for(None, tmp_path / "backups")
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    wrong = {"Authorization": "Bearer guess-0123456789"}
    with TestClient(app, base_url="http://127.0.0.1:8080") as client:
        started = time.monotonic()
        for _ in range(5):
            assert client.get("/api/backups", headers=wrong).status_code == 401
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        for _ in range(4):  # slots: now, +0.25, +0.5, +1.0
            assert client.get("/api/backups", headers=wrong).status_code == 401
        slowed = time.monotonic() - started
        assert slowed >= 1.7, slowed
        started = time.monotonic()
        assert client.get("/api/backups", headers=AUTH).status_code == 200
        assert 1.5 <= time.monotonic() - started < 4, "the right token waits for its slot too"
        started = time.monotonic()
        assert client.get("/api/backups", headers=wrong).status_code == 401
        assert time.monotonic() - started < 0.5
        assert client.get("/api/health").status_code == 200  # open routes never wait


def test_the_slowdown_is_per_client_and_bounded() -> None:
    """FailedTokens on a fake clock: parallel tries of one client get spaced slots; another
    client is not affected; a queue longer than a minute is 429; old failures are forgotten;
    at most `clients` addresses are remembered."""
    from pgkeeper.api.guard import FailedTokens, GuardError

    now = [1000.0]
    guard = FailedTokens(clock=lambda: now[0], clients=3)
    for _ in range(5):
        assert guard.wait("a") == 0.0
        guard.failed("a")
    waits = [guard.wait("a") for _ in range(4)]  # four requests in flight at once
    assert waits == [0.0, 0.25, 0.5, 0.75]  # one slot each, not four tries at once
    assert guard.wait("b") == 0.0
    for _ in range(20):
        guard.failed("a")
    with pytest.raises(GuardError) as caught:
        for _ in range(20):
            guard.wait("a")
    assert caught.value.http_status == 429
    now[0] += 601
    assert guard.wait("a") == 0.0  # ten minutes without a failure: forgotten
    for client in ("c", "d", "e", "f"):
        guard.failed(client)
    assert len(guard._seen) == 3


def test_the_live_server_logs_no_token(tmp_path: Path) -> None:
    """A wrong token sent to the real server is in none of its output (it is a guess at a
    secret: it may be one character off the real token)."""
    guess = ADMIN[:-1] + "x"
    with running_api(tmp_path) as api:
        url = f"http://127.0.0.1:{api.port}"
        wait_until(lambda: _answers(f"{url}/api/health"), 60, "the API")
        response = httpx.get(f"{url}/api/backups", headers={"Authorization": f"Bearer {guess}"})
        assert response.status_code == 401
        assert guess not in response.text and ADMIN not in response.text
    assert "401" in api.output  # uvicorn's access log is there
    assert guess not in api.output and ADMIN not in api.output
