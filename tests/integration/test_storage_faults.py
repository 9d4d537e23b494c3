"""Storage under faults: the S3 and GCS backends behind tests/servers/faultproxy.py, which injects
503s, connection resets, truncated bodies and delays between the SDK and moto / the emulator.

Transient faults must be retried to success; persistent ones must fail with
TransientStorageError and leave nothing visible (and no multipart upload); permanent ones
(wrong key, missing bucket) must fail at once with a message naming the bucket; a process
killed mid-upload must leave nothing listed, and its S3 upload is cleaned by the next run.

Emulator gaps: moto accepts any credentials unless started with IAM checks on (the wrong-key
test starts such a server); gcp-storage-emulator checks no credentials at all, so the GCS
permission test has the proxy answer 403 as GCS would.
"""

from __future__ import annotations

import gc
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from pgkeeper.errors import StorageError, StoragePermissionError, TransientStorageError
from pgkeeper.settings import Settings
from pgkeeper.storage.base import CHUNK
from pgkeeper.storage.gcs import GCSStorage
from pgkeeper.storage.s3 import MIN_PART_SIZE, S3Storage, make_client
from tests.servers.faultproxy import FaultProxy
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BIG = 12 * MIB + 5  # three S3 parts of 5 MiB (the last one short), twelve GCS chunks of 1 MiB
SECRET = "wr0ng-s3cret-do-not-print"
UPLOAD_PART = r"partNumber="  # S3 UploadPart requests carry ?partNumber=N&uploadId=...
GCS_CHUNK = r"upload_id="  # GCS resumable chunks are PUTs to the session URI


def s3_settings(server: S3Server, endpoint: str, **extra: Any) -> Settings:
    fields: dict[str, Any] = {
        "aws_access_key_id": server.access_key,
        "aws_secret_access_key": server.secret_key,
        "backup_s3_endpoint_url": endpoint,
        "backup_s3_region": server.region,
        "backup_s3_max_attempts": 3,
        **extra,
    }
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]  # init-only option


@pytest.fixture(scope="module")
def s3_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3_server.host, s3_server.port, flavor="s3") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def gcs_proxy(gcs_server: GcsServer) -> Iterator[FaultProxy]:
    with FaultProxy(gcs_server.host, gcs_server.port, flavor="gcs") as proxy:
        yield proxy


@pytest.fixture
def s3(s3_server: S3Server, s3_proxy: FaultProxy, s3_bucket: str) -> S3Storage:
    """An S3 target reached through the fault proxy, 3 attempts per request, 5 MiB parts."""
    s3_proxy.clear()
    settings = s3_settings(s3_server, s3_proxy.url)
    # A fresh client per test: botocore's retry quota is per client.
    return S3Storage.from_url(
        f"s3://{s3_bucket}/pfx", settings, part_size=MIN_PART_SIZE, max_concurrency=2
    )


@pytest.fixture
def gcs(
    gcs_server: GcsServer,
    gcs_proxy: FaultProxy,
    gcs_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> GCSStorage:
    """A GCS target reached through the fault proxy, retrying for at most 3 s, 1 MiB chunks."""
    gcs_proxy.clear()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_proxy.url)
    # The emulator cannot cancel a resumable session (no DELETE on the session URI), and a
    # pending session makes the bucket undeletable: wipe it before the bucket's teardown.
    request.addfinalizer(gcs_server.reset)
    storage = GCSStorage.from_url(
        f"gs://{gcs_bucket}/pfx", None, chunk_size=MIB, retry_timeout=3.0, retry_delay=0.05
    )
    request.addfinalizer(storage.close)  # pooled keep-alive sockets, else a ResourceWarning
    return storage


# google-cloud-storage leaks the socket of a streamed download that is answered with an error
# (_media/requests/download.py, consume(): _process_response raises before the response is
# closed). Tests that fault GCS downloads collect it themselves, so the ResourceWarning shows
# up in that test, under this filter, and nowhere else.
gcs_download_leaks_a_socket = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)


