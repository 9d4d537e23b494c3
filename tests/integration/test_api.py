"""The HTTP API against real PostgreSQL, local storage and a real Prefect server.

Most tests drive the real app in-process over ASGI (Starlette's TestClient); the streaming and
bounded-memory tests run `serve_api` in a uvicorn subprocess on a free port and watch its RSS.
Prefect is either absent (`NO_PREFECT`), the session's test server (`prefect_api`), or an
unreachable address. The scheduler the API reports on is simulated by the one call a real runner
makes to Prefect (`get_scheduled_flow_runs`), which is what marks a deployment READY.
A schemathesis run over the OpenAPI schema closes the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from pgkeeper import catalog, naming
from pgkeeper.api import PrefectLink, check_bind, create_app, parse_range, serve_api
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.download import write_backup
from pgkeeper.errors import ConfigError
from pgkeeper.manifest import Manifest, StoredObject
from pgkeeper.settings import Settings
from pgkeeper.storage import LocalStorage
from tests.servers import free_port, guarded_script_argv
from tests.servers.postgres import DEFAULT_PASSWORD, PgCluster
from tests.servers.s3 import S3Server
from tests.support.api import (
    ADMIN,
    AUTH,
    MIB,
    READ,
    READ_AUTH,
    LiveServer,
    RssWatch,
    TestClient,
    assert_error,
    backup_folders,
    live_api_server,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration

NO_PREFECT = PrefectLink(api_url=None, ui_url=None)
UNKNOWN_ID = "auto_backup_2020-01-01T00-00-00Z"
DUMP_AUTH = {**AUTH, "Content-Type": "application/octet-stream"}  # what an import sends
EVERYWHERE = "0.0.0.0"  # noqa: S104 - the address the bind rule must refuse without a token


# --- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    return tmp_path / "backups"


@pytest.fixture
def api_settings(sample_db: str, backup_dir: Path) -> Settings:
    """Settings for the sample database, local storage in tmp_path, both tokens set."""
    return settings_for(sample_db, backup_dir)


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    """The real app in-process, with no Prefect server configured."""
    with TestClient(create_app(api_settings, prefect=NO_PREFECT)) as test_client:
        yield test_client


def dbname_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def backup_now(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/api/backups", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    backup: dict[str, Any] = response.json()["backup"]
    return backup


def fabricate_backup(backup_dir: Path, size: int, name: str = "fabricated") -> Manifest:
    """A committed custom/none backup of ``size`` pseudo-random bytes, written straight to
    storage (no PostgreSQL needed to get a big object)."""
    storage = LocalStorage(backup_dir)
    now = datetime.now(UTC)
    backup_id = naming.make_id(name, now, millis=True)
    relative = naming.data_name(backup_id, "custom", "none")
    block = os.urandom(MIB)
    digest = hashlib.sha256()
    with storage.open_write(naming.object_key(backup_id, relative)) as out:
        written = 0
        while written < size:
            piece = block[: min(MIB, size - written)]
            out.write(piece)
            digest.update(piece)
            written += len(piece)
    manifest = Manifest(
        id=backup_id,
        name=name,
        database="fabricated",
        server="127.0.0.1:0",
        format="custom",
        compression="none",
        objects=[StoredObject(name=relative, size=size, sha256=digest.hexdigest())],
        size=size,
        started_at=now,
        finished_at=now,
        trigger="test",
    )
    catalog.write_manifest(storage, manifest)
    return manifest


def stored_file(backup_dir: Path, backup: dict[str, Any]) -> Path:
    return backup_dir / str(backup["id"]) / str(backup["filename"])


# --- health, docs, listing, showing ---------------------------------------------------------------


def test_health_answers_without_a_token(client: TestClient) -> None:
    """GET /api/health needs no token and says only that the process is alive."""
    response = client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body == {"success": True, "status": "ok", "version": body["version"]}


def test_openapi_docs_list_every_endpoint(client: TestClient) -> None:
    """/docs serves Swagger UI from local files (no CDN) and /openapi.json documents every
    endpoint with bearer auth."""
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    for asset in re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200, asset
    assert "/docs/assets/swagger-ui-bundle.js" in page.text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/api/health", "/api/backups", "/api/backups/restore", "/api/backups/download",
        "/api/backups/import", "/api/backups/{backup_id}", "/api/runs/{run_id}", "/metrics",
        "/api/databases", "/api/schedule",
    }  # fmt: skip
    assert set(schema["paths"]["/api/backups"]) == {"get", "post", "delete"}
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_list_has_the_seed_shape_with_totals_and_scheduler(
    client: TestClient, backup_dir: Path
) -> None:
    """GET /api/backups lists backups newest first with totals and a scheduler that is not
    running when no Prefect server is configured."""
    older = backup_now(client, name="first")
    newer = backup_now(client, name="second", compress=False)
    body = client.get("/api/backups", headers=READ_AUTH).json()
    assert body["success"] is True
    assert [b["id"] for b in body["backups"]] == [newer["id"], older["id"]]
    for record in body["backups"]:
        assert {"id", "filename", "size", "timestamp", "database", "compressed"} <= set(record)
        assert record["locations"] == [str(backup_dir)]
        assert record["timestamp"].endswith("Z")
    assert body["total"] == 2
    assert body["totalSize"] == older["size"] + newer["size"]
    assert body["scheduler"] == {
        "schedule": "daily",
        "enabled": True,
        "running": False,
        "detail": "no Prefect server is configured (set PREFECT_API_URL)",
    }


def test_show_returns_one_backup_and_where_it_is(client: TestClient, backup_dir: Path) -> None:
    """GET /api/backups/{id} returns the full record and its locations."""
    made = backup_now(client)
    body = client.get(f"/api/backups/{made['id']}", headers=READ_AUTH).json()
    assert body["success"] is True
    assert body["backup"]["id"] == made["id"]
    assert body["backup"]["sha256"] == made["sha256"]
    assert body["backup"]["locations"] == [str(backup_dir)]


# --- create ---------------------------------------------------------------------------------------


def test_create_returns_the_new_backup_verified_and_stored(
    client: TestClient, backup_dir: Path, sample_db: str
) -> None:
    """POST /api/backups with the seed's body dumps, verifies and answers with the backup."""
    response = client.post(
        "/api/backups", json={"name": "manual_backup", "compress": True}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    backup = body["backup"]
    assert backup["id"].startswith("manual_backup_")
    assert backup["filename"] == f"{backup['id']}.dump.zst"
    assert backup["compressed"] is True
    assert backup["database"] == dbname_of(sample_db)
    assert backup["state"] == "verified"
    assert backup["trigger"] == "api"
    assert stored_file(backup_dir, backup).stat().st_size == backup["size"]
    assert body["locations"] == [str(backup_dir)]


@pytest.mark.parametrize(
    ("body", "suffix", "compressed"),
    [
        ({"compress": False}, ".dump", False),
        ({"format": "plain", "compression": "gzip"}, ".sql.gz", True),
        ({}, ".dump.zst", True),
    ],
)
def test_create_honours_compress_format_and_compression(
    client: TestClient, body: dict[str, Any], suffix: str, compressed: bool
) -> None:
    """compress false stores the dump uncompressed; format and compression pick the file type;
    an empty body makes a 'manual_backup' with the defaults."""
    backup = backup_now(client, **body)
    assert backup["filename"].endswith(suffix)
    assert backup["compressed"] is compressed
    assert backup["id"].startswith("manual_backup_")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "../etc"}, ["backup name"]),
        ({"name": ""}, ["backup name"]),
        ({"compress": False, "compression": "zstd"}, ["compress is false"]),
        ({"format": "tar"}, ["field 'format'"]),
        ({"wait": "later"}, ["field 'wait'"]),
        ([1, 2], ["the request body"]),
    ],
)
def test_create_refuses_bad_input_with_400(
    client: TestClient, backup_dir: Path, body: Any, words: list[str]
) -> None:
    """Bad bodies get 400 with a one-line reason, and no backup is made."""
    assert_error(client.post("/api/backups", json=body, headers=AUTH), 400, *words)
    assert backup_folders(backup_dir) == []


