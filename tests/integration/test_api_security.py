"""The HTTP API against a hostile client: DNS rebinding, cross-site requests, huge bodies.

Each test reproduces a finding of the hostile review (issue 10): a web page driving the
tokenless loopback API (foreign ``Host``, cross-site ``Origin``, ``text/plain`` "simple"
requests), unauthenticated memory exhaustion (a body read and parsed before the 401), and
errors that echo whole inputs. The in-process tests drive the real app over ASGI; the memory
tests send lazily generated bodies to a real uvicorn server and watch its RSS; the raw-socket
tests send what no well-behaved client library would (duplicate, uppercase or missing headers,
a lying Content-Length).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pgkeeper.api import PrefectLink, create_app
from pgkeeper.errors import ConfigError
from pgkeeper.settings import Settings
from tests.servers import free_port
from tests.support.api import (
    AUTH,
    MIB,
    READ_AUTH,
    LiveServer,
    RssWatch,
    TestClient,
    assert_error,
    backup_folders,
    live_api_server,
    settings_for,
)
from tests.support.cli import cli_env, one_line_error, run_cli

pytestmark = pytest.mark.integration

NO_PREFECT = PrefectLink(api_url=None, ui_url=None)
UNKNOWN_ID = "auto_backup_2020-01-01T00-00-00Z"
OWN = "127.0.0.1:8080"  # the authority the in-process clients address
OWN_ORIGIN = f"http://{OWN}"
# What a live server may grow by while refusing a 600 MB body (it held 1.9 GB before).
GROWTH_BOUND = 40 * MIB


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    return tmp_path / "backups"


def tokenless(database_url: str | None, backup_dir: Path, **overrides: Any) -> Settings:
    """Settings with no API token: the loopback-only API the review drove from a web page."""
    return settings_for(
        database_url, backup_dir, backup_api_token=None, backup_api_read_token=None, **overrides
    )


def app_client(settings: Settings) -> TestClient:
    """The real app in-process, addressed as http://127.0.0.1:8080 (a loopback Host)."""
    return TestClient(create_app(settings, prefect=NO_PREFECT), base_url=OWN_ORIGIN)


@pytest.fixture
def open_client(sample_db: str, backup_dir: Path) -> Iterator[TestClient]:
    """A tokenless app over the sample database: whatever gets through really runs."""
    with app_client(tokenless(sample_db, backup_dir)) as client:
        yield client


def no_cors(response: httpx.Response) -> None:
    leaked = [name for name in response.headers if name.lower().startswith("access-control-")]
    assert leaked == [], leaked


def dump_body(size: int, piece: int = MIB) -> Iterator[bytes]:
    """``size`` bytes of JSON-looking text, generated lazily (never held whole)."""
    yield b'{"name": "'
    block = b"x" * piece
    sent = 0
    while sent < size:
        yield block
        sent += piece
    yield b'"}'


