"""The test servers themselves: each helper in tests/servers works against the real thing.

If one of these fails, every integration test that uses that server is suspect: fix this
first.
"""

from __future__ import annotations

import http.client
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from boto3.s3.transfer import TransferConfig

from tests.servers.faultproxy import FaultProxy
from tests.servers.gcs import GcsServer
from tests.servers.postgres import PgCluster
from tests.servers.s3 import S3Server

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.host, s3_server.port, flavor="s3") as proxy:
        yield proxy


@pytest.fixture
def gcs_proxy(gcs_server: GcsServer) -> Iterator[FaultProxy]:
    with FaultProxy(gcs_server.host, gcs_server.port, flavor="gcs") as proxy:
        yield proxy


class _Unseekable(io.RawIOBase):
    """A read-only stream that cannot seek or tell, like a pg_dump pipe."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._buf.read(len(b))
        b[: len(data)] = data
        return len(data)


# -- PostgreSQL ---------------------------------------------------------------------------------


def test_pg_cluster_runs_queries_as_the_superuser_over_tcp(pg_cluster: PgCluster) -> None:
    """The cluster is PostgreSQL 15, reachable on 127.0.0.1 with the superuser's password."""
    assert pg_cluster.version // 10000 == 15
    with psycopg.connect(pg_cluster.url()) as conn:
        row = conn.execute("SELECT current_user, inet_server_addr()::text").fetchone()
    assert row == ("postgres", "127.0.0.1/32")
    assert pg_cluster.query("SELECT %s::int + 1", [41]) == [(42,)]


def test_pg_cluster_rejects_a_wrong_password(pg_cluster: PgCluster) -> None:
    """TCP connections use scram-sha-256: a wrong password or no password is refused."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg_cluster.url(password="not-the-password"), connect_timeout=5)
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg_cluster.url(password=""), connect_timeout=5)


def test_pg_cluster_drops_a_database_that_has_open_connections(pg_cluster: PgCluster) -> None:
    """create_database/drop_database work, and dropping terminates open sessions first."""
    pg_cluster.create_database("servers_test_db")
    pg_cluster.execute(
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1)", dbname="servers_test_db"
    )
    held_open = psycopg.connect(pg_cluster.url("servers_test_db"), autocommit=True)
    try:
        assert held_open.execute("SELECT count(*) FROM t").fetchone() == (1,)
        pg_cluster.drop_database("servers_test_db")
        assert not pg_cluster.database_exists("servers_test_db")
        with pytest.raises(psycopg.OperationalError):
            held_open.execute("SELECT 1")
    finally:
        held_open.close()


def test_pg_cluster_lets_a_new_role_log_in_with_its_own_password(pg_cluster: PgCluster) -> None:
    """create_role makes a login role whose URL works and whose wrong password does not."""
    pg_cluster.create_role("servers_test_role", password="role-pw")
    try:
        url = pg_cluster.url(user="servers_test_role", password="role-pw")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("servers_test_role",)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg_cluster.url(user="servers_test_role", password="nope"))
    finally:
        pg_cluster.execute("DROP ROLE servers_test_role")


# -- S3 (moto) ----------------------------------------------------------------------------------


def test_a_killed_owner_s_cluster_is_stopped_and_removed_even_before_it_is_reaped() -> None:
    """A test process SIGKILLed while nobody has collected its exit status yet (a zombie) no
    longer owns its cluster: the reaper it started stops and deletes it."""
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from tests.servers.postgres import PgCluster\n"
        "c = PgCluster().start(); print(c.tmp_dir, flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        tmp_dir = Path(owner.stdout.readline().strip())
        assert (tmp_dir / "data").is_dir()
        owner.kill()  # and no wait(): it stays a zombie while the reaper looks at it
        deadline = time.monotonic() + 60
        while tmp_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not tmp_dir.exists(), "the killed owner's cluster was left behind"
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()


def test_s3_bucket_round_trips_an_object(s3_server: S3Server, s3_bucket: str) -> None:
    """An object put into the per-test bucket reads back byte for byte."""
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="a/b.bin", Body=b"payload")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b.bin")["Body"].read() == b"payload"
    listed = s3.list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["a/b.bin"]


def test_s3_buckets_are_fresh_per_test(s3_server: S3Server, s3_bucket: str) -> None:
    """Each test's bucket starts empty; reset() forgets every bucket."""
    s3 = s3_server.client()
    assert s3.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0
    s3_server.make_bucket("pgk-reset-check")
    s3_server.reset()
    assert s3.list_buckets()["Buckets"] == []