def direct_s3(server: S3Server) -> Any:
    """A boto3 client that bypasses the proxy, to see what the server really holds."""
    return server.client()


def write(storage: S3Storage | GCSStorage, key: str, data: bytes) -> None:
    with storage.open_write(key, size_hint=len(data)) as out:
        for start in range(0, len(data), CHUNK):
            out.write(data[start : start + CHUNK])


def read(storage: S3Storage | GCSStorage, key: str) -> bytes:
    with storage.open_read(key) as src:
        return b"".join(iter(lambda: src.read(CHUNK), b""))


def uploads(server: S3Server, bucket: str) -> list[Any]:
    return list(direct_s3(server).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def faulted(proxy: FaultProxy) -> list[str | None]:
    return [exchange.fault for exchange in proxy.requests if exchange.fault]


# --- S3 ---------------------------------------------------------------------------------------


def test_s3_transient_503s_on_part_uploads_are_retried(s3: S3Storage, s3_proxy: FaultProxy) -> None:
    """Two part uploads answered 503 SlowDown are retried and the object is complete."""
    fault = s3_proxy.add_fault("503", method="PUT", path=UPLOAD_PART, times=2)
    data = os.urandom(BIG)
    write(s3, "db/a.dump", data)

    assert fault.fired == 2
    assert read(s3, "db/a.dump") == data


def test_s3_transient_503s_on_get_are_retried(s3: S3Storage, s3_proxy: FaultProxy) -> None:
    """A GET answered 503 twice is retried and returns the whole object."""
    data = os.urandom(3 * MIB)
    write(s3, "db/a.dump", data)
    fault = s3_proxy.add_fault("503", method="GET", path=r"/pfx/db/a\.dump", times=2)

    assert read(s3, "db/a.dump") == data
    assert fault.fired == 2


def test_s3_persistent_503_fails_and_leaves_nothing(
    s3: S3Storage, s3_proxy: FaultProxy, s3_server: S3Server, s3_bucket: str
) -> None:
    """Part uploads that always get 503 fail with TransientStorageError; the upload is aborted."""
    s3_proxy.add_fault("503", method="PUT", path=UPLOAD_PART, times=None)
    with pytest.raises(TransientStorageError, match=s3_bucket):
        write(s3, "db/a.dump", os.urandom(BIG))

    assert "DELETE" in [e.method for e in s3_proxy.requests]  # AbortMultipartUpload was sent
    assert s3.stat("db/a.dump") is None
    assert list(s3.list()) == []
    assert uploads(s3_server, s3_bucket) == []


@pytest.mark.parametrize("action", ["reset", "reset_after"])
def test_s3_connection_reset_mid_upload_recovers(
    s3: S3Storage, s3_proxy: FaultProxy, action: str
) -> None:
    """A reset on a part upload (before or after the server stored it) is retried to success."""
    fault = s3_proxy.add_fault(action, method="PUT", path=r"partNumber=2(&|$)", times=1)
    data = os.urandom(BIG)
    write(s3, "db/a.dump", data)

    assert fault.fired == 1
    assert read(s3, "db/a.dump") == data


def test_s3_truncated_body_resumes_with_a_range(s3: S3Storage, s3_proxy: FaultProxy) -> None:
    """A GET body cut short is resumed from where it broke (Range + If-Match): same bytes."""
    data = os.urandom(3 * MIB + 17)
    write(s3, "db/a.dump", data)
    fault = s3_proxy.add_fault("truncate", method="GET", path=r"/pfx/db/a\.dump", times=1)

    assert read(s3, "db/a.dump") == data
    assert fault.fired == 1
    assert len([e for e in s3_proxy.requests if e.method == "GET"]) == 2


def test_s3_body_that_keeps_breaking_raises_transient(s3: S3Storage, s3_proxy: FaultProxy) -> None:
    """A body that breaks again on every resume raises TransientStorageError, not short data."""
    write(s3, "db/a.dump", os.urandom(MIB))
    s3_proxy.add_fault("truncate", method="GET", times=None, truncate_at=0)

    with pytest.raises(TransientStorageError, match="connection broke at byte 0"):
        read(s3, "db/a.dump")


def test_s3_read_timeout_is_retried(
    s3_server: S3Server, s3_proxy: FaultProxy, s3_bucket: str
) -> None:
    """A response slower than the read timeout is retried on a new connection."""
    s3_proxy.clear()
    settings = s3_settings(s3_server, s3_proxy.url)
    storage = S3Storage.from_url(
        f"s3://{s3_bucket}", settings, client=make_client(settings, read_timeout=0.5)
    )
    write(storage, "a", b"hello")
    fault = s3_proxy.add_fault("delay", method="GET", delay=1.5, times=1)

    assert read(storage, "a") == b"hello"
    assert fault.fired == 1


def test_s3_wrong_access_key_is_a_permission_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the server does not know gives StoragePermissionError naming the bucket, no secret."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "1")  # moto: check IAM after 1 request
    with S3Server() as server:
        bucket = server.make_bucket("pgk-auth-test")  # the one unauthenticated request
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            aws_access_key_id="AKIAWRONGWRONGWRONG0",
            aws_secret_access_key=SECRET,
            backup_s3_endpoint_url=server.endpoint_url,
            backup_s3_region=server.region,
        )
        storage = S3Storage.from_url(f"s3://{bucket}/pfx", settings)
        for attempt in (
            lambda: write(storage, "x", b"1"),
            lambda: read(storage, "x"),
            lambda: list(storage.list()),
        ):
            with pytest.raises(StoragePermissionError) as caught:
                attempt()
            message = str(caught.value)
            assert bucket in message and "AWS_ACCESS_KEY_ID" in message
            assert SECRET not in message and SECRET not in repr(caught.value.args)