class Lazy:
    """A lazily generated request body that counts what the client managed to send."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in dump_body(self.size):
            self.sent += len(piece)
            yield piece


# --- finding 2: the Host rule (DNS rebinding) -----------------------------------------------------

LOOPBACK_HOSTS = [
    "127.0.0.1",
    "127.0.0.1:8080",
    "localhost",
    "localhost:8080",
    "LOCALHOST:8080",
    "localhost.",
    "localhost.:8080",
    "127.0.0.1.:8080",
    "127.5.6.7",
    "127.255.255.254:1",
    "[::1]",
    "[::1]:8080",
    "[0:0:0:0:0:0:0:1]:8080",
    "[::ffff:127.0.0.1]:8080",
]
FOREIGN_HOSTS = [
    "evil.example",
    "evil.example:8080",
    "localhost.evil.example",
    "127.0.0.1.evil.example",
    "127.0.0.1.nip.io:8080",
    "evil-localhost",
    "0.0.0.0:8080",
    "192.168.1.10:8080",
    "10.0.0.5",
    "[::]:8080",
    "[fe80::1]:8080",
    "testserver",
    "128.0.0.1",
]
MALFORMED_HOSTS = [
    "",
    "localhost:",
    "localhost:abc",
    "localhost:99999",
    "localhost:8080:1",
    "[::1",
    "::1",
    "[::1]x",
    "user@localhost",
    "localhost/x",
    "local host",
    "localhost..",
    "127.1",
    "0x7f.0.0.1",
    "%6cocalhost",
]


@pytest.mark.parametrize("host", LOOPBACK_HOSTS)
def test_a_tokenless_api_serves_loopback_hosts(backup_dir: Path, host: str) -> None:
    """Without a token, a Host naming the loopback interface (any case, a port or none, a
    trailing dot, any 127.x, IPv6 ::1 in any spelling) is served."""
    with app_client(tokenless(None, backup_dir)) as client:
        response = client.get("/api/backups", headers={"Host": host})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_a_tokenless_api_refuses_other_hosts_with_421(
    open_client: TestClient, backup_dir: Path, host: str
) -> None:
    """Without a token, a Host that is not loopback (what a DNS-rebinding page sends) gets
    421 on every path, health and docs included, and nothing runs."""
    headers = {"Host": host}
    for response in (
        open_client.get("/api/health", headers=headers),
        open_client.get("/docs", headers=headers),
        open_client.get("/openapi.json", headers=headers),
        open_client.get("/api/backups", headers=headers),
        open_client.post("/api/backups", json={"name": "rebound"}, headers=headers),
    ):
        assert_error(response, 421, "BACKUP_API_ALLOWED_HOSTS")
        no_cors(response)
    assert backup_folders(backup_dir) == []


@pytest.mark.parametrize("host", MALFORMED_HOSTS)
def test_a_malformed_host_gets_400(open_client: TestClient, backup_dir: Path, host: str) -> None:
    """A Host that is no host name or address (or an ambiguous spelling a browser never sends)
    gets 400, and nothing runs."""
    response = open_client.post("/api/backups", json={"name": "rebound"}, headers={"Host": host})
    assert_error(response, 400, "Host")
    assert backup_folders(backup_dir) == []


def test_allowed_hosts_are_served_besides_loopback(backup_dir: Path) -> None:
    """BACKUP_API_ALLOWED_HOSTS adds names and addresses (any port); loopback stays served and
    every other Host is still refused."""
    settings = tokenless(
        None, backup_dir, backup_api_allowed_hosts="Backups.Internal, 10.0.0.5,[fd00::5]"
    )
    with app_client(settings) as client:
        for host in (
            "backups.internal",
            "BACKUPS.internal:8443",
            "backups.internal.",
            "10.0.0.5:8080",
            "[fd00::5]:8080",
            "localhost:8080",
        ):
            assert client.get("/api/backups", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "backups.internal.evil.example", "10.0.0.6", "internal"):
            assert_error(client.get("/api/backups", headers={"Host": host}), 421)


def test_with_a_token_the_host_rule_applies_once_allowed_hosts_is_set(backup_dir: Path) -> None:
    """With a token and no BACKUP_API_ALLOWED_HOSTS any Host is served (the token guards the
    API); once the setting lists hosts, a foreign Host gets 421 even with the admin token."""
    with app_client(settings_for(None, backup_dir)) as client:
        assert (
            client.get("/api/backups", headers={**AUTH, "Host": "evil.example"}).status_code == 200
        )
    listed = settings_for(None, backup_dir, backup_api_allowed_hosts="backups.example.com")
    with app_client(listed) as client:
        foreign = client.get("/api/backups", headers={**AUTH, "Host": "evil.example"})
        assert_error(foreign, 421, "evil.example")
        for host in ("backups.example.com", "127.0.0.1:8080"):
            assert client.get("/api/backups", headers={**AUTH, "Host": host}).status_code == 200


@pytest.mark.parametrize(
    "entry",
    [
        "http://backups.example.com",
        "backups.example.com:8080",
        "*.example.com",
        "backups example",
        "backups.example.com/api",
        "[::1",
    ],
)
def test_an_allowed_hosts_entry_that_is_no_host_is_a_config_error(
    backup_dir: Path, entry: str
) -> None:
    """An entry of BACKUP_API_ALLOWED_HOSTS with a scheme, port, path or wildcard fails when the
    app is built (before `pgkeeper api` listens) with one line naming the setting."""
    with pytest.raises(ConfigError) as refused:
        create_app(tokenless(None, backup_dir, backup_api_allowed_hosts=entry), prefect=NO_PREFECT)
    assert "BACKUP_API_ALLOWED_HOSTS" in str(refused.value) and "\n" not in str(refused.value)


def test_pgkeeper_api_refuses_to_start_with_a_bad_allowed_hosts_entry(tmp_path: Path) -> None:
    """`pgkeeper api` with an entry that is no host exits 2 with one line before listening."""
    env = cli_env(None, tmp_path / "backups", BACKUP_API_ALLOWED_HOSTS="ok.example,http://x")
    proc = run_cli("api", "--port", str(free_port()), env=env, cwd=tmp_path, timeout=60)
    assert "BACKUP_API_ALLOWED_HOSTS" in one_line_error(proc, 2)


# --- finding 2: the Origin rule and no CORS -------------------------------------------------------

FOREIGN_ORIGINS = [
    "http://evil.example",
    "https://evil.example",
    "null",
    "http://evil.example:8080",
    "http://127.0.0.1:9999",
    "http://localhost:8080",
    "http://127.0.0.1",
    "http://[::1]:8080",
    "http://127.0.0.1:8080.evil.example",
    "http://127.0.0.1:8080/",
    "file://",
    "chrome-extension://abcdef",
    "http://user@127.0.0.1:8080",
    "",
    "127.0.0.1:8080",
]


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_a_foreign_origin_is_refused_on_every_method(
    open_client: TestClient, backup_dir: Path, origin: str
) -> None:
    """A request whose Origin is not the API's own (scheme://Host) gets 403 whatever its method,
    before anything runs, and no CORS header is ever sent."""
    headers = {"Origin": origin}
    json_headers = {**headers, "Content-Type": "application/json"}
    for response in (
        open_client.get("/api/backups", headers=headers),
        open_client.head(f"/api/backups/download?id={UNKNOWN_ID}", headers=headers),
        open_client.post("/api/backups", content=b'{"name": "csrf"}', headers=json_headers),
        open_client.post(
            "/api/backups/restore", content=b'{"backupId": "latest"}', headers=json_headers
        ),
        open_client.post(
            "/api/backups/import",
            content=b"x",
            headers={**headers, "Content-Type": "application/octet-stream"},
        ),
        open_client.delete(f"/api/backups?id={UNKNOWN_ID}", headers=headers),
        open_client.put("/api/backups", headers=headers),
        open_client.options(
            "/api/backups", headers={**headers, "Access-Control-Request-Method": "POST"}
        ),
    ):
        assert response.status_code == 403, (response.request.method, response.text)
        if response.request.method != "HEAD":
            assert_error(response, 403, "Origin")
        no_cors(response)
    assert backup_folders(backup_dir) == []


def test_the_apis_own_origin_is_served(open_client: TestClient, backup_dir: Path) -> None:
    """A same-origin request (the Swagger UI at /docs sends Origin on POST) is served."""
    response = open_client.post(
        "/api/backups", json={"name": "same_origin"}, headers={"Origin": OWN_ORIGIN}
    )
    assert response.status_code == 200, response.text
    no_cors(response)
    assert len(backup_folders(backup_dir)) == 1


def test_behind_a_proxy_the_origin_matches_the_forwarded_host(backup_dir: Path) -> None:
    """Behind a TLS proxy that forwards Host, https://<host> is the API's own origin."""
    settings = settings_for(None, backup_dir, backup_api_allowed_hosts="backups.example.com")
    with app_client(settings) as client:
        own = client.get(
            "/api/backups",
            headers={
                **AUTH,
                "Host": "backups.example.com",
                "Origin": "https://backups.example.com",
            },
        )
        assert own.status_code == 200, own.text
        other = client.get(
            "/api/backups",
            headers={**AUTH, "Host": "backups.example.com", "Origin": "https://evil.example"},
        )
        assert_error(other, 403)


