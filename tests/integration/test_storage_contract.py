"""The storage contract: every backend (local folder, S3 via moto, GCS via the emulator) behaves
the same through the Storage protocol. Backend-only extras (S3 Object Lock, SSE, checksums
held by the provider) follow at the end.

Emulator limits (see tests/servers/gcs.py): gcp-storage-emulator ignores the page size, so GCS
pagination past the first page is not exercised here; moto does not verify checksums.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from pgkeeper.errors import StorageError
from pgkeeper.settings import Settings
from pgkeeper.storage import open_storage
from pgkeeper.storage.base import CHUNK, Storage
from pgkeeper.storage.gcs import GCSStorage
from pgkeeper.storage.local import LocalStorage
from pgkeeper.storage.s3 import MIN_PART_SIZE, ObjectLockedError, S3Storage, make_client
from tests.servers.gcs import GcsServer
from tests.servers.s3 import S3Server

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BIG = 20 * MIB + 123  # several S3 parts (5 MiB) and GCS chunks (1 MiB), with a ragged tail
PAGE = 2  # list page size on the cloud backends: a handful of keys spans several pages


def s3_settings(server: S3Server, endpoint: str | None = None, **extra: Any) -> Settings:
    """Settings pointing at the moto server (or a proxy in front of it), no .env read."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]  # pydantic-settings init-only option
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        backup_s3_endpoint_url=endpoint or server.endpoint_url,
        backup_s3_region=server.region,
        **extra,
    )


_clients: dict[str, Any] = {}


def open_s3(server: S3Server, bucket: str, **options: Any) -> S3Storage:
    """S3Storage.from_url on the moto server; one client per endpoint for the whole module,
    since building a boto3 client costs ~0.1 s."""
    options.setdefault("part_size", MIN_PART_SIZE)
    options.setdefault("page_size", PAGE)
    settings = options.pop("settings", None) or s3_settings(server)
    endpoint = settings.backup_s3_endpoint_url
    if "client" not in options and endpoint not in _clients:
        _clients[endpoint] = make_client(settings)
    options.setdefault("client", _clients[endpoint])
    return S3Storage.from_url(f"s3://{bucket}/pfx", settings, **options)