def test_s3_missing_bucket_is_a_clear_error(s3_server: S3Server, s3_proxy: FaultProxy) -> None:
    """Every operation on a bucket that does not exist says so, naming it; none is retried."""
    s3_proxy.clear()
    storage = S3Storage.from_url(
        "s3://pgk-no-such-bucket/pfx", s3_settings(s3_server, s3_proxy.url)
    )
    for attempt in (
        lambda: write(storage, "small", b"1"),
        lambda: write(storage, "big", os.urandom(9 * MIB)),
        lambda: read(storage, "x"),
        lambda: storage.stat("x"),
        lambda: storage.delete("x"),
        lambda: list(storage.list()),
    ):
        with pytest.raises(StorageError, match="bucket 'pgk-no-such-bucket' does not exist") as e:
            attempt()
        assert type(e.value) is StorageError
    assert all(e.status != 503 for e in s3_proxy.requests)


KILLED_UPLOADER = textwrap.dedent(
    """
    import sys, time
    from pgkeeper.settings import Settings
    from pgkeeper.storage.{module} import {cls}
    storage = {cls}.from_url(sys.argv[1], Settings(_env_file=None), **{options})
    with storage.open_write("db/killed.dump") as out:
        for _ in range(12):
            out.write(b"x" * 1024 * 1024)
        print("ready", flush=True)
        time.sleep(120)
    """
)