def test_a_preflight_never_gets_cors_headers(open_client: TestClient) -> None:
    """OPTIONS (a CORS preflight) is never answered with Access-Control-* headers, from the
    API's own origin or any other, so a browser never sends the real cross-site request."""
    for origin in (OWN_ORIGIN, "http://evil.example"):
        response = open_client.options(
            "/api/backups",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert response.status_code >= 400
        no_cors(response)


# --- finding 2: content types ---------------------------------------------------------------------

SIMPLE_TYPES = [
    "text/plain",
    "text/plain;charset=UTF-8",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    None,
    "application/json",
]
DUMP_TYPES = [
    "application/octet-stream",
    "Application/Octet-Stream; foo=bar",
    "application/gzip",
    "application/x-gzip",
    "application/zstd",
    "application/sql",
    "application/x-tar",
]


def _with_type(content_type: str | None) -> dict[str, str]:
    return {} if content_type is None else {"Content-Type": content_type}


def test_the_reviewed_cross_site_import_is_refused(
    open_client: TestClient, backup_dir: Path
) -> None:
    """The review's chain: a page's cross-site text/plain POST of a dump to the tokenless import
    gets 403 for its Origin, and 415 for its type when a browser sends no Origin."""
    dump = b"--\n-- PostgreSQL database dump\n--\n\\! id > /tmp/pwned\n"
    page = open_client.post(
        "/api/backups/import",
        content=dump,
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain;charset=UTF-8"},
    )
    assert_error(page, 403, "Origin")
    no_origin = open_client.post(
        "/api/backups/import", content=dump, headers={"Content-Type": "text/plain;charset=UTF-8"}
    )
    assert_error(no_origin, 415, "application/octet-stream")
    assert backup_folders(backup_dir) == []


@pytest.mark.parametrize("content_type", SIMPLE_TYPES)
def test_an_import_without_a_dump_type_gets_415(
    open_client: TestClient, backup_dir: Path, content_type: str | None
) -> None:
    """An import whose Content-Type a cross-site form or fetch can send (or none) gets 415
    naming the types to send; nothing is stored."""
    response = open_client.post(
        "/api/backups/import", content=b"PGDMP" + b"\0" * 100, headers=_with_type(content_type)
    )
    assert_error(response, 415, "application/octet-stream")
    assert backup_folders(backup_dir) == []


@pytest.mark.parametrize("content_type", DUMP_TYPES)
def test_an_import_with_a_dump_type_reaches_the_import(
    open_client: TestClient, content_type: str
) -> None:
    """Each documented dump type passes the gate (this body is then refused as no dump)."""
    response = open_client.post(
        "/api/backups/import", content=b"not a dump at all", headers={"Content-Type": content_type}
    )
    assert_error(response, 422, "not a PostgreSQL dump")


@pytest.mark.parametrize("path", ["/api/backups", "/api/backups/restore"])
@pytest.mark.parametrize("content_type", [t for t in SIMPLE_TYPES if t != "application/json"])
def test_json_endpoints_refuse_other_types_with_415(
    open_client: TestClient, backup_dir: Path, path: str, content_type: str | None
) -> None:
    """POST /api/backups and /restore with valid JSON under a type a cross-site simple request
    can send (or none) get 415, and nothing runs."""
    body = b'{"name": "csrf", "backupId": "latest", "target": "csrf_copy"}'
    response = open_client.post(path, content=body, headers=_with_type(content_type))
    assert_error(response, 415, "application/json")
    assert backup_folders(backup_dir) == []


def test_json_endpoints_accept_json_with_parameters_in_any_case(backup_dir: Path) -> None:
    """application/json with a charset, in any case, reaches the handler."""
    with app_client(tokenless(None, backup_dir)) as client:
        for content_type in ("application/json; charset=utf-8", "Application/JSON"):
            restore = client.post(
                "/api/backups/restore",
                content=f'{{"backupId": "{UNKNOWN_ID}"}}',
                headers={"Content-Type": content_type},
            )
            assert_error(restore, 404, UNKNOWN_ID)
            backup = client.post(
                "/api/backups", content=b'{"wait": false}', headers={"Content-Type": content_type}
            )
            assert_error(backup, 503, "PREFECT_API_URL")


# --- finding 5: authentication before the body, bounded bodies ------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One live server with both tokens for the memory tests of this module."""
    tmp_path = tmp_path_factory.mktemp("guarded")
    with live_api_server(tmp_path, tmp_path / "backups") as server:
        yield server


def _send_huge(
    server: LiveServer, path: str, headers: dict[str, str], declared: bool = False
) -> tuple[httpx.Response, Lazy, float, int]:
    """POST a lazily generated 600 MB body; the answer, the body, seconds taken, RSS growth."""
    body = Lazy(600 * MIB)
    if declared:
        headers = {**headers, "Content-Length": str(600 * MIB + 12)}
    baseline = server.rss()
    started = time.monotonic()
    with RssWatch(server) as watch:
        response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)
    return response, body, time.monotonic() - started, watch.peak - baseline


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/backups", {"Content-Type": "application/json"}, 401),
        ("/api/backups", {**READ_AUTH, "Content-Type": "application/json"}, 403),
        ("/api/backups/restore", {"Content-Type": "application/json"}, 401),
        ("/api/backups/restore", {**READ_AUTH, "Content-Type": "application/json"}, 403),
        ("/api/backups/import", {"Content-Type": "application/octet-stream"}, 401),
        ("/api/backups/import", {**READ_AUTH, "Content-Type": "application/octet-stream"}, 403),
        ("/api/backups", {"Authorization": "Bearer wrong", "Content-Type": "text/plain"}, 401),
    ],
    ids=[
        "create-no-token",
        "create-read-token",
        "restore-no-token",
        "restore-read-token",
        "import-no-token",
        "import-read-token",
        "wrong-token",
    ],
)
def test_a_huge_body_without_the_right_token_is_refused_before_it_is_read(
    guarded_server: LiveServer, path: str, headers: dict[str, str], status: int
) -> None:
    """A 600 MB body sent lazily without a token (or with the read-only one on a write) gets its
    401/403 at once; the server reads next to none of it and its RSS stays flat."""
    response, body, seconds, growth = _send_huge(guarded_server, path, headers)
    assert_error(response, status)
    assert seconds < 5, f"took {seconds:.1f}s"
    assert body.sent < 100 * MIB, f"the client got to send {body.sent / MIB:.0f} MiB"
    assert growth < GROWTH_BOUND, f"server RSS grew {growth / MIB:.1f} MiB"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/api/backups", "/api/backups/restore"])