def test_create_refuses_a_body_that_is_not_json(client: TestClient) -> None:
    """A body that is not JSON gets 400 saying so."""
    response = client.post(
        "/api/backups", content=b"{name:", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(response, 400, "not valid JSON")


def test_a_second_backup_while_one_runs_is_refused_with_409(
    client: TestClient, sample_db: str, pg_cluster: PgCluster
) -> None:
    """While a backup of the database runs, a second POST /api/backups answers 409 at once and
    the first one still completes."""
    dbname = dbname_of(sample_db)
    outcome: dict[str, httpx.Response] = {}
    first = threading.Thread(
        target=lambda: outcome.update(
            first=client.post("/api/backups", json={"name": "first"}, headers=AUTH)
        )
    )

    def first_holds_the_backup_lock() -> bool:
        rows = pg_cluster.query(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND l.granted AND d.datname = %s",
            [dbname],
        )
        return bool(rows[0][0])

    # An exclusive table lock makes the first pg_dump wait inside the backup, deterministically
    # long, while it holds the engine's per-database lock.
    with pg_cluster.connect(dbname) as blocker, blocker.transaction():
        blocker.execute("LOCK TABLE shop.orders IN ACCESS EXCLUSIVE MODE")
        first.start()
        wait_until(first_holds_the_backup_lock, 30, "the first backup to take its lock")
        second = client.post("/api/backups", json={"name": "second"}, headers=AUTH)
        assert_error(second, 409, "another backup", dbname)
        assert first.is_alive()
    first.join(60)
    assert outcome["first"].status_code == 200, outcome["first"].text
    listed = client.get("/api/backups", headers=AUTH).json()["backups"]
    assert [b["name"] for b in listed] == ["first"]


# --- delete ---------------------------------------------------------------------------------------


def test_delete_removes_the_backup(client: TestClient, backup_dir: Path) -> None:
    """DELETE /api/backups?id= answers the seed's message and the backup is gone."""
    made = backup_now(client)
    response = client.delete("/api/backups", params={"id": made["id"]}, headers=AUTH)
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": "Backup deleted successfully"}
    assert backup_folders(backup_dir) == []
    assert_error(client.get(f"/api/backups/{made['id']}", headers=AUTH), 404, "not found")
    assert_error(
        client.delete("/api/backups", params={"id": made["id"]}, headers=AUTH), 404, "not found"
    )


# --- auth -----------------------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/api/backups", None),
    ("GET", f"/api/backups/{UNKNOWN_ID}", None),
    ("GET", f"/api/backups/download?id={UNKNOWN_ID}", None),
    ("GET", f"/api/runs/{uuid.UUID(int=1)}", None),
    ("POST", "/api/backups", {"name": "x"}),
    ("DELETE", f"/api/backups?id={UNKNOWN_ID}", None),
    ("POST", "/api/backups/restore", {"backupId": UNKNOWN_ID}),
    ("POST", "/api/backups/import", None),
    ("GET", "/api/schedule", None),
    ("PUT", "/api/schedule", {"schedule": "daily"}),
]
WRITES = [p for p in PROTECTED if p[0] != "GET"]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN}"},
     {"Authorization": f"Bearer {ADMIN}x"}],
    ids=["no-token", "wrong-token", "basic-scheme", "token-prefix"],
)  # fmt: skip
def test_requests_without_a_valid_token_get_401(
    client: TestClient, backup_dir: Path, method: str, path: str, body: Any,
    headers: dict[str, str],
) -> None:  # fmt: skip
    """Every endpoint but health answers 401 with a Bearer challenge to a missing or wrong
    token, and does nothing."""
    response = client.request(method, path, json=body, headers=headers)
    assert_error(response, 401, "token")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert backup_folders(backup_dir) == []


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_the_read_token_cannot_write(
    client: TestClient, backup_dir: Path, method: str, path: str, body: Any
) -> None:
    """The read-only token gets 403 on every write, which does nothing."""
    response = client.request(method, path, json=body, headers=READ_AUTH)
    assert_error(response, 403, "read-only token")
    assert backup_folders(backup_dir) == []


def test_the_read_token_reads(client: TestClient) -> None:
    """The read-only token lists, shows and downloads."""
    made = backup_now(client)
    assert client.get("/api/backups", headers=READ_AUTH).status_code == 200
    assert client.get(f"/api/backups/{made['id']}", headers=READ_AUTH).status_code == 200
    download = client.get("/api/backups/download", params={"id": made["id"]}, headers=READ_AUTH)
    assert download.status_code == 200
    assert len(download.content) == made["size"]


def test_a_read_token_alone_makes_a_read_only_api(sample_db: str, backup_dir: Path) -> None:
    """With only BACKUP_API_READ_TOKEN set, reads need it and every write is refused."""
    settings = settings_for(sample_db, backup_dir, backup_api_token=None)
    with TestClient(create_app(settings, prefect=NO_PREFECT)) as read_only:
        assert_error(read_only.get("/api/backups"), 401)
        assert read_only.get("/api/backups", headers=READ_AUTH).status_code == 200
        assert_error(read_only.post("/api/backups", json={}, headers=READ_AUTH), 403)
        assert_error(read_only.post("/api/backups", json={}, headers=AUTH), 401)


def test_without_tokens_every_request_is_allowed(sample_db: str, backup_dir: Path) -> None:
    """With no token configured (a loopback-only server) requests to a loopback Host need no
    Authorization."""
    settings = settings_for(sample_db, backup_dir, backup_api_token=None,
                            backup_api_read_token=None)  # fmt: skip
    app = create_app(settings, prefect=NO_PREFECT)
    with TestClient(app, base_url="http://127.0.0.1:8080") as open_client:
        assert open_client.get("/api/backups").status_code == 200
        assert open_client.post("/api/backups", json={}).status_code == 200


# --- ids ------------------------------------------------------------------------------------------