def test_s3_multipart_upload_through_proxy_recovers_from_two_503s(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A streamed multipart upload through the proxy retries two injected 503 SlowDown parts."""
    data = os.urandom(11 * MIB)  # three 5 MiB parts (S3's minimum part size)
    fault = s3_proxy.add_fault(method="PUT", path=r"partNumber=", action="503", times=2)
    config = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    retries = {"total_max_attempts": 5, "mode": "standard"}
    # closing(): the proxy keeps connections alive; an unclosed pool is a ResourceWarning.
    with closing(s3_server.client(endpoint_url=s3_proxy.url, retries=retries)) as s3:
        s3.upload_fileobj(_Unseekable(data), s3_bucket, "big.bin", Config=config)

    assert fault.fired == 2
    direct = s3_server.client()
    assert direct.get_object(Bucket=s3_bucket, Key="big.bin")["Body"].read() == data
    parts = [e for e in s3_proxy.requests if e.method == "PUT" and "partNumber=" in e.path]
    assert sorted(e.status for e in parts) == [200, 200, 200, 503, 503]
    assert [e.fault for e in parts if e.status == 503] == ["503", "503"]
    assert s3_proxy.errors == []


def test_proxy_streams_chunked_bodies_and_keeps_connections_alive(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A chunked PUT and a GET reuse one client connection and the bytes arrive intact."""
    data = os.urandom(3 * MIB + 7)
    put_url = _presigned(s3_server, s3_proxy, "put_object", s3_bucket, "chunked.bin")
    get_url = _presigned(s3_server, s3_proxy, "get_object", s3_bucket, "chunked.bin")
    conn = http.client.HTTPConnection(s3_proxy.host, s3_proxy.port, timeout=10)
    try:
        pieces = (data[i : i + 100_000] for i in range(0, len(data), 100_000))
        conn.request("PUT", put_url, body=pieces, encode_chunked=True)
        put = conn.getresponse()
        put.read()
        conn.request("GET", get_url)
        got = conn.getresponse()
        body = got.read()
    finally:
        conn.close()
    assert (put.status, got.status) == (200, 200)
    assert body == data
    assert s3_proxy.connections == 1
    assert [(e.method, e.status) for e in s3_proxy.requests] == [("PUT", 200), ("GET", 200)]


# -- fault proxy on a raw HTTP client -----------------------------------------------------------


def _presigned(server: S3Server, proxy: FaultProxy, operation: str, bucket: str, key: str) -> str:
    """Path and query of a presigned request to the proxy (moto refuses anonymous GETs)."""
    url: str = server.client(endpoint_url=proxy.url).generate_presigned_url(
        operation, Params={"Bucket": bucket, "Key": key}
    )
    return url.removeprefix(proxy.url)


def _raw_get(proxy: FaultProxy, path: str) -> bytes:
    conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


def test_proxy_reset_surfaces_as_connection_error(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A "reset" fault aborts the connection: the client gets a connection error, no response."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="k", Body=b"x" * 1000)
    s3_proxy.add_fault(method="GET", path=r"/k\?", action="reset")
    url = _presigned(s3_server, s3_proxy, "get_object", s3_bucket, "k")
    with pytest.raises(ConnectionError):
        _raw_get(s3_proxy, url)
    assert _raw_get(s3_proxy, url) == b"x" * 1000  # fired once only
    assert [(e.status, e.fault) for e in s3_proxy.requests] == [(None, "reset"), (200, None)]


def test_proxy_reset_after_applies_the_request_but_loses_the_answer(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A "reset_after" fault forwards the PUT (the object exists) but the client sees a reset."""
    s3_proxy.add_fault(method="PUT", action="reset_after")
    conn = http.client.HTTPConnection(s3_proxy.host, s3_proxy.port, timeout=10)
    try:
        url = _presigned(s3_server, s3_proxy, "put_object", s3_bucket, "landed")
        conn.request("PUT", url, body=b"w" * 1000)
        with pytest.raises(ConnectionError):
            conn.getresponse()
    finally:
        conn.close()
    got = s3_server.client().get_object(Bucket=s3_bucket, Key="landed")["Body"].read()
    assert got == b"w" * 1000


def test_proxy_truncate_surfaces_as_incomplete_body(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A "truncate" fault sends the full Content-Length but half the body, then closes."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="k", Body=b"y" * 10_000)
    s3_proxy.add_fault(method="GET", action="truncate")
    with pytest.raises(http.client.IncompleteRead) as caught:
        _raw_get(s3_proxy, _presigned(s3_server, s3_proxy, "get_object", s3_bucket, "k"))
    assert (len(caught.value.partial), caught.value.expected) == (5_000, 5_000)
    assert s3_proxy.requests[-1].fault == "truncate"


def test_proxy_error_fault_answers_503_with_an_s3_error_body(
    s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A "503" fault answers SlowDown in S3's XML error format without reaching the server."""
    s3_proxy.add_fault(action="503", times=None)
    conn = http.client.HTTPConnection(s3_proxy.host, s3_proxy.port, timeout=10)
    try:
        conn.request("PUT", f"/{s3_bucket}/k", body=b"z" * 100)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 503
    assert b"<Code>SlowDown</Code>" in body


def test_proxy_delay_fault_holds_the_request(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A "delay" fault forwards the request after the given pause."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="k", Body=b"late")
    s3_proxy.add_fault(action="delay", delay=0.3)
    url = _presigned(s3_server, s3_proxy, "get_object", s3_bucket, "k")
    started = time.monotonic()
    assert _raw_get(s3_proxy, url) == b"late"
    assert time.monotonic() - started >= 0.3
    assert s3_proxy.requests[-1].status == 200


# -- GCS (gcp-storage-emulator) -----------------------------------------------------------------


def test_gcs_streamed_upload_and_download_round_trip(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    """blob.open("wb", chunk_size=...) streams a resumable upload that reads back intact."""
    bucket = gcs_server.client().bucket(gcs_bucket)
    data = os.urandom(3 * 256 * 1024 + 5)  # chunk_size must be a multiple of 256 KiB
    with bucket.blob("dump.bin").open("wb", chunk_size=256 * 1024) as out:
        for i in range(0, len(data), 100_000):
            out.write(data[i : i + 100_000])
    assert bucket.get_blob("dump.bin").size == len(data)
    assert bucket.blob("dump.bin").download_as_bytes() == data
    with bucket.blob("dump.bin").open("rb") as stream:
        assert stream.read() == data


def test_gcs_resumable_upload_through_proxy_retries_a_503_chunk(
    gcs_server: GcsServer, gcs_bucket: str, gcs_proxy: FaultProxy
) -> None:
    """A resumable upload through the proxy re-sends a chunk answered with a JSON 503."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    data = os.urandom(2 * 256 * 1024 + 5)
    fault = gcs_proxy.add_fault(method="PUT", path=r"upload_id=", action="503")
    with closing(gcs_server.client(endpoint=gcs_proxy.url)) as client:
        blob = client.bucket(gcs_bucket).blob("dump.bin")
        with blob.open("wb", chunk_size=256 * 1024, retry=DEFAULT_RETRY) as out:
            out.write(data)
    assert fault.fired == 1
    assert gcs_server.client().bucket(gcs_bucket).blob("dump.bin").download_as_bytes() == data
    statuses = [e.status for e in gcs_proxy.requests if "upload_id=" in e.path]
    assert statuses[0] == 503 and statuses[-1] == 200
    assert gcs_proxy.errors == []


def test_gcs_reset_forgets_every_bucket(gcs_server: GcsServer) -> None:
    """reset() wipes the emulator: buckets made before it are gone."""
    gcs_server.make_bucket("pgk-gcs-reset-check")
    gcs_server.reset()
    assert [b.name for b in gcs_server.client().list_buckets()] == []