def test_an_oversized_json_body_gets_413_without_the_server_growing(
    guarded_server: LiveServer, path: str, declared: bool
) -> None:
    """With the admin token, a JSON body over 1 MiB gets 413: at once when Content-Length says
    so, after the first MiB when it is chunked; the server's RSS stays flat."""
    headers = {**AUTH, "Content-Type": "application/json"}
    response, body, seconds, growth = _send_huge(guarded_server, path, headers, declared)
    assert_error(response, 413, "1 MiB")
    assert seconds < 5, f"took {seconds:.1f}s"
    assert body.sent < 100 * MIB, f"the client got to send {body.sent / MIB:.0f} MiB"
    assert growth < GROWTH_BOUND, f"server RSS grew {growth / MIB:.1f} MiB"
    assert backup_folders(guarded_server.backup_dir) == []


def test_a_body_sent_to_a_route_that_takes_none_is_not_read(guarded_server: LiveServer) -> None:
    """A 600 MB body on GET /api/health (open to anyone) is answered and the connection
    closed, instead of the server reading and discarding all of it."""
    body = Lazy(600 * MIB)
    started = time.monotonic()
    response = httpx.request("GET", f"{guarded_server.url}/api/health", content=body, timeout=60)
    assert response.status_code == 200
    assert response.headers["connection"] == "close"
    assert time.monotonic() - started < 5
    assert body.sent < 100 * MIB, f"the client got to send {body.sent / MIB:.0f} MiB"