BAD_IDS = ["../etc/passwd", "", "/etc/passwd", f"{UNKNOWN_ID}/../../x", f"{UNKNOWN_ID}\n",
           "x" * 500, "auto_backup_2020-01-01T00-00-00Z.dump"]  # fmt: skip


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_ids_that_are_not_backup_ids_get_400_before_storage(
    client: TestClient, tmp_path: Path, bad_id: str
) -> None:
    """Path-like, empty, over-long and suffixed ids get 400 from download, delete, restore
    and show, and nothing outside the backup folder is read or removed."""
    decoy = tmp_path / "etc" / "passwd"
    decoy.parent.mkdir()
    decoy.write_text("not yours")
    calls = [
        client.get("/api/backups/download", params={"id": bad_id}, headers=AUTH),
        client.delete("/api/backups", params={"id": bad_id}, headers=AUTH),
        client.post("/api/backups/restore", json={"backupId": bad_id}, headers=AUTH),
    ]
    for response in calls:
        error = assert_error(response, 400, "is not a backup id")
        assert len(error) < 300
    if bad_id and "/" not in bad_id:
        response = client.get(f"/api/backups/{quote(bad_id, safe='')}", headers=AUTH)
        assert_error(response, 400, "is not a backup id")
    assert decoy.read_text() == "not yours"


def test_slashes_in_a_path_id_never_reach_a_handler(client: TestClient) -> None:
    """An encoded path in GET /api/backups/{id} matches no route: 404 in the error shape."""
    response = client.get("/api/backups/..%2F..%2Fetc%2Fpasswd", headers=AUTH)
    assert_error(response, 404, "no such endpoint")


def test_unknown_ids_get_404(client: TestClient) -> None:
    """A well-formed id of no backup gets 404 from show, download, delete and restore."""
    for response in (
        client.get(f"/api/backups/{UNKNOWN_ID}", headers=AUTH),
        client.get("/api/backups/download", params={"id": UNKNOWN_ID}, headers=AUTH),
        client.delete("/api/backups", params={"id": UNKNOWN_ID}, headers=AUTH),
        client.post("/api/backups/restore", json={"backupId": UNKNOWN_ID}, headers=AUTH),
    ):
        assert_error(response, 404, UNKNOWN_ID, "not found")


def test_a_missing_id_parameter_is_400(client: TestClient) -> None:
    """DELETE and download without ?id= get 400 naming the parameter."""
    assert_error(client.delete("/api/backups", headers=AUTH), 400, "'id' is required")
    assert_error(client.get("/api/backups/download", headers=AUTH), 400, "'id' is required")


# --- download -------------------------------------------------------------------------------------


def test_download_sends_the_stored_file_with_length_and_name(
    client: TestClient, backup_dir: Path
) -> None:
    """GET /api/backups/download?id= sends the stored bytes with Content-Length, an attachment
    filename, the sha256 as ETag, and Accept-Ranges."""
    made = backup_now(client)
    response = client.get("/api/backups/download", params={"id": made["id"]}, headers=AUTH)
    assert response.status_code == 200
    assert response.content == stored_file(backup_dir, made).read_bytes()
    assert response.headers["content-length"] == str(made["size"])
    assert response.headers["content-disposition"] == f'attachment; filename="{made["filename"]}"'
    assert response.headers["etag"] == f'"{made["sha256"]}"'
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "application/octet-stream"


def test_head_on_download_answers_the_get_headers_without_a_body(client: TestClient) -> None:
    """HEAD tells a client the size, name and checksum before it downloads (e.g. to resume)."""
    made = backup_now(client)
    params = {"id": made["id"]}
    got = client.get("/api/backups/download", params=params, headers=AUTH)
    head = client.head("/api/backups/download", params=params, headers=AUTH)
    assert head.status_code == 200 and head.content == b""
    for name in ("content-length", "content-disposition", "etag", "accept-ranges",
                 "content-type", "x-backup-sha256"):  # fmt: skip
        assert head.headers[name] == got.headers[name], name
    ranged = client.head(
        "/api/backups/download", params=params, headers={**AUTH, "Range": "bytes=0-9"}
    )
    assert ranged.status_code == 206 and ranged.content == b""
    assert ranged.headers["content-range"] == f"bytes 0-9/{made['size']}"
    assert ranged.headers["content-length"] == "10"
    missing = client.head(
        "/api/backups/download", params={"id": "auto_backup_2020-01-01T00-00-00Z"}, headers=AUTH
    )
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=100-", 100, None),
        ("bytes=-10", -10, None),
        ("bytes=5-5", 5, 5),
        ("bytes=10-99999999", 10, None),
        ("bytes=-99999999", 0, None),
    ],
)
def test_a_range_request_gets_206_and_exactly_those_bytes(
    client: TestClient, backup_dir: Path, header: str, first: int, last: int | None
) -> None:
    """A single byte range gets 206 with Content-Range and exactly the bytes asked for."""
    made = backup_now(client)
    data = stored_file(backup_dir, made).read_bytes()
    expected = data[first:] if last is None else data[first : last + 1]
    response = client.get(
        "/api/backups/download", params={"id": made["id"]}, headers={**AUTH, "Range": header}
    )
    assert response.status_code == 206
    assert response.content == expected
    start = data.index(expected) if first < 0 else first
    assert response.headers["content-range"] == (
        f"bytes {start}-{start + len(expected) - 1}/{len(data)}"
    )
    assert response.headers["content-length"] == str(len(expected))


@pytest.mark.parametrize("header", ["bytes=abc", "bytes=0-1,5-6", "items=0-5", "bytes=9-3"])
def test_a_range_header_the_server_ignores_gets_the_whole_file(
    client: TestClient, header: str
) -> None:
    """Malformed, multi-range and reversed ranges are ignored: 200 with the whole file."""
    made = backup_now(client)
    response = client.get(
        "/api/backups/download", params={"id": made["id"]}, headers={**AUTH, "Range": header}
    )
    assert response.status_code == 200
    assert len(response.content) == made["size"]


def test_a_range_past_the_end_gets_416(client: TestClient) -> None:
    """A range starting at or past the end gets 416 with Content-Range */size."""
    made = backup_now(client)
    for header in (f"bytes={made['size']}-", "bytes=-0"):
        response = client.get(
            "/api/backups/download", params={"id": made["id"]}, headers={**AUTH, "Range": header}
        )
        assert_error(response, 416, "outside")
        assert response.headers["content-range"] == f"bytes */{made['size']}"


def test_if_range_with_another_etag_gets_the_whole_file(client: TestClient) -> None:
    """If-Range naming other bytes makes the server send everything (200), the same ETag the
    range (206)."""
    made = backup_now(client)
    params = {"id": made["id"]}
    stale = client.get("/api/backups/download", params=params,
                       headers={**AUTH, "Range": "bytes=0-9", "If-Range": '"0000"'})  # fmt: skip
    assert stale.status_code == 200 and len(stale.content) == made["size"]
    same = f'"{made["sha256"]}"'
    fresh = client.get("/api/backups/download", params=params,
                       headers={**AUTH, "Range": "bytes=0-9", "If-Range": same})  # fmt: skip
    assert fresh.status_code == 206 and len(fresh.content) == 10