def open_gcs(
    server: GcsServer, bucket: str, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> GCSStorage:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", options.pop("endpoint", server.endpoint))
    options.setdefault("chunk_size", MIB)
    options.setdefault("page_size", PAGE)
    return GCSStorage.from_url(f"gs://{bucket}/pfx", None, **options)


@pytest.fixture(params=["local", "s3", "gcs"])
def storage(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """Each backend in turn, on a fresh folder or bucket, under a key prefix."""
    if request.param == "local":
        tmp_path = request.getfixturevalue("tmp_path")
        return LocalStorage(tmp_path / "store")
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        return open_s3(server, request.getfixturevalue("s3_bucket"))
    return _gcs_storage(request, monkeypatch)


def _gcs_storage(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> GCSStorage:
    gcs: GcsServer = request.getfixturevalue("gcs_server")
    storage = open_gcs(gcs, request.getfixturevalue("gcs_bucket"), monkeypatch)
    # The emulator has no DELETE for a resumable session URI (real GCS cancels the session),
    # so an aborted upload stays pending there and the bucket cannot be deleted (409). Wipe
    # the emulator before the bucket fixture's teardown runs.
    request.addfinalizer(gcs.reset)
    request.addfinalizer(storage.close)  # pooled keep-alive sockets, else a ResourceWarning
    return storage


@pytest.fixture(params=["s3", "gcs"])
def cloud(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> S3Storage | GCSStorage:
    """The cloud backends only: for what the local folder has no notion of."""
    if request.param == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        return open_s3(server, request.getfixturevalue("s3_bucket"))
    return _gcs_storage(request, monkeypatch)


def payload(size: int) -> bytes:
    return os.urandom(size)


def write_in_chunks(storage: Storage, key: str, data: bytes, chunk: int = CHUNK + 7) -> None:
    """Write as a pipeline does: ragged chunks from a stream, with the size as a hint."""
    with storage.open_write(key, size_hint=len(data)) as out:
        for start in range(0, len(data), chunk):
            out.write(data[start : start + chunk])


def read_all(storage: Storage, key: str) -> bytes:
    parts = []
    with storage.open_read(key) as src:
        while block := src.read(CHUNK):
            parts.append(block)
    return b"".join(parts)


def multipart_uploads(storage: Storage) -> list[Any]:
    """Unfinished S3 multipart uploads under the storage's bucket ([] for other backends)."""
    if not isinstance(storage, S3Storage):
        return []
    return list(storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", []))


def keys(storage: Storage, prefix: str = "") -> list[str]:
    return sorted(info.key for info in storage.list(prefix))


def test_every_backend_is_a_storage(storage: Storage) -> None:
    """Each backend satisfies the Storage protocol and names itself without credentials."""
    assert isinstance(storage, Storage)
    assert storage.kind in ("local", "s3", "gcs")
    assert "testing" not in storage.url  # the moto secret/key must never reach a URL


def test_declared_abilities_match_what_the_backend_does(storage: Storage) -> None:
    """Each backend declares atomic_create, stored_checksums and orphan_uploads, and its
    create_exclusive / remote_sha256 / abort_orphan_uploads behave as declared."""
    assert isinstance(storage.atomic_create, bool)
    assert storage.create_exclusive("b/pending.json", b"first") is True
    assert storage.create_exclusive("b/pending.json", b"second") is False
    assert read_all(storage, "b/pending.json") == b"first"
    data = payload(1000)
    with storage.open_write("b/data", metadata={"sha256": hashlib.sha256(data).hexdigest()}) as out:
        out.write(data)
    stored = storage.remote_sha256("b/data")
    if storage.stored_checksums:
        assert stored in (None, hashlib.sha256(data).hexdigest())
    else:
        assert stored is None
    with pytest.raises(StorageError):
        storage.remote_sha256("b/missing")
    aborted = storage.abort_orphan_uploads("")
    assert isinstance(aborted, list)
    if not storage.orphan_uploads:
        assert aborted == []


def test_open_storage_builds_cloud_backends_from_urls(
    s3_server: S3Server,
    s3_bucket: str,
    gcs_server: GcsServer,
    gcs_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """open_storage turns s3:// and gs:// URLs into working backends with the settings' knobs."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    for url in (f"s3://{s3_bucket}/nightly/", f"gs://{gcs_bucket}/nightly"):
        target = open_storage(url, s3_settings(s3_server))
        write_in_chunks(target, "x", b"data")
        assert target.url == url.rstrip("/") and read_all(target, "x") == b"data"
        if isinstance(target, GCSStorage):
            target.close()


@pytest.mark.parametrize("size", [0, 1000, BIG], ids=["empty", "small", "multipart"])
def test_round_trip_returns_the_same_bytes(storage: Storage, size: int) -> None:
    """What is written (empty, small, or many parts) reads back byte for byte, with its size."""
    data = payload(size)
    write_in_chunks(storage, "db/obj.bin", data)

    assert hashlib.sha256(read_all(storage, "db/obj.bin")).digest() == hashlib.sha256(data).digest()
    info = storage.stat("db/obj.bin")
    assert info is not None and info.key == "db/obj.bin" and info.size == size
    assert keys(storage) == ["db/obj.bin"]


def test_read_returns_short_reads_only_at_the_end(storage: Storage) -> None:
    """read(n) returns n bytes until the end, then b"": callers may read in fixed blocks."""
    data = payload(3 * MIB + 5)
    write_in_chunks(storage, "blocks", data)
    with storage.open_read("blocks") as src:
        sizes = []
        while block := src.read(MIB):
            sizes.append(len(block))
    assert sizes == [MIB, MIB, MIB, 5]


@pytest.mark.parametrize("size", [1000, BIG], ids=["small", "multipart"])
def test_write_aborted_by_an_exception_leaves_nothing(storage: Storage, size: int) -> None:
    """An exception inside open_write leaves no object, no listing, no unfinished upload."""

    class Boom(Exception):
        pass

    with pytest.raises(Boom), storage.open_write("db/partial", size_hint=size) as out:
        data = payload(size)
        for start in range(0, size, CHUNK):
            out.write(data[start : start + CHUNK])
        raise Boom

    assert storage.stat("db/partial") is None
    assert keys(storage) == []
    assert multipart_uploads(storage) == []


def test_overwrite_replaces_the_whole_object(storage: Storage) -> None:
    """Writing an existing key replaces it: the new bytes and size, one listing entry."""
    write_in_chunks(storage, "manifest.json", payload(6 * MIB))
    new = payload(100)
    write_in_chunks(storage, "manifest.json", new)

    assert read_all(storage, "manifest.json") == new
    info = storage.stat("manifest.json")
    assert info is not None and info.size == 100
    assert keys(storage) == ["manifest.json"]


def test_list_filters_by_prefix_across_pages(storage: Storage) -> None:
    """list(prefix) yields every key under the prefix, over several pages, and nothing else."""
    under_a = [f"a/{i:02d}.dump" for i in range(7)]
    for key in [*under_a, "b/x.dump", "ab.dump", "b/a/y.dump"]:
        write_in_chunks(storage, key, key.encode())

    assert keys(storage, "a/") == under_a
    assert keys(storage, "a") == ["a/00.dump", *under_a[1:], "ab.dump"]
    assert keys(storage, "b/") == ["b/a/y.dump", "b/x.dump"]
    assert keys(storage, "zzz/") == []
    assert len(keys(storage)) == 10
    sizes = {info.key: info.size for info in storage.list("a/")}
    assert sizes["a/03.dump"] == len(b"a/03.dump")


def test_list_paginates_on_s3(s3_server: S3Server, s3_bucket: str) -> None:
    """S3 listing follows continuation tokens: 7 keys at page size 2 take 4 requests."""
    storage = open_s3(s3_server, s3_bucket)
    for i in range(7):
        write_in_chunks(storage, f"k{i}", b"x")
    calls: list[str] = []
    storage.client.meta.events.register(
        "before-call.s3.ListObjectsV2", lambda **kw: calls.append(kw["model"].name)
    )
    assert keys(storage) == [f"k{i}" for i in range(7)]
    assert len(calls) == 4


def test_stat_reports_size_and_time_or_none(storage: Storage) -> None:
    """stat gives None for a missing key, else the size and an aware modification time."""
    assert storage.stat("nope") is None
    write_in_chunks(storage, "here", b"12345")
    info = storage.stat("here")
    assert info is not None and info.size == 5
    assert info.modified is None or info.modified.tzinfo is not None


def test_delete_removes_and_missing_is_a_no_op(storage: Storage) -> None:
    """delete removes the object; deleting a key that is not there does nothing."""
    write_in_chunks(storage, "db/old.dump", b"old")
    storage.delete("db/old.dump")
    storage.delete("db/old.dump")
    storage.delete("never/was")

    assert storage.stat("db/old.dump") is None
    assert keys(storage) == []


def test_reading_a_missing_key_names_it(storage: Storage) -> None:
    """Opening a missing key raises StorageError whose message names the key."""
    with pytest.raises(StorageError, match="missing-backup") as caught:
        read_all(storage, "db/missing-backup.dump")
    assert type(caught.value) is StorageError  # not transient, not a permission problem


def test_unsafe_keys_are_refused(storage: Storage) -> None:
    """Keys with empty, '.' or '..' parts are refused before any I/O."""
    for key in ["../escape", "a/../b", "", "a//b", "./x"]:
        with pytest.raises(StorageError, match="unsafe"):
            storage.stat(key)


# --- what only the cloud backends do ---------------------------------------------------------


def test_sha256_metadata_is_checked_and_kept(cloud: S3Storage | GCSStorage) -> None:
    """A declared sha256 is stored with the object and returned by remote_sha256."""
    for key, data in [("small", payload(10)), ("big", payload(BIG))]:
        digest = hashlib.sha256(data).hexdigest()
        with cloud.open_write(key, size_hint=len(data), metadata={"sha256": digest}) as out:
            for start in range(0, len(data), CHUNK):
                out.write(data[start : start + CHUNK])
        assert cloud.remote_sha256(key) == digest


def test_sha256_mismatch_stores_nothing(cloud: S3Storage | GCSStorage) -> None:
    """Bytes that do not hash to the declared sha256 are refused: nothing becomes visible."""
    for key, size in [("small", 10), ("big", BIG)]:
        with (
            pytest.raises(StorageError, match="sha256"),
            cloud.open_write(key, metadata={"sha256": "0" * 64}) as out,
        ):
            out.write(payload(size))
        assert cloud.stat(key) is None
    assert multipart_uploads(cloud) == []


def test_s3_single_part_sha256_comes_from_the_provider(s3_server: S3Server, s3_bucket: str) -> None:
    """Without metadata a single-part object's SHA-256 is the provider's; multipart gives None."""
    storage = open_s3(s3_server, s3_bucket)
    small, big = payload(1000), payload(BIG)
    write_in_chunks(storage, "small", small)
    write_in_chunks(storage, "big", big)

    assert storage.remote_sha256("small") == hashlib.sha256(small).hexdigest()
    assert storage.remote_sha256("big") is None  # composite: a hash of part hashes
    head = storage.client.head_object(Bucket=s3_bucket, Key="pfx/big")
    assert head["ETag"].endswith('-5"')  # 20 MiB + tail at 5 MiB parts: really multipart


def test_gcs_checksums_are_the_providers(
    gcs_server: GcsServer, gcs_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remote_checksums returns GCS's own md5 and crc32c of the stored bytes."""
    storage = open_gcs(gcs_server, gcs_bucket, monkeypatch)
    data = payload(3 * MIB + 1)
    write_in_chunks(storage, "obj", data)
    sums = storage.remote_checksums("obj")
    assert sums["md5"] == hashlib.md5(data).hexdigest()  # noqa: S324 - comparing GCS's md5
    assert len(sums["crc32c"]) == 8
    assert "sha256" not in sums


def test_s3_upload_options_apply_to_every_upload(s3_server: S3Server, s3_bucket: str) -> None:
    """SSE and storage class from settings are set on single-part and multipart uploads."""
    settings = s3_settings(s3_server, backup_s3_sse="AES256", backup_s3_storage_class="STANDARD_IA")
    storage = open_s3(s3_server, s3_bucket, settings=settings)
    write_in_chunks(storage, "small", payload(10))
    write_in_chunks(storage, "big", payload(BIG))
    for key in ("pfx/small", "pfx/big"):
        head = storage.client.head_object(Bucket=s3_bucket, Key=key)
        assert head["ServerSideEncryption"] == "AES256"
        assert head["StorageClass"] == "STANDARD_IA"


@pytest.fixture
def lock_bucket(s3_server: S3Server) -> Iterator[str]:
    """A bucket with Object Lock enabled (and so versioning), removed after the test."""
    name = f"pgk-lock-{os.urandom(6).hex()}"
    s3_server.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    yield name
    s3_server.remove_bucket(name)


def test_s3_object_lock_keeps_the_object(s3_server: S3Server, lock_bucket: str) -> None:
    """With Object Lock days set, uploads carry retention and delete raises ObjectLockedError."""
    settings = s3_settings(s3_server, backup_s3_object_lock_days=3)
    storage = open_s3(s3_server, lock_bucket, settings=settings)
    sent: list[dict[str, bytes]] = []
    storage.client.meta.events.register(
        "before-send.s3.CreateMultipartUpload",
        lambda request, **kw: sent.append(dict(request.headers)),
    )
    write_in_chunks(storage, "small", payload(10))
    write_in_chunks(storage, "big", payload(BIG))

    # moto ignores Object Lock headers on CreateMultipartUpload (real S3 applies them), so
    # for the multipart object only the request is checked.
    assert sent and sent[0]["x-amz-object-lock-mode"] == b"GOVERNANCE"
    assert "x-amz-object-lock-retain-until-date" in sent[0]
    head = storage.client.head_object(Bucket=lock_bucket, Key="pfx/small")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    with pytest.raises(ObjectLockedError, match="kept by Object Lock") as caught:
        storage.delete("small")
    assert caught.value.key == "small" and caught.value.retain_until is not None
    assert keys(storage) == ["big", "small"]  # still there, still listed


def test_s3_object_lock_mode_compliance_is_set_from_settings(s3_server: S3Server) -> None:
    """BACKUP_S3_OBJECT_LOCK_MODE=COMPLIANCE: retention nobody can shorten, not even admins.
    (So its bucket cannot be emptied: it stays in this session's moto server.)"""
    lock_bucket = f"pgk-compliance-{os.urandom(6).hex()}"
    s3_server.client().create_bucket(Bucket=lock_bucket, ObjectLockEnabledForBucket=True)
    settings = s3_settings(
        s3_server, backup_s3_object_lock_days=1, backup_s3_object_lock_mode="COMPLIANCE"
    )
    storage = open_s3(s3_server, lock_bucket, settings=settings)
    write_in_chunks(storage, "small", payload(10))
    head = storage.client.head_object(Bucket=lock_bucket, Key="pfx/small")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(ObjectLockedError, match="COMPLIANCE"):
        storage.delete("small")