def test_a_token_with_non_ascii_characters_is_recognised(backup_dir: Path) -> None:
    """A token is compared as the bytes the client sent (UTF-8), not as latin-1 mojibake."""
    token = "jeton-accès-0123456789-ü"
    settings = settings_for(None, backup_dir, backup_api_token=token)
    with app_client(settings) as client:
        sent = {"Authorization": f"Bearer {token}".encode()}
        assert client.get("/api/backups", headers=sent).status_code == 200
        assert client.post("/api/backups", json={"wait": False}, headers=sent).status_code == 503
        assert_error(client.get("/api/backups", headers={"Authorization": b"Bearer jeton"}), 401)


def test_json_bodies_are_capped_in_process(backup_dir: Path) -> None:
    """Over ASGI too: a declared or chunked JSON body over 1 MiB is 413, one under it is read."""
    big = b'{"name": "' + b"x" * (MIB + 10) + b'"}'

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    headers = {**AUTH, "Content-Type": "application/json"}
    with app_client(settings_for(None, backup_dir)) as client:
        assert_error(client.post("/api/backups", content=big, headers=headers), 413, "1 MiB")
        assert_error(client.post("/api/backups", content=chunked(), headers=headers), 413)
        small = client.post("/api/backups", json={"name": "x" * 1000}, headers=AUTH)
        assert_error(small, 400, "backup name")