def test_a_directory_backup_downloads_as_the_same_tar_as_the_cli(
    client: TestClient, backup_dir: Path
) -> None:
    """A directory-format backup downloads as the tar `pgkeeper download` writes, byte for
    byte, with an exact Content-Length and no Range support."""
    made = backup_now(client, format="directory", compression="gzip")
    response = client.get(
        "/api/backups/download", params={"id": made["id"]}, headers={**AUTH, "Range": "bytes=0-9"}
    )
    assert response.status_code == 200
    assert response.headers["accept-ranges"] == "none"
    assert response.headers["content-disposition"] == f'attachment; filename="{made["id"]}.dir.tar"'
    manifest, storage = catalog.find([LocalStorage(backup_dir)], made["id"])
    expected = io.BytesIO()
    write_backup(storage, manifest, expected)
    assert response.content == expected.getvalue()
    assert response.headers["content-length"] == str(len(expected.getvalue()))
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        assert any(name.endswith("/toc.dat") for name in archive.getnames())


# --- import ---------------------------------------------------------------------------------------


def pg_dump_bytes(pg_cluster: PgCluster, dbname: str, *args: str) -> bytes:
    env = {**os.environ, **pg_cluster.libpq_env(dbname)}
    return subprocess.run(
        [str(pg_cluster.bindir / "pg_dump"), *args], env=env, capture_output=True, check=True
    ).stdout


@pytest.mark.parametrize("dump_args", [("--format=custom",), ("--format=plain",)])
def test_import_of_a_real_dump_makes_a_verified_backup(
    client: TestClient, pg_cluster: PgCluster, sample_db: str, dump_args: tuple[str, ...]
) -> None:
    """POST /api/backups/import?name= with a pg_dump file as the body stores it as a new,
    verified backup that lists and downloads as the same bytes."""
    dump = pg_dump_bytes(pg_cluster, dbname_of(sample_db), *dump_args)
    response = client.post(
        "/api/backups/import", params={"name": "from_elsewhere"}, content=dump,
        headers=DUMP_AUTH,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["message"] == "Backup imported successfully"
    backup = body["backup"]
    assert backup["id"].startswith("from_elsewhere_")
    assert backup["trigger"] == "import"
    assert backup["state"] == "verified"
    assert backup["size"] == len(dump)
    listed = client.get("/api/backups", headers=AUTH).json()["backups"]
    assert [b["id"] for b in listed] == [backup["id"]]
    download = client.get("/api/backups/download", params={"id": backup["id"]}, headers=AUTH)
    assert download.content == dump


@pytest.mark.parametrize(
    "garbage",
    [os.urandom(200_000), b"", b"PGDMP" + os.urandom(5000), b"-- just a comment\n" * 10],
    ids=["random", "empty", "fake-header", "text"],
)
def test_import_of_garbage_gets_422_and_leaves_nothing(
    client: TestClient, backup_dir: Path, garbage: bytes
) -> None:
    """A body that is not a PostgreSQL dump gets 422 saying so; nothing is stored."""
    response = client.post("/api/backups/import", content=garbage, headers=DUMP_AUTH)
    assert_error(response, 422, "not")
    assert "dump" in response.json()["error"]
    assert backup_folders(backup_dir) == []


def test_import_with_a_bad_name_gets_400(client: TestClient, backup_dir: Path) -> None:
    """An import name that cannot start an id gets 400 before the body is read."""
    response = client.post(
        "/api/backups/import", params={"name": "../up"}, content=b"x", headers=DUMP_AUTH
    )
    assert_error(response, 400, "backup name")
    assert backup_folders(backup_dir) == []


def test_import_larger_than_the_limit_gets_413(
    sample_db: str, backup_dir: Path, pg_cluster: PgCluster
) -> None:
    """A body over BACKUP_API_MAX_IMPORT_BYTES gets 413, whether its Content-Length says so
    up front or it arrives chunked with no length; nothing is stored."""
    dump = pg_dump_bytes(pg_cluster, dbname_of(sample_db), "--format=plain")
    limit = len(dump) // 3
    settings = settings_for(sample_db, backup_dir, backup_api_max_import_bytes=limit)

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(dump), 16 * 1024):
            yield dump[start : start + 16 * 1024]

    with TestClient(create_app(settings, prefect=NO_PREFECT)) as small:
        declared = small.post("/api/backups/import", content=dump, headers=DUMP_AUTH)
        assert_error(declared, 413, "import limit", str(limit))
        streamed = small.post("/api/backups/import", content=chunked(), headers=DUMP_AUTH)
        assert_error(streamed, 413, "import limit")
    assert backup_folders(backup_dir) == []


# --- restore --------------------------------------------------------------------------------------