def kill_mid_upload(script: str, url: str, env: dict[str, str]) -> None:
    """Run an uploader that stops mid-upload, then SIGKILL it (no cleanup can run)."""
    with subprocess.Popen(
        [sys.executable, "-c", script, url],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            assert line == b"ready\n", proc.stderr.read().decode(errors="replace")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def test_s3_killed_uploader_leaves_an_orphan_the_next_run_aborts(
    s3_server: S3Server, s3_bucket: str, s3_proxy: FaultProxy
) -> None:
    """A SIGKILLed upload lists nothing; abort_orphan_uploads removes its multipart upload."""
    script = KILLED_UPLOADER.format(
        module="s3", cls="S3Storage", options={"part_size": MIN_PART_SIZE}
    )
    kill_mid_upload(script, f"s3://{s3_bucket}/pfx", s3_server.env())
    storage = S3Storage.from_url(f"s3://{s3_bucket}/pfx", s3_settings(s3_server, s3_proxy.url))

    assert list(storage.list()) == [] and storage.stat("db/killed.dump") is None
    assert [u["Key"] for u in uploads(s3_server, s3_bucket)] == ["pfx/db/killed.dump"]
    # moto reports every upload as started in 2010: "older than a century" skips it...
    assert storage.abort_orphan_uploads("db/", older_than=timedelta(days=36500)) == []
    assert storage.abort_orphan_uploads("other/", older_than=timedelta(0)) == []
    # ...and the next run's cleanup aborts it.
    assert storage.abort_orphan_uploads("db/", older_than=timedelta(0)) == ["db/killed.dump"]
    assert uploads(s3_server, s3_bucket) == []


# --- GCS --------------------------------------------------------------------------------------


def test_gcs_transient_503s_on_chunks_are_retried(gcs: GCSStorage, gcs_proxy: FaultProxy) -> None:
    """Two resumable chunks answered 503 are re-sent and the object is complete."""
    fault = gcs_proxy.add_fault("503", method="PUT", path=GCS_CHUNK, times=2)
    data = os.urandom(BIG)
    write(gcs, "db/a.dump", data)

    assert fault.fired == 2
    assert read(gcs, "db/a.dump") == data


@gcs_download_leaks_a_socket
def test_gcs_transient_503s_on_get_are_retried(gcs: GCSStorage, gcs_proxy: FaultProxy) -> None:
    """Ranged GETs answered 503 are retried and return the whole object."""
    data = os.urandom(3 * MIB)
    write(gcs, "db/a.dump", data)
    fault = gcs_proxy.add_fault("503", method="GET", path=r"alt=media", times=2)

    assert read(gcs, "db/a.dump") == data
    assert fault.fired == 2
    gc.collect()


def test_gcs_persistent_503_fails_and_leaves_nothing(
    gcs: GCSStorage, gcs_proxy: FaultProxy
) -> None:
    """Chunks that always get 503 fail with TransientStorageError; the session is cancelled."""
    gcs_proxy.add_fault("503", method="PUT", path=GCS_CHUNK, times=None)
    with pytest.raises(TransientStorageError, match=gcs.bucket_name):
        write(gcs, "db/a.dump", os.urandom(BIG))

    # terminate() sent DELETE to the session (real GCS cancels it; the emulator 404s), and
    # no request finalised the object.
    assert any(e.method == "DELETE" and "upload_id=" in e.path for e in gcs_proxy.requests)
    assert gcs.stat("db/a.dump") is None
    assert list(gcs.list()) == []


def test_gcs_exception_in_block_never_finalises(gcs: GCSStorage, gcs_proxy: FaultProxy) -> None:
    """After chunks were sent, an exception cancels the session: no final chunk, no object."""
    with pytest.raises(KeyboardInterrupt), gcs.open_write("db/a.dump") as out:
        out.write(os.urandom(3 * MIB))  # three chunks already in the session
        raise KeyboardInterrupt

    chunk_puts = [e for e in gcs_proxy.requests if e.method == "PUT"]
    assert len(chunk_puts) == 3  # close() would have sent a fourth, final one
    assert gcs.stat("db/a.dump") is None


def test_gcs_connection_reset_mid_upload_recovers(gcs: GCSStorage, gcs_proxy: FaultProxy) -> None:
    """A reset on a resumable chunk is retried and the object is complete."""
    fault = gcs_proxy.add_fault("reset", method="PUT", path=GCS_CHUNK, times=1)
    data = os.urandom(BIG)
    write(gcs, "db/a.dump", data)

    assert fault.fired == 1
    assert read(gcs, "db/a.dump") == data


@gcs_download_leaks_a_socket
def test_gcs_truncated_body_is_fetched_again(gcs: GCSStorage, gcs_proxy: FaultProxy) -> None:
    """A ranged GET cut short is retried by the client: the read returns the same bytes."""
    data = os.urandom(3 * MIB + 17)
    write(gcs, "db/a.dump", data)
    fault = gcs_proxy.add_fault("truncate", method="GET", path=r"alt=media", times=1)

    assert hashlib.sha256(read(gcs, "db/a.dump")).digest() == hashlib.sha256(data).digest()
    assert fault.fired == 1
    gc.collect()


@gcs_download_leaks_a_socket
def test_gcs_body_that_keeps_breaking_raises_transient(
    gcs: GCSStorage, gcs_proxy: FaultProxy
) -> None:
    """A body that is cut short on every try raises TransientStorageError after the deadline."""
    write(gcs, "db/a.dump", os.urandom(MIB))
    gcs_proxy.add_fault("truncate", method="GET", path=r"alt=media", times=None)

    with pytest.raises(TransientStorageError):
        read(gcs, "db/a.dump")
    gc.collect()


def test_gcs_access_denied_is_a_permission_error(gcs: GCSStorage, gcs_proxy: FaultProxy) -> None:
    """403 from GCS gives StoragePermissionError naming the bucket and what to check."""
    gcs_proxy.add_fault("error", status=403, times=None)
    for attempt in (
        lambda: write(gcs, "x", b"1"),
        lambda: gcs.stat("x"),
        lambda: list(gcs.list()),
    ):
        with pytest.raises(StoragePermissionError, match=gcs.bucket_name) as caught:
            attempt()
        assert "GCS_KEYFILE" in str(caught.value)


def test_gcs_missing_bucket_is_a_clear_error(
    gcs_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Every operation on a bucket that does not exist says so, naming it."""
    gcs_proxy.clear()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_proxy.url)
    storage = GCSStorage.from_url("gs://pgk-no-such-bucket/pfx", retry_timeout=3.0)
    request.addfinalizer(storage.close)
    for attempt in (
        lambda: write(storage, "small", b"1"),
        lambda: write(storage, "big", os.urandom(20 * MIB)),
        lambda: read(storage, "x"),
        lambda: storage.stat("x"),
        lambda: storage.delete("x"),
        lambda: list(storage.list()),
    ):
        with pytest.raises(StorageError, match="bucket 'pgk-no-such-bucket' does not exist") as e:
            attempt()
        assert type(e.value) is StorageError


def test_gcs_killed_uploader_leaves_nothing_listed(gcs: GCSStorage, gcs_server: GcsServer) -> None:
    """A SIGKILLed resumable upload is never finalised: nothing is listed."""
    script = KILLED_UPLOADER.format(module="gcs", cls="GCSStorage", options={"chunk_size": MIB})
    kill_mid_upload(script, gcs.url, gcs_server.env())

    assert list(gcs.list()) == [] and gcs.stat("db/killed.dump") is None


def test_s3_lost_answer_to_complete_multipart_upload_is_not_a_failure(
    s3: S3Storage, s3_proxy: FaultProxy
) -> None:
    """S3 completed the upload but its answer was lost; the retry then gets NoSuchUpload, as
    from real S3 (moto would accept the repeat, so the proxy answers for it). The object is
    there with exactly our parts (its multipart ETag says so): a success, not a failure."""
    lost = s3_proxy.add_fault("reset_after", method="POST", path=r"uploadId=", times=1)
    gone = s3_proxy.add_fault(
        "error", method="POST", path=r"uploadId=", times=1, status=404, code="NoSuchUpload"
    )
    data = os.urandom(BIG)
    write(s3, "db/a.dump", data)

    assert (lost.fired, gone.fired) == (1, 1)
    assert read(s3, "db/a.dump") == data


def test_s3_no_such_upload_without_our_object_is_still_a_failure(
    s3: S3Storage, s3_proxy: FaultProxy
) -> None:
    """NoSuchUpload with no object of our parts behind it (the upload was aborted, e.g. by a
    lifecycle rule) fails the write: nothing is stored."""
    s3_proxy.add_fault(
        "error", method="POST", path=r"uploadId=", times=None, status=404, code="NoSuchUpload"
    )
    with pytest.raises(StorageError, match=r"NoSuchUpload|no longer exists|does not exist"):
        write(s3, "db/a.dump", os.urandom(BIG))
    assert s3.stat("db/a.dump") is None