# --- smaller findings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/api/backups", {"GET", "POST", "DELETE"}),
        ("/api/backups/download", {"GET", "HEAD"}),
        ("/api/backups/restore", {"GET", "POST"}),  # GET: it is also /api/backups/{backup_id}
        ("/api/health", {"GET"}),
        (f"/api/backups/{UNKNOWN_ID}", {"GET"}),
    ],
)
def test_a_405_lists_every_method_of_the_path(
    backup_dir: Path, path: str, allowed: set[str]
) -> None:
    """A 405 answers Allow with every method the path has, not only the first route's."""
    with app_client(settings_for(None, backup_dir)) as client:
        response = client.request("PATCH", path, headers=AUTH)
    assert_error(response, 405, "method not allowed")
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed


HUGE = "x" * 300_000  # under the 1 MiB body cap: it reaches the validation


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/backups", {"name": HUGE}),
        ("POST", "/api/backups", {"name": "a b " * 50_000}),
        ("POST", "/api/backups", {"format": HUGE}),
        ("POST", "/api/backups/restore", {"backupId": HUGE}),
        ("POST", "/api/backups/restore", {"backupId": UNKNOWN_ID, "target": HUGE + "/"}),
        (
            "POST",
            "/api/backups/restore",
            {"backupId": UNKNOWN_ID, "target": f"postgresql://{HUGE}"},
        ),
        ("POST", "/api/backups/restore", {"backupId": UNKNOWN_ID, "confirm": HUGE}),
        ("POST", "/api/backups/restore", {"backupId": UNKNOWN_ID, "jobs": HUGE}),
        ("POST", f"/api/backups/import?name={HUGE[:20_000]}", None),
        ("DELETE", f"/api/backups?id={HUGE[:20_000]}", None),
        ("GET", f"/api/backups/download?id={HUGE[:20_000]}", None),
        ("GET", f"/api/backups/{HUGE[:20_000]}", None),
        ("GET", f"/api/runs/{HUGE[:20_000]}", None),
    ],
)
def test_errors_echo_at_most_a_short_piece_of_any_input(
    backup_dir: Path, method: str, path: str, body: Any
) -> None:
    """A huge name, id, target, confirm or query parameter gets its one-line error, which
    shows at most ~80 characters of it."""
    settings = settings_for("postgresql://postgres@127.0.0.1:1/postgres", backup_dir)
    headers = {
        **AUTH,
        "Content-Type": "application/octet-stream" if body is None else "application/json",
    }
    with app_client(settings) as client:
        content = None if body is None else httpx.Request("POST", "/", json=body).content
        response = client.request(method, path, content=content, headers=headers)
    assert 400 <= response.status_code < 500, response.text[:300]
    error = assert_error(response, response.status_code)
    assert len(error) <= 300, error
    assert "x" * 100 not in error
    assert backup_folders(backup_dir) == []


def test_a_huge_target_never_echoes_its_password(backup_dir: Path) -> None:
    """A long target URL or conninfo carrying a password gets a short error without it."""
    secret = "S3cret-Passw0rd-of-the-target"
    settings = settings_for("postgresql://postgres@127.0.0.1:1/postgres", backup_dir)
    targets = [
        f"postgresql://app:{secret}@127.0.0.1:1/{'d' * 5000}",
        f"postgresql://app:{secret}@{'h' * 5000}:1/db",
        f"host=127.0.0.1 port=1 password={secret} dbname={'d' * 5000}",
        f"postgresql://app:{secret}@127.0.0.1:1/db?{'x=y&' * 2000}",
    ]
    with app_client(settings) as client:
        made = client.post("/api/backups/restore", json={"backupId": UNKNOWN_ID}, headers=AUTH)
        assert_error(made, 404)
        for target in targets:
            response = client.post(
                "/api/backups/restore",
                json={"backupId": UNKNOWN_ID, "target": target},
                headers=AUTH,
            )
            error = assert_error(response, response.status_code)
            assert secret not in response.text and secret[:8] not in response.text, error
            assert len(error) <= 300, error