def test_restore_into_a_new_database_by_name(
    client: TestClient, pg_cluster: PgCluster, sample_db: str
) -> None:
    """POST /api/backups/restore with a target name restores into a new database on the
    DATABASE_URL server and answers with the seed's message and the backup."""
    made = backup_now(client)
    target = f"restored_{uuid.uuid4().hex[:8]}"
    try:
        response = client.post(
            "/api/backups/restore", json={"backupId": made["id"], "target": target}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["success"] is True
        assert body["message"] == "Backup restored successfully"
        assert body["backup"]["id"] == made["id"]
        assert body["restore"]["database"] == target
        assert body["restore"]["replaced"] is False
        assert body["restore"]["safetyBackupId"] is None
        assert DEFAULT_PASSWORD not in response.text
        rows = pg_cluster.query("SELECT count(*) FROM shop.orders", dbname=target)
        assert rows[0][0] == 1200
    finally:
        pg_cluster.drop_database(target)


def test_restore_of_latest_without_target_makes_a_new_database(
    client: TestClient, pg_cluster: PgCluster, sample_db: str
) -> None:
    """backupId 'latest' with no target restores the newest verified backup into a new
    <db>_restored_<time> database; the source is untouched."""
    backup_now(client, name="older")
    newest = backup_now(client, name="newer")
    response = client.post("/api/backups/restore", json={"backupId": "latest"}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    created = body["restore"]["database"]
    try:
        assert body["backup"]["id"] == newest["id"]
        assert created.startswith(f"{dbname_of(sample_db)}_restored_")
        assert pg_cluster.database_exists(created)
    finally:
        pg_cluster.drop_database(created)


def test_restore_over_a_database_with_data_needs_confirm_naming_it(
    client: TestClient, pg_cluster: PgCluster, sample_db: str
) -> None:
    """Restoring over a database with data gets 409 unless confirm names it (true or another
    name is not enough); confirmed, it is replaced after a safety backup."""
    dbname = dbname_of(sample_db)
    made = backup_now(client)
    pg_cluster.execute("INSERT INTO public.audit_log (note) VALUES ('after the backup')",
                       dbname=dbname)  # fmt: skip
    for confirm in (None, True, "someone_else"):
        response = client.post(
            "/api/backups/restore",
            json={"backupId": made["id"], "target": dbname, "confirm": confirm},
            headers=AUTH,
        )
        assert_error(response, 409, f'"confirm": "{dbname}"')
    assert pg_cluster.query("SELECT count(*) FROM public.audit_log", dbname=dbname)[0][0] == 1
    response = client.post(
        "/api/backups/restore",
        json={"backupId": made["id"], "target": dbname, "confirm": dbname},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    restored = response.json()["restore"]
    assert restored["replaced"] is True
    assert restored["safetyBackupId"].startswith("pre_restore_")
    assert pg_cluster.query("SELECT count(*) FROM public.audit_log", dbname=dbname)[0][0] == 0
    ids = [b["id"] for b in client.get("/api/backups", headers=AUTH).json()["backups"]]
    assert restored["safetyBackupId"] in ids


def test_restore_errors_never_carry_a_password(
    client: TestClient, pg_cluster: PgCluster
) -> None:
    """A target URL with a wrong password or an unreachable server gets a one-line error
    without the password; bad jobs and empty targets get 400."""
    made = backup_now(client)
    secret = "Wr0ng-Secret-Passw0rd"
    cases = [
        (f"postgresql://postgres:{secret}@127.0.0.1:{pg_cluster.port}/x", 400),
        (f"postgresql://postgres:{secret}@127.0.0.1:1/x", 503),
        (f"host=127.0.0.1 port=1 password={secret} dbname=x", 503),
    ]
    for target, status in cases:
        response = client.post(
            "/api/backups/restore", json={"backupId": made["id"], "target": target}, headers=AUTH
        )
        assert_error(response, status)
        assert secret not in response.text
    for body in ({"jobs": 0}, {"target": ""}, {"target": "a/b"}):
        response = client.post(
            "/api/backups/restore", json={"backupId": made["id"], **body}, headers=AUTH
        )
        assert_error(response, 400)


# --- an offsite S3 copy ---------------------------------------------------------------------------


def test_an_s3_copy_is_made_listed_downloaded_and_deleted(
    sample_db: str, backup_dir: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    """With an offsite S3 target, a new backup is copied there and listed in both places;
    with the local copy gone the download (and a Range of it) comes from S3; delete empties
    both."""
    settings = settings_for(
        sample_db, backup_dir, backup_targets=[f"s3://{s3_bucket}/pg"],
        aws_access_key_id=s3_server.access_key, aws_secret_access_key=s3_server.secret_key,
        backup_s3_endpoint_url=s3_server.endpoint_url, backup_s3_region=s3_server.region,
    )  # fmt: skip
    with TestClient(create_app(settings, prefect=NO_PREFECT)) as client:
        response = client.post("/api/backups", json={}, headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        s3_url = body["locations"][1]
        assert body["locations"][0] == str(backup_dir) and s3_url.startswith("s3://")
        assert body["upload"] == {"copiedTo": [s3_url], "failed": {}}
        made = body["backup"]
        assert client.get(f"/api/backups/{made['id']}", headers=AUTH).json()["backup"][
            "locations"
        ] == [str(backup_dir), s3_url]
        data = stored_file(backup_dir, made).read_bytes()
        shutil.rmtree(backup_dir / made["id"])
        params = {"id": made["id"]}
        whole = client.get("/api/backups/download", params=params, headers=AUTH)
        assert whole.status_code == 200 and whole.content == data
        part = client.get("/api/backups/download", params=params,
                          headers={**AUTH, "Range": "bytes=100-199"})  # fmt: skip
        assert part.status_code == 206 and part.content == data[100:200]
        deleted = client.delete("/api/backups", params=params, headers=AUTH)
        assert deleted.status_code == 200
    listing = s3_server.client().list_objects_v2(Bucket=s3_bucket)
    assert listing.get("KeyCount", 0) == 0


# --- Prefect stays out of the process -------------------------------------------------------------

_NO_PREFECT_PROBE = """
import sys
from starlette.testclient import TestClient
from pgkeeper.api import create_app
from pgkeeper.settings import load_settings
client = TestClient(create_app(load_settings(_env_file=None, backup_dir=sys.argv[1])),
                    base_url="http://127.0.0.1:8080")
for path in ("/api/health", "/api/backups", "/api/backups/download?id=x_2020-01-01T00-00-00Z",
             "/openapi.json"):
    assert client.get(path).status_code in (200, 404), path
print(sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect.")))
"""


def test_serving_and_reading_never_import_prefect(backup_dir: Path, tmp_path: Path) -> None:
    """Building the app and answering reads never imports Prefect (seconds and tens of MiB),
    even with a Prefect server configured."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:1/api"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the child's warnings are not this process's
        out = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", _NO_PREFECT_PROBE, str(backup_dir)],
            env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
        )  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- errors that are nobody's fault ---------------------------------------------------------------


def test_an_unexpected_error_is_a_500_without_details(
    api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside a handler answers 500 in the error shape, with no traceback or secret."""

    def explode(*_args: object) -> None:
        raise RuntimeError(f"boom postgresql://postgres:{DEFAULT_PASSWORD}@db/x")

    monkeypatch.setattr(catalog, "list_all", explode)
    app = create_app(api_settings, prefect=NO_PREFECT)
    with TestClient(app, raise_server_exceptions=False) as crashing:
        response = crashing.get("/api/backups", headers=AUTH)
    assert_error(response, 500, "internal error")
    assert DEFAULT_PASSWORD not in response.text and "boom" not in response.text


def test_unknown_routes_and_methods_use_the_error_shape(client: TestClient) -> None:
    """404 and 405 from the router come in the API's error shape too."""
    assert_error(client.get("/api/nothing", headers=AUTH), 404, "no such endpoint")
    assert_error(client.put("/api/backups", headers=AUTH), 405, "method not allowed")


# --- Prefect: "wait": false, /api/runs, scheduler.running -----------------------------------------


@dataclass
class PrefectApi:
    """The session's Prefect server, with the calls a deployment and a runner make."""

    url: str

    def client(self) -> Any:
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    def clear(self) -> None:
        """Remove every deployment of pgkeeper's flows (other tests' or ours)."""
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        with self.client() as client:
            flows = FlowFilter(name=FlowFilterName(any_=["backup", "restore"]))
            for deployment in client.read_deployments(flow_filter=flows):
                client.delete_deployment(deployment.id)

    def deploy(self, flow: str, name: str, *, active: bool = True) -> uuid.UUID:
        from prefect.client.schemas.actions import DeploymentScheduleCreate
        from prefect.client.schemas.schedules import CronSchedule

        with self.client() as client:
            flow_id = client.create_flow_from_name(flow)
            schedule = DeploymentScheduleCreate(schedule=CronSchedule(cron="0 2 * * *"),
                                                active=active)  # fmt: skip
            deployment_id: uuid.UUID = client.create_deployment(
                flow_id=flow_id, name=name, schedules=[schedule]
            )
            return deployment_id

    def poll(self, deployment_id: uuid.UUID) -> None:
        """What a runner (`prefect serve`) does every few seconds; it marks the deployment
        READY."""
        with self.client() as client:
            client.get_scheduled_flow_runs_for_deployments([deployment_id])

    def pause(self, deployment_id: uuid.UUID) -> None:
        with self.client() as client:
            client.pause_deployment(deployment_id)

    def run_parameters(self, run_id: str) -> dict[str, Any]:
        with self.client() as client:
            parameters: dict[str, Any] = client.read_flow_run(uuid.UUID(run_id)).parameters
            return parameters

    def complete(self, run_id: str) -> None:
        from prefect.states import Completed

        with self.client() as client:
            client.set_flow_run_state(uuid.UUID(run_id), Completed(), force=True)

    def foreign_run(self) -> str:
        """A flow run of a flow that is not pgkeeper's."""
        with self.client() as client:
            flow_id = client.create_flow_from_name("someone-elses-flow")
            deployment_id = client.create_deployment(flow_id=flow_id, name="theirs")
            return str(client.create_flow_run_from_deployment(deployment_id).id)


@pytest.fixture
def prefect_api(prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PrefectApi]:
    """The session's Prefect server as PREFECT_API_URL, without pgkeeper deployments."""
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    api = PrefectApi(prefect_server)
    api.clear()
    yield api
    api.clear()


def scheduler_of(settings: Settings) -> dict[str, Any]:
    """A fresh app's scheduler status (the status is cached per app for a few seconds)."""
    with TestClient(create_app(settings)) as fresh:
        scheduler: dict[str, Any] = fresh.get("/api/backups", headers=AUTH).json()["scheduler"]
        return scheduler


def test_scheduler_running_is_true_only_while_a_scheduler_polls_an_active_schedule(
    prefect_api: PrefectApi, api_settings: Settings
) -> None:
    """scheduler.running is false with no deployment, with a schedule nobody polls, with only
    inactive schedules and when paused; true once a runner polls an active backup schedule."""
    assert scheduler_of(api_settings)["running"] is False
    inactive = prefect_api.deploy("backup", "backup-hourly", active=False)
    prefect_api.poll(inactive)
    assert scheduler_of(api_settings)["running"] is False
    daily = prefect_api.deploy("backup", "backup-daily")
    not_polled = scheduler_of(api_settings)
    assert not_polled["running"] is False
    assert "pgkeeper serve" in not_polled["detail"]
    prefect_api.poll(daily)
    running = scheduler_of(api_settings)
    assert running["running"] is True
    assert "backup/backup-daily" in running["detail"]
    prefect_api.pause(daily)
    assert scheduler_of(api_settings)["running"] is False


def test_wait_false_starts_a_backup_run_whose_state_the_api_reports(
    prefect_api: PrefectApi, api_settings: Settings, backup_dir: Path
) -> None:
    """POST /api/backups with wait false answers 202 with the Prefect run's id and UI URL at
    once (no backup made here); GET /api/runs/{id} follows its state."""
    daily = prefect_api.deploy("backup", "backup-daily")
    prefect_api.poll(daily)
    with TestClient(create_app(api_settings)) as client:
        response = client.post(
            "/api/backups", json={"name": "nightly", "compress": False, "wait": False},
            headers=AUTH,
        )  # fmt: skip
        assert response.status_code == 202, response.text
        run = response.json()["run"]
        assert response.json()["success"] is True
        assert run["flow"] == "backup" and run["deployment"] == "backup/backup-daily"
        assert run["state"] == "Scheduled"
        assert run["url"] == f"{prefect_api.url.removesuffix('/api')}/runs/flow-run/{run['id']}"
        assert response.headers["location"] == f"/api/runs/{run['id']}"
        assert prefect_api.run_parameters(run["id"]) == {"name": "nightly", "compression": "none"}
        assert backup_folders(backup_dir) == []
        defaults = client.post("/api/backups", json={"wait": False}, headers=AUTH).json()["run"]
        assert prefect_api.run_parameters(defaults["id"]) == {"name": "manual_backup"}

        state = client.get(f"/api/runs/{run['id']}", headers=READ_AUTH).json()["run"]
        assert (state["state"], state["stateType"], state["finished"]) == (
            "Scheduled", "SCHEDULED", False,
        )  # fmt: skip
        assert state["deployment"] == "backup/backup-daily"
        prefect_api.complete(run["id"])
        state = client.get(f"/api/runs/{run['id']}", headers=READ_AUTH).json()["run"]
        assert (state["state"], state["finished"]) == ("Completed", True)
        assert state["backupId"] is None  # completed here by hand: it made no backup


def test_a_finished_backup_run_reports_the_backup_it_made(
    prefect_api: PrefectApi, api_settings: Settings
) -> None:
    """The backup task records its flow run's id in the manifest; GET /api/runs/{id} of the
    finished run then names that backup (and nothing while the run is not finished)."""
    daily = prefect_api.deploy("backup", "backup-daily")
    prefect_api.poll(daily)
    with TestClient(create_app(api_settings)) as client:
        run = client.post("/api/backups", json={"wait": False}, headers=AUTH).json()["run"]
        # What tasks/backup.py does inside that run (the flow itself is run in test_flows).
        manifest = run_backup(api_settings, BackupOptions(trigger="api", flow_run_id=run["id"]))
        state = client.get(f"/api/runs/{run['id']}", headers=READ_AUTH).json()["run"]
        assert state["finished"] is False and state["backupId"] is None
        prefect_api.complete(run["id"])
        state = client.get(f"/api/runs/{run['id']}", headers=READ_AUTH).json()["run"]
        assert (state["finished"], state["backupId"]) == (True, manifest.id)


def test_wait_false_starts_a_restore_run_without_secrets_in_its_parameters(
    prefect_api: PrefectApi, client: TestClient, api_settings: Settings
) -> None:
    """POST /api/backups/restore with wait false checks the id, refuses a target carrying a
    password (flow parameters show in the UI) and starts the restore flow."""
    made = backup_now(client)
    restore = prefect_api.deploy("restore", "restore", active=False)
    prefect_api.poll(restore)
    with TestClient(create_app(api_settings)) as prefect_client:
        with_password = prefect_client.post(
            "/api/backups/restore",
            json={"backupId": made["id"], "wait": False,
                  "target": f"postgresql://postgres:{DEFAULT_PASSWORD}@127.0.0.1/x"},
            headers=AUTH,
        )  # fmt: skip
        assert_error(with_password, 400, "without password")
        assert DEFAULT_PASSWORD not in with_password.text
        assert_error(
            prefect_client.post("/api/backups/restore",
                                json={"backupId": UNKNOWN_ID, "wait": False}, headers=AUTH),
            404,
        )  # fmt: skip
        response = prefect_client.post(
            "/api/backups/restore",
            json={"backupId": made["id"], "target": "copy", "confirm": "copy", "wait": False},
            headers=AUTH,
        )
        assert response.status_code == 202, response.text
        run = response.json()["run"]
        assert run["deployment"] == "restore/restore"
        assert prefect_api.run_parameters(run["id"]) == {
            "backup_id": made["id"], "target": "copy", "confirm": "copy", "safety_backup": True,
        }  # fmt: skip


def test_wait_false_refuses_when_nothing_serves_the_flow(
    prefect_api: PrefectApi, api_settings: Settings
) -> None:
    """With no deployment, or one nobody polls, wait false answers 503 and starts nothing."""
    with TestClient(create_app(api_settings)) as client:
        none = client.post("/api/backups", json={"wait": False}, headers=AUTH)
        assert_error(none, 503, "no backup deployment")
        prefect_api.deploy("backup", "backup-daily")
        unserved = client.post("/api/backups", json={"wait": False}, headers=AUTH)
        assert_error(unserved, 503, "nothing is serving")


def test_runs_of_other_flows_and_unknown_runs_get_404(
    prefect_api: PrefectApi, api_settings: Settings
) -> None:
    """GET /api/runs/{id} reports only pgkeeper's flow runs: others and unknown ids are 404."""
    foreign = prefect_api.foreign_run()
    with TestClient(create_app(api_settings)) as client:
        assert_error(client.get(f"/api/runs/{foreign}", headers=AUTH), 404, "no pgkeeper")
        assert_error(client.get(f"/api/runs/{uuid.uuid4()}", headers=AUTH), 404)
        assert_error(client.get("/api/runs/not-a-uuid", headers=AUTH), 400, "run_id")


def test_without_a_prefect_server_runs_answer_503_and_listing_still_works(
    client: TestClient, api_settings: Settings
) -> None:
    """No configured or an unreachable Prefect server: wait false and /api/runs answer 503
    with what to do; the listing still answers and says why the scheduler is not running."""
    assert_error(client.post("/api/backups", json={"wait": False}, headers=AUTH), 503,
                 "PREFECT_API_URL")  # fmt: skip
    assert_error(client.get(f"/api/runs/{uuid.uuid4()}", headers=AUTH), 503, "PREFECT_API_URL")
    unreachable = PrefectLink(api_url="http://user:pw-in-url@127.0.0.1:1/api", ui_url=None)
    with TestClient(create_app(api_settings, prefect=unreachable)) as down:
        listing = down.get("/api/backups", headers=AUTH).json()
        assert listing["scheduler"]["running"] is False
        assert "unreachable" in listing["scheduler"]["detail"]
        response = down.post("/api/backups", json={"wait": False}, headers=AUTH)
        assert_error(response, 503, "unreachable")
        assert "pw-in-url" not in response.text


_SERVED_BACKUP_FLOW = """
from prefect import flow, serve
from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.settings import load_settings

@flow(name="backup")
def backup(name: str | None = None, compression: str | None = None, format: str | None = None):
    options = BackupOptions(name=name, compression=compression, format=format, trigger="api")
    return run_backup(load_settings(_env_file=None), options).id

if __name__ == "__main__":
    serve(backup.to_deployment("backup-daily", cron="0 2 * * *"), limit=1)
"""


@pytest.mark.slow
def test_a_real_runner_makes_the_scheduler_run_and_executes_a_wait_false_backup(
    prefect_api: PrefectApi, api_settings: Settings, sample_db: str, backup_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """With a real `prefect.serve` runner (a stand-in `backup` flow over the core), the API
    reports the scheduler running, a wait-false backup runs to Completed and is listed, and
    once the runner stops (it pauses its deployments) the scheduler is reported stopped."""
    env = {
        **os.environ, "PREFECT_API_URL": prefect_api.url, "DATABASE_URL": sample_db,
        "BACKUP_DIR": str(backup_dir), "BACKUP_COMPRESSION_THREADS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }  # fmt: skip
    log = (tmp_path / "runner.log").open("wb")
    (tmp_path / "served_backup.py").write_text(_SERVED_BACKUP_FLOW)  # serve needs a file
    runner = subprocess.Popen(
        guarded_script_argv("served_backup.py"), env=env, cwd=tmp_path,
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        def running() -> bool:
            if runner.poll() is not None:
                raise AssertionError((tmp_path / "runner.log").read_text()[-3000:])
            return bool(scheduler_of(api_settings)["running"])

        wait_until(running, 90, "the runner to serve the backup deployment")
        with TestClient(create_app(api_settings)) as client:
            started = client.post("/api/backups", json={"name": "served", "wait": False},
                                  headers=AUTH)  # fmt: skip
            assert started.status_code == 202, started.text
            run_id = started.json()["run"]["id"]

            def finished() -> bool:
                run = client.get(f"/api/runs/{run_id}", headers=AUTH).json()["run"]
                return bool(run["finished"])

            wait_until(finished, 120, "the served backup run to finish")
            run = client.get(f"/api/runs/{run_id}", headers=AUTH).json()["run"]
            assert run["state"] == "Completed", run
            listed = client.get("/api/backups", headers=AUTH).json()["backups"]
            assert [b["name"] for b in listed] == ["served"]
        runner.terminate()
        runner.wait(30)
        assert scheduler_of(api_settings)["running"] is False
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)
        log.close()


def test_the_prefect_address_comes_from_the_environment_or_the_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PrefectLink reads PREFECT_API_URL (and the UI URL, API key) from the environment, else
    from the active profile in PREFECT_HOME/profiles.toml; without either it has none."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert PrefectLink.from_environment().api_url is None
    (tmp_path / "profiles.toml").write_text(
        'active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://prefect.local:4200/api"\n'
        'PREFECT_API_AUTH_STRING = "admin:pass"\n'
    )
    from_profile = PrefectLink.from_environment()
    assert from_profile.api_url == "http://prefect.local:4200/api"
    assert from_profile.ui_url == "http://prefect.local:4200"
    assert from_profile.headers["Authorization"].startswith("Basic ")
    monkeypatch.setenv("PREFECT_API_URL", "http://other:4200/api/")
    monkeypatch.setenv("PREFECT_API_KEY", "k-123")
    from_env = PrefectLink.from_environment()
    assert from_env.api_url == "http://other:4200/api"
    assert from_env.headers == {"Authorization": "Bearer k-123"}
    assert from_env.run_url("abc") == "http://other:4200/runs/flow-run/abc"


# --- serving: the bind rule -----------------------------------------------------------------------


def test_without_a_token_the_server_refuses_to_listen_beyond_loopback(backup_dir: Path) -> None:
    """serve_api with no token refuses any host but 127.0.0.1/localhost/::1 with one line that
    says what to set; with a token any host is allowed."""
    open_settings = settings_for(None, backup_dir, backup_api_token=None,
                                 backup_api_read_token=None)  # fmt: skip
    for host in (EVERYWHERE, "::", "192.168.1.10", "example.com"):
        with pytest.raises(ConfigError) as refused:
            serve_api(open_settings, host=host, port=free_port())
        assert "\n" not in str(refused.value)
        assert host in str(refused.value) and "BACKUP_API_TOKEN" in str(refused.value)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]"):
        check_bind(open_settings, host)
    check_bind(settings_for(None, backup_dir), EVERYWHERE)
    check_bind(settings_for(None, backup_dir, backup_api_token=None), EVERYWHERE)


def test_parse_range_follows_rfc_9110() -> None:
    """Single ranges are clamped to the file, suffix ranges count from the end, anything
    unparsable or reversed is ignored."""
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-0", 100) == (0, 0)
    assert parse_range("bytes=90-200", 100) == (90, 99)
    assert parse_range("bytes=-5", 100) == (95, 99)
    assert parse_range("bytes=-500", 100) == (0, 99)
    assert parse_range("bytes=5-1", 100) is None
    assert parse_range("bytes=0-1, 3-4", 100) is None


# --- a real uvicorn server: streaming and bounded memory ------------------------------------------


@pytest.fixture
def live_server(tmp_path: Path, backup_dir: Path) -> Iterator[LiveServer]:
    """`serve_api` in a uvicorn subprocess on a free port, configured by environment."""
    with live_api_server(tmp_path, backup_dir) as server:
        yield server


BOUND = 50 * MIB  # the server's RSS may grow this much while moving 100-200 MB


@pytest.mark.slow
def test_a_large_download_streams_in_bounded_memory(live_server: LiveServer) -> None:
    """A 200 MB backup downloads over a real socket complete and intact, while the server's
    RSS grows by less than 50 MB even when the client stalls."""
    small = fabricate_backup(live_server.backup_dir, MIB, name="warmup")
    big = fabricate_backup(live_server.backup_dir, 200 * MIB, name="big")
    url = f"{live_server.url}/api/backups/download"
    warm = httpx.get(url, params={"id": small.id}, headers=AUTH, timeout=30)
    assert warm.status_code == 200 and len(warm.content) == MIB
    baseline = live_server.rss()
    digest = hashlib.sha256()
    received = 0
    with RssWatch(live_server) as watch, httpx.stream(
        "GET", url, params={"id": big.id}, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == str(200 * MIB)
        assert response.headers["content-disposition"] == f'attachment; filename="{big.filename}"'
        for chunk in response.iter_bytes():
            if received == 0:
                time.sleep(1.0)  # a stalled client: a server without backpressure reads ahead
            digest.update(chunk)
            received += len(chunk)
    assert received == 200 * MIB
    assert digest.hexdigest() == big.sha256
    growth = watch.peak - baseline
    assert growth < BOUND, f"server RSS grew {growth / MIB:.1f} MiB"


def test_a_corrupt_stored_file_never_arrives_complete(live_server: LiveServer) -> None:
    """When the stored bytes no longer match the manifest's sha256, the download stops short
    of its Content-Length, so the client sees an incomplete body, never a good-looking file."""
    made = fabricate_backup(live_server.backup_dir, 4 * MIB, name="rotten")
    path = live_server.backup_dir / made.id / made.filename
    with path.open("r+b") as handle:
        handle.seek(2 * MIB)
        original = handle.read(1)
        handle.seek(2 * MIB)
        handle.write(bytes([original[0] ^ 0xFF]))
    received = 0
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream(
        "GET", f"{live_server.url}/api/backups/download", params={"id": made.id},
        headers=AUTH, timeout=30,
    ) as response:  # fmt: skip
        assert response.headers["content-length"] == str(4 * MIB)
        for chunk in response.iter_bytes():
            received += len(chunk)
    assert received < 4 * MIB
    ranged = httpx.get(f"{live_server.url}/api/backups/download", params={"id": made.id},
                       headers={**AUTH, "Range": "bytes=0-99"}, timeout=30)  # fmt: skip
    assert ranged.status_code == 206 and len(ranged.content) == 100


@pytest.mark.slow
def test_a_large_import_streams_to_storage_in_bounded_memory(live_server: LiveServer) -> None:
    """A 100 MB plain dump uploaded chunked, with no Content-Length, is stored and verified
    while the server's RSS grows by less than 50 MB."""
    size = 100 * MIB
    head = b"--\n-- PostgreSQL database dump\n--\n\nSET client_encoding = 'UTF8';\n"
    tail = b"\n--\n-- PostgreSQL database dump complete\n--\n\n"
    line = b"-- " + b"filler " * 145 + b"\n"
    filler = line * (MIB // len(line))
    digest = hashlib.sha256()
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for piece in (head, *([filler] * (size // len(filler))), tail):
            digest.update(piece)
            sent += len(piece)
            yield piece

    baseline = live_server.rss()
    with RssWatch(live_server) as watch:
        response = httpx.post(f"{live_server.url}/api/backups/import",
                              params={"name": "big_import"}, content=body(), headers=DUMP_AUTH,
                              timeout=120)  # fmt: skip
    assert response.status_code == 200, response.text
    backup = response.json()["backup"]
    assert backup["size"] == sent and backup["sha256"] == digest.hexdigest()
    assert backup["format"] == "plain" and backup["state"] == "verified"
    growth = watch.peak - baseline
    assert growth < BOUND, f"server RSS grew {growth / MIB:.1f} MiB"


# --- fuzzing the OpenAPI schema -------------------------------------------------------------------


@pytest.mark.slow
def test_fuzzing_the_openapi_schema_finds_no_server_error(
    api_settings: Settings, client: TestClient
) -> None:
    """schemathesis sends schema-valid and schema-invalid requests to every operation (with the
    admin token, and again without it): no 500, every answer documented and in its declared
    shape, every refusal in the error shape, no secret in any answer."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.core.failures import AcceptedNegativeData
    from schemathesis.core.parameters import ParameterLocation
    from schemathesis.core.result import Ok
    from schemathesis.specs.openapi import checks

    backup_now(client, name="fuzz_target")  # one real id on disk; generated ones are unknown
    app = create_app(api_settings, prefect=NO_PREFECT)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    secrets = (DEFAULT_PASSWORD, ADMIN, READ)

    def our_shape_and_no_500(ctx: Any, response: Any, case: Any) -> bool:
        assert response.status_code != 500, response.text
        text = response.content.decode("utf-8", "replace")
        assert not any(secret in text for secret in secrets), text
        if response.status_code >= 400:
            body = json.loads(text)
            assert body["success"] is False and isinstance(body["error"], str), text
        return True

    def refuses_invalid_data(ctx: Any, response: Any, case: Any) -> bool | None:
        """schemathesis's negative_data_rejection, less one false alarm: a case whose invalid
        parts are the Authorization header (the token below replaces it) and query values
        that are one-element arrays of a short scalar is, on the wire, a valid request
        (`?database=[x]` is sent as `?database=x`)."""
        try:
            return checks.negative_data_rejection(ctx, response, case)
        except AcceptedNegativeData:
            negated = {where for where, part in case.meta.components.items()
                       if part.mode.is_negative}  # fmt: skip
            values = list((case.query or {}).values())
            if negated <= {ParameterLocation.HEADER, ParameterLocation.QUERY} and all(
                not isinstance(v, list | dict)
                or (isinstance(v, list) and len(v) == 1
                    and not isinstance(v[0], list | dict) and len(str(v[0])) <= 200)
                for v in values
            ):  # fmt: skip
                return None
            raise

    selected = [
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_schema_conformance,
        checks.ignored_auth,
        refuses_invalid_data,
        our_shape_and_no_500,
    ]
    started = time.monotonic()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        modes = [schemathesis.GenerationMode.POSITIVE]
        if operation.path != "/api/health":  # no input to make invalid
            modes.append(schemathesis.GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=12, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            def fuzz(case: Any) -> None:
                case.call_and_validate(headers=AUTH, checks=selected)

            fuzz()
    assert time.monotonic() - started < 60