# --- attacking it over raw sockets ----------------------------------------------------------------


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live tokenless server (loopback only), as `pgkeeper api` runs it by default."""
    tmp_path = tmp_path_factory.mktemp("open")
    with live_api_server(
        tmp_path, tmp_path / "backups", BACKUP_API_TOKEN="", BACKUP_API_READ_TOKEN=""
    ) as server:
        yield server


def raw(
    server: LiveServer, request: bytes, timeout: float = 10, until_close: bool = False
) -> tuple[int, bytes]:
    """Send raw bytes and read the first response (or all, until the server closes);
    (first status, bytes received)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        # The server may answer and close before taking it all: read that answer anyway.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
                if not until_close and b"\r\n\r\n" in received and _complete(received):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
    assert received.startswith(b"HTTP/1."), received[:200]
    return int(received.split(b" ", 2)[1]), received


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /api/backups HTTP/1.1\r\nHOST: evil.example\r\n", 421),
        (b"GET /api/backups HTTP/1.1\r\nHost: localhost.\r\n", 200),
        (b"GET /api/backups HTTP/1.1\r\nHost: [::1]:1\r\n", 200),
        (b"GET /api/backups HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n", 400),
        (b"GET /api/backups HTTP/1.0\r\n", 400),
        (b"HEAD /api/health HTTP/1.1\r\nHost: evil.example\r\n", 421),
        (b"OPTIONS /api/backups HTTP/1.1\r\nHost: evil.example\r\n", 421),
        (b"GET /api/backups HTTP/1.1\r\nHost: localhost\r\nORIGIN: http://evil.example\r\n", 403),
        (b"GET /api/backups HTTP/1.1\r\nHost: localhost\r\nOrigin: null\r\n", 403),
        (
            b"GET /api/backups HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\n"
            b"Origin: http://evil.example\r\n",
            400,
        ),
        (
            b"POST /api/backups/import HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
            b"CONTENT-TYPE: text/plain\r\n",
            415,
        ),
        (
            b"POST /api/backups/import HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Type: text/plain\r\n",
            400,
        ),
    ],
    ids=[
        "uppercase-host",
        "trailing-dot",
        "ipv6",
        "two-hosts",
        "no-host",
        "head",
        "options",
        "uppercase-origin",
        "null-origin",
        "two-origins",
        "uppercase-type",
        "two-types",
    ],
)
def test_raw_requests_meet_the_same_rules(
    open_server: LiveServer, request_head: bytes, status: int
) -> None:
    """What no client library sends (uppercase, duplicate or missing headers, HEAD and OPTIONS
    from a foreign Host) meets the same Host, Origin and type rules on a real server."""
    body = b"x" if b"Content-Length: 1" in request_head else b""
    got, response = raw(open_server, request_head + b"Connection: close\r\n\r\n" + body)
    assert got == status, response[:400]
    assert b"access-control-" not in response.lower()
    assert backup_folders(open_server.backup_dir) == []


def test_a_growing_request_head_is_cut_off_by_the_server(open_server: LiveServer) -> None:
    """A request head still incomplete past 16 KiB (a header that never ends) gets 400 from
    the server without waiting for the rest: headers cannot grow the server's memory."""
    head = b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20 * 1024
    status, response = raw(open_server, head)
    assert status == 400, response[:300]


def test_bytes_past_a_short_content_length_are_never_read_as_its_body(
    guarded_server: LiveServer,
) -> None:
    """A JSON POST whose Content-Length covers only its first 50 bytes: those are the body
    (answered 404 for the unknown id), and the error answer closes the connection, so what
    follows (here a second, tokenless request) is neither more of that body nor run."""
    body = f'{{"backupId": "{UNKNOWN_ID}"}}'.encode().ljust(50)
    smuggled = (
        b"POST /api/backups HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    head = (
        b"POST /api/backups/restore HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: " + AUTH["Authorization"].encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    )
    first, received = raw(guarded_server, head + body + smuggled, until_close=True)
    assert first == 404, received[:600]
    statuses = [
        int(line.split(b" ", 2)[1])
        for line in received.split(b"\r\n")
        if line.startswith(b"HTTP/1.1 ")
    ]
    assert statuses == [404], received[:1200]
    assert b"connection: close" in received.lower()
    assert backup_folders(guarded_server.backup_dir) == []


def test_a_claimed_huge_body_with_few_bytes_is_refused_at_once(guarded_server: LiveServer) -> None:
    """A Content-Length of 10 GB with a few bytes behind it gets 413 at once (nothing waits
    for the rest), with the admin token; without a token 401."""
    for auth, status in ((AUTH["Authorization"], 413), ("Bearer nope", 401)):
        head = (
            b"POST /api/backups HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: "
            + auth.encode()
            + b"\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n{"
        )
        started = time.monotonic()
        got, response = raw(guarded_server, head, timeout=5)
        assert got == status, response[:400]
        assert time.monotonic() - started < 3
