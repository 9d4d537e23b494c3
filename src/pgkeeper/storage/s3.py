"""Amazon S3 and S3-compatible backend (MinIO, Ceph, R2, B2): ``s3://bucket/prefix``.

Writes stream: the writer buffers one part, then uploads it while the caller keeps writing
(up to ``max_concurrency`` parts, and no more than INFLIGHT_BUDGET bytes, in flight: memory is
about 40 MiB at the default 8 MiB parts, and about two parts once S3's 10,000-part limit forces
parts past 32 MiB, i.e. for objects over ~160 GB). An object
smaller than one part is sent with one PutObject; anything larger is a multipart upload that is
completed only when the ``with`` block exits cleanly and aborted on any exception, so a partial
object is never visible. Every request carries a SHA-256 checksum that S3 verifies on receipt.

Checksums: S3 keeps a SHA-256 of every part, but a multipart object's checksum is *composite*
(a hash of the part hashes, shown as ``<b64>-<parts>``), not the object's sha256. So when the
caller passes ``metadata={"sha256": hex}`` the writer also hashes the whole stream and refuses to
complete unless the bytes it sent hash to that value; the value is stored as the object's
``x-amz-meta-sha256``. Without a declared value the writer does not hash the whole stream (the
backup pipeline already does; every extra pass costs throughput on a small host).
``remote_sha256`` returns the stored value, or the provider's full-object SHA-256 for a
single-part upload, else None (then the caller re-reads the object to verify it).

Errors are translated at this boundary (``pgkeeper.errors``)::

    StorageError                  NoSuchBucket, NoSuchKey, other 4xx, checksum mismatch
    ├── ObjectLockedError         delete refused: the object is under Object Lock retention
    ├── StoragePermissionError    403, AccessDenied, bad key id / signature, no credentials
    └── TransientStorageError     5xx, throttling, resets, timeouts, truncated bodies

botocore already retries transient failures (``standard`` mode, ``total_max_attempts`` from
``BACKUP_S3_MAX_ATTEMPTS``, both set explicitly because botocore's defaults differ by version);
what reaches the caller as TransientStorageError has exhausted those attempts.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import io
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

from pgkeeper.errors import (
    ConfigError,
    StorageError,
    StoragePermissionError,
    TransientStorageError,
)
from pgkeeper.storage.base import (
    CHUNK,
    ObjectInfo,
    claim_by_readback,
    with_prefix,
    without_prefix,
)

if TYPE_CHECKING:
    from pgkeeper.settings import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# S3 limits, https://docs.aws.amazon.com/AmazonS3/latest/userguide/qfacts.html :
# at most 10,000 parts, each 5 MiB to 5 GiB (the last part may be smaller), 5 TiB per object.
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MIB
MAX_PART_SIZE = 5 * 1024 * MIB
MAX_OBJECT_SIZE = 5 * 1024 * 1024 * MIB
# Our own choices within those limits.
DEFAULT_PART_SIZE = 8 * MIB  # the AWS CLI's default part size
HINTED_PARTS = 5_000  # a hinted size fills half the part budget; the other half absorbs a low hint
GROWTH_STEP = 1_000  # past the planned parts, the part size doubles every this many parts
DEFAULT_MAX_CONCURRENCY = 4  # parts uploading while the caller fills the next one
INFLIGHT_BUDGET = 64 * MIB  # fewer parts in flight when parts are big (at least one)
DEFAULT_PAGE_SIZE = 1_000  # ListObjectsV2 returns at most 1,000 keys a page anyway
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
SHA256_METADATA = "sha256"  # stored as x-amz-meta-sha256

_PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
)


class ObjectLockedError(StorageError):
    """A delete was refused because the object is under S3 Object Lock retention or legal hold.

    Rotation reports such a backup as "kept by lock" instead of failing.
    """

    def __init__(self, message: str, key: str, retain_until: datetime | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.retain_until = retain_until


def plan_parts(size_hint: int | None, minimum: int = DEFAULT_PART_SIZE) -> tuple[int, int]:
    """Return ``(base part size, planned parts)`` for an upload of about ``size_hint`` bytes.

    With a hint the base part is sized so the hinted object takes at most HINTED_PARTS parts;
    without one it is ``minimum`` for the first GROWTH_STEP parts (8 GiB at 8 MiB). Past the
    planned parts ``part_size`` doubles every GROWTH_STEP parts, so an unknown size reaches
    S3's 5 TiB limit within 10,000 parts and a hint that is low by up to ~13x still fits.
    """
    if size_hint is None or size_hint <= 0:
        return minimum, GROWTH_STEP
    base = max(minimum, math.ceil(size_hint / HINTED_PARTS / MIB) * MIB)
    return base, max(GROWTH_STEP, math.ceil(size_hint / base))


def part_size(part_number: int, base: int, planned: int) -> int:
    """Size of part ``part_number`` (1-based) under the plan from ``plan_parts``."""
    if part_number <= planned:
        return base
    doublings = (part_number - planned - 1) // GROWTH_STEP + 1
    return min(MAX_PART_SIZE, base << doublings)


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class _Options:
    """What every upload sends besides the data: SSE, storage class, Object Lock."""

    sse: str | None = None
    kms_key_id: str | None = None
    storage_class: str | None = None
    object_lock_days: int | None = None
    object_lock_mode: str = "GOVERNANCE"

    def upload_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if self.sse:
            args["ServerSideEncryption"] = self.sse
            if self.sse == "aws:kms" and self.kms_key_id:
                args["SSEKMSKeyId"] = self.kms_key_id
        if self.storage_class:
            args["StorageClass"] = self.storage_class
        if self.object_lock_days:
            args["ObjectLockMode"] = self.object_lock_mode
            args["ObjectLockRetainUntilDate"] = datetime.now(UTC) + timedelta(
                days=self.object_lock_days
            )
        return args


def make_client(
    settings: Settings | None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
) -> Any:
    """A boto3 S3 client: explicit keys from settings, else boto3's default credential chain."""
    import boto3  # lazy: only S3 users pay for importing boto3
    from botocore.config import Config

    key_id = settings.aws_access_key_id if settings else None
    secret = settings.aws_secret_access_key if settings else None
    if bool(key_id) != bool(secret and secret.get_secret_value()):
        raise ConfigError(
            "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither "
            "(to use a profile, instance role or web identity)"
        )
    session = boto3.session.Session(
        aws_access_key_id=key_id or None,
        aws_secret_access_key=secret.get_secret_value() if key_id and secret else None,
        region_name=settings.backup_s3_region if settings else None,
    )
    config = Config(
        # Both set explicitly: botocore's default mode and the meaning of "max_attempts"
        # (retries, not attempts) differ between versions.
        retries={
            "total_max_attempts": settings.backup_s3_max_attempts if settings else 5,
            "mode": "standard",
        },
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        tcp_keepalive=True,
        max_pool_connections=DEFAULT_MAX_CONCURRENCY * 2 + 2,
    )
    return session.client(
        "s3",
        endpoint_url=settings.backup_s3_endpoint_url if settings else None,
        config=config,
    )


class S3Storage:
    """One bucket and key prefix in S3 or an S3-compatible store."""

    kind = "s3"
    # No create-if-absent that every S3-compatible store honours (If-None-Match on PUT is
    # recent and moto, MinIO versions differ): write and read back.
    atomic_create = False
    stored_checksums = True  # x-amz-meta-sha256, or a single-part object's SHA-256 checksum
    orphan_uploads = True  # multipart uploads of a killed writer stay, invisible and billed

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any,
        sse: str | None = None,
        kms_key_id: str | None = None,
        storage_class: str | None = None,
        object_lock_days: int | None = None,
        object_lock_mode: str = "GOVERNANCE",
        max_attempts: int = 5,
        part_size: int | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        if not bucket:
            raise ConfigError("S3 URL has no bucket (use s3://bucket/prefix)")
        if part_size is not None and not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be within S3's {MIN_PART_SIZE}..{MAX_PART_SIZE}")
        if object_lock_mode not in ("GOVERNANCE", "COMPLIANCE"):
            raise ConfigError(f"object lock mode {object_lock_mode!r} is not GOVERNANCE/COMPLIANCE")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client
        self.options = _Options(sse, kms_key_id, storage_class, object_lock_days, object_lock_mode)
        self.max_attempts = max(1, max_attempts)
        self.min_part_size = part_size or DEFAULT_PART_SIZE
        self.max_concurrency = max(1, max_concurrency)
        self.page_size = page_size
        self._bucket_seen = False

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, **options: Any) -> S3Storage:
        """Open ``s3://bucket/prefix`` with the S3 knobs from settings (None: boto3 defaults).

        Raises ConfigError for a URL without a bucket or half-set credentials.
        """
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"storage URL {url!r} is not s3://bucket/prefix")
        if settings is not None:
            options.setdefault("sse", settings.backup_s3_sse)
            options.setdefault("kms_key_id", settings.backup_s3_kms_key_id)
            options.setdefault("storage_class", settings.backup_s3_storage_class)
            options.setdefault("object_lock_days", settings.backup_s3_object_lock_days)
            options.setdefault("object_lock_mode", settings.backup_s3_object_lock_mode)
            options.setdefault("max_attempts", settings.backup_s3_max_attempts)
        client = options.pop("client", None) or make_client(settings)
        return cls(parsed.netloc, parsed.path, client=client, **options)

    # --- keys and errors -----------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        return with_prefix(self.prefix, key)

    def _relative(self, full_key: str) -> str:
        return without_prefix(self.prefix, full_key)

    def translate(self, exc: Exception, what: str) -> StorageError:
        """Turn a botocore error into the project's error; ``what`` names the object/action."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            IncompleteReadError,
            NoCredentialsError,
            PartialCredentialsError,
            ResponseStreamingError,
        )

        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code == "NoSuchBucket":
                return self._missing_bucket(what)
            if code == "PreconditionFailed" or status == 412:
                return StorageError(f"{what}: the object changed in {self.url} (retry)")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return StorageError(f"{what}: not found in {self.url}")
            if code in _PERMISSION_CODES or status in (401, 403):
                return StoragePermissionError(
                    f"access to bucket '{self.bucket}' denied ({code or status}) {what} "
                    "(check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                    "the profile or instance role, and that the bucket policy allows "
                    "s3:GetObject, s3:PutObject, s3:ListBucket, s3:DeleteObject and "
                    "s3:AbortMultipartUpload)"
                )
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientStorageError(
                    f"{self.url} is unavailable ({code or status}) {what} (retry later)"
                )
            return StorageError(f"{self.url} refused the request ({code or status}) {what}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoragePermissionError(
                f"no AWS credentials found for bucket '{self.bucket}' ({what}; set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile, or an instance role)"
            )
        if isinstance(exc, ConnectionError | ResponseStreamingError | IncompleteReadError):
            return TransientStorageError(
                f"connection to {self.url} failed ({type(exc).__name__}) {what} (check the "
                "network and BACKUP_S3_ENDPOINT_URL, then retry)"
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{self.url}: {type(exc).__name__} {what}")
        if isinstance(exc, OSError):
            return TransientStorageError(f"connection to {self.url} failed ({exc}) {what}")
        raise exc

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            raise self.translate(exc, what) from exc

    def _head(self, full_key: str, what: str, **kwargs: Any) -> dict[str, Any] | None:
        """HeadObject, or None when the key is missing (a missing bucket still raises)."""
        from botocore.exceptions import ClientError

        try:
            head: dict[str, Any] = self.client.head_object(
                Bucket=self.bucket, Key=full_key, **kwargs
            )
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 404:
                raise self.translate(exc, what) from exc
            # A HEAD 404 has no body, so "no such key" and "no such bucket" look alike.
            self._require_bucket(what)
            return None
        except Exception as exc:
            raise self.translate(exc, what) from exc
        self._bucket_seen = True
        return head

    def _missing_bucket(self, what: str) -> StorageError:
        return StorageError(
            f"bucket '{self.bucket}' does not exist ({what}; create it or fix "
            "AWS_S3_BUCKET / the s3:// URL)"
        )

    def _require_bucket(self, what: str) -> None:
        """Raise when the bucket does not exist; checked once per instance."""
        from botocore.exceptions import ClientError

        if self._bucket_seen:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise self._missing_bucket(what) from exc
            raise self.translate(exc, what) from exc
        except Exception as exc:
            raise self.translate(exc, what) from exc
        self._bucket_seen = True

    # --- the protocol --------------------------------------------------------------------

    def local_path(self, key: str) -> Path | None:
        return None

    @contextmanager
    def open_write(
        self, key: str, size_hint: int | None = None, metadata: dict[str, str] | None = None
    ) -> Iterator[_S3Writer]:
        """Stream an object to ``key``; it becomes visible only when the block exits cleanly.

        ``metadata["sha256"]``, when given, must equal the sha256 of the bytes written or the
        upload is aborted. Raises StorageError subclasses; the block's own exceptions pass
        through unchanged after the upload is aborted.
        """
        full_key = self._full_key(key)
        if size_hint is not None and size_hint > MAX_OBJECT_SIZE:
            raise StorageError(
                f"{key!r} ({size_hint} bytes) exceeds S3's 5 TiB object limit in {self.url}"
            )
        writer = _S3Writer(self, full_key, size_hint, dict(metadata or {}))
        try:
            yield writer
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """Stream ``key``; raise StorageError naming the key when it does not exist."""
        raw = _S3Reader(self, self._full_key(key), key)
        with io.BufferedReader(raw, buffer_size=CHUNK) as reader:
            yield reader

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket,
                Prefix=full_prefix,
                PaginationConfig={"PageSize": self.page_size},
            )
            for page in pages:
                self._bucket_seen = True
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        self._relative(item["Key"]), int(item["Size"]), item.get("LastModified")
                    )
        except StorageError:
            raise
        except Exception as exc:
            raise self.translate(exc, f"listing '{full_prefix}'") from exc

    def stat(self, key: str) -> ObjectInfo | None:
        head = self._head(self._full_key(key), f"reading {key!r}")
        if head is None:
            return None
        return ObjectInfo(key, int(head["ContentLength"]), head.get("LastModified"))

    def delete(self, key: str) -> None:
        """Delete ``key`` (a missing key is a no-op).

        Raises ObjectLockedError when Object Lock retention or a legal hold protects it: in a
        versioned bucket a plain DeleteObject would "succeed" by hiding the locked data behind
        a delete marker, so the lock is checked first and the backup stays listed.
        """
        full_key = self._full_key(key)
        what = f"deleting {key!r}"
        head = self._head(full_key, what)
        if head is None:
            return
        retain_until = head.get("ObjectLockRetainUntilDate")
        if retain_until is not None and retain_until > datetime.now(UTC):
            raise ObjectLockedError(
                f"{key!r} in {self.url} is kept by Object Lock "
                f"({head.get('ObjectLockMode', 'retention')} until "
                f"{retain_until.astimezone(UTC):%Y-%m-%d %H:%M}Z); it can be deleted after that",
                key,
                retain_until,
            )
        if head.get("ObjectLockLegalHoldStatus") == "ON":
            raise ObjectLockedError(
                f"{key!r} in {self.url} is kept by an Object Lock legal hold "
                "(remove the hold to delete it)",
                key,
            )
        self._call(what, "delete_object", Key=full_key)

    def close(self) -> None:
        """Release the client's pooled HTTP connections (the target stays usable: a later
        call opens new ones)."""
        self.client.close()

    # --- S3 extras -----------------------------------------------------------------------

    def remote_sha256(self, key: str) -> str | None:
        """The object's full sha256 (hex) as the provider holds it, or None if it cannot say.

        ``x-amz-meta-sha256`` (written only after the writer checked the bytes it sent) wins;
        else a single-part object's own SHA-256 checksum. A multipart object's checksum is a
        hash of part hashes, not the object's sha256, so it gives None.
        """
        head = self._head(self._full_key(key), f"reading {key!r}", ChecksumMode="ENABLED")
        if head is None:
            raise StorageError(f"{key!r} not found in {self.url}")
        stored = (head.get("Metadata") or {}).get(SHA256_METADATA)
        if stored:
            return str(stored).lower()
        checksum = head.get("ChecksumSHA256")
        etag = str(head.get("ETag", ""))
        composite = head.get("ChecksumType") == "COMPOSITE" or "-" in etag
        if checksum and not composite and "-" not in checksum:
            return base64.b64decode(checksum).hex()
        return None

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return claim_by_readback(self, key, data)

    def abort_orphan_uploads(
        self, prefix: str = "", older_than: timedelta = timedelta(hours=1)
    ) -> builtins.list[str]:
        """Abort multipart uploads under ``prefix`` started more than ``older_than`` ago.

        They are what an uploader killed mid-upload leaves behind (invisible, but billed).
        Returns the keys (relative to this target) whose uploads were aborted.
        """
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cutoff = datetime.now(UTC) - older_than
        aborted: builtins.list[str] = []
        what = f"cleaning unfinished uploads under '{full_prefix}'"
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for upload in page.get("Uploads", []):
                    initiated = upload.get("Initiated")
                    if initiated is not None and initiated > cutoff:
                        continue
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    aborted.append(self._relative(upload["Key"]))
        except Exception as exc:
            raise self.translate(exc, what) from exc
        return aborted


class _S3Writer:
    """Buffers one part at a time; uploads parts on a small thread pool as they fill."""

    def __init__(
        self, storage: S3Storage, full_key: str, size_hint: int | None, metadata: dict[str, str]
    ) -> None:
        self._s3 = storage
        self._key = full_key
        self._what = f"writing '{full_key}'"
        self._metadata = metadata
        self._base, self._planned = plan_parts(size_hint, storage.min_part_size)
        self._buffer = bytearray()
        # The whole-stream hash only when there is a declared value to check it against.
        self._digest = hashlib.sha256() if metadata.get(SHA256_METADATA) else None
        self.size = 0
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[dict[str, Any]]] = deque()
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1

    def write(self, data: bytes, /) -> int:
        if self._digest is not None:
            self._digest.update(data)
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= self._current_part_size():
            self._send_part(final=False)
        return len(data)

    def _current_part_size(self) -> int:
        return part_size(self._next_part, self._base, self._planned)

    def _send_part(self, final: bool) -> None:
        if self._next_part > MAX_PARTS:
            raise StorageError(
                f"'{self._key}' needs more than S3's {MAX_PARTS} parts in {self._s3.url} "
                "(pass a size hint closer to the real size)"
            )
        if self._upload_id is None:
            self._create()
        # Bound memory: wait for the oldest part before queueing more than the parts allowed.
        budget = INFLIGHT_BUDGET // self._current_part_size()
        allowed = max(1, min(self._s3.max_concurrency, budget))
        while len(self._pending) >= allowed:
            self._parts.append(self._pending.popleft().result())
        # Hand the buffer itself to the upload (no copy of the part); keep only the overshoot.
        size = len(self._buffer) if final else self._current_part_size()
        body, self._buffer = self._buffer, self._buffer[size:]
        del body[size:]
        pool = self._pool or self._start_pool()
        self._pending.append(pool.submit(self._upload_part, self._next_part, body))
        self._next_part += 1

    def _create(self) -> None:
        args = self._s3.options.upload_args()
        created = self._s3._call(
            self._what,
            "create_multipart_upload",
            Key=self._key,
            ChecksumAlgorithm="SHA256",
            Metadata=self._metadata,
            **args,
        )
        self._upload_id = str(created["UploadId"])

    def _start_pool(self) -> ThreadPoolExecutor:
        self._pool = ThreadPoolExecutor(
            max_workers=self._s3.max_concurrency, thread_name_prefix="pgkeeper-s3-part"
        )
        return self._pool

    def _upload_part(self, number: int, body: bytearray) -> dict[str, Any]:
        # Our own digest, so botocore does not hash again; S3 rejects a part that differs.
        checksum = _b64(hashlib.sha256(body).digest())
        response = self._s3._call(
            f"{self._what} (part {number})",
            "upload_part",
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def _check_sha256(self) -> None:
        expected = self._metadata.get(SHA256_METADATA)
        if expected and self._digest is not None and expected.lower() != self._digest.hexdigest():
            raise StorageError(
                f"the bytes written to '{self._key}' in {self._s3.url} have sha256 "
                f"{self._digest.hexdigest()}, not the expected {expected.lower()} (the source "
                "changed or is corrupt; nothing was stored)"
            )

    def commit(self) -> None:
        if self._upload_id is None:
            # Smaller than one part: one PutObject, whose full-object SHA-256 S3 verifies.
            self._check_sha256()
            self._s3._call(
                self._what,
                "put_object",
                Key=self._key,
                Body=self._buffer,
                # Both: the algorithm header is what Object Lock uploads require (with no
                # Content-MD5); the value is ours, so botocore does not hash again.
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=_b64(hashlib.sha256(self._buffer).digest()),
                Metadata=self._metadata,
                **self._s3.options.upload_args(),
            )
            self._buffer = bytearray()
            return
        if self._buffer:
            self._send_part(final=True)
        while self._pending:
            self._parts.append(self._pending.popleft().result())
        self._check_sha256()
        parts = sorted(self._parts, key=lambda p: p["PartNumber"])
        try:
            self._s3._call(
                self._what,
                "complete_multipart_upload",
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except StorageError as exc:
            if _error_code(exc.__cause__) != "NoSuchUpload":
                raise
            # A retry after S3 completed the upload but the answer was lost finds no upload
            # any more: the object tells whether it was ours.
            if not self._is_our_object(parts):
                raise StorageError(
                    f"the multipart upload of '{self._key}' in {self._s3.url} no longer exists "
                    "(aborted by someone else or by a lifecycle rule?); nothing was stored"
                ) from exc
            log.info("completing '%s' was answered late: the object is stored", self._key)
        self._shutdown()

    def _is_our_object(self, parts: list[dict[str, Any]]) -> bool:
        """Whether the key holds the object these parts make (S3's multipart ETag is the MD5
        of the parts' MD5s and their count)."""
        head = self._s3._head(self._key, self._what)
        if head is None:
            return False
        md5s = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
        return bool(head.get("ETag") == f'"{hashlib.md5(md5s).hexdigest()}-{len(parts)}"')  # noqa: S324 - S3's ETag

    def abort(self) -> None:
        """Drop queued parts, wait for running ones, abort the multipart upload."""
        for future in self._pending:
            future.cancel()
        self._shutdown()
        self._buffer = bytearray()
        if self._upload_id is None:
            return
        try:
            self._s3.client.abort_multipart_upload(
                Bucket=self._s3.bucket, Key=self._key, UploadId=self._upload_id
            )
        except Exception as exc:
            # The upload stays invisible; abort_orphan_uploads removes it on a later run.
            log.warning(
                "could not abort the multipart upload of '%s' in %s (%s); the next run's "
                "cleanup removes it",
                self._key,
                self._s3.url,
                type(exc).__name__,
            )

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _error_code(exc: BaseException | None) -> str | None:
    """The S3 error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


class _S3Reader(io.RawIOBase):
    """A GetObject body that resumes with a ranged GET when the connection breaks mid-body.

    botocore retries the request but not a body cut short; this reader re-requests the rest
    (``Range`` + ``If-Match`` on the first ETag, so it never splices two versions) up to
    ``max_attempts`` times without progress, then raises TransientStorageError.
    """

    def __init__(self, storage: S3Storage, full_key: str, key: str) -> None:
        super().__init__()
        self._s3 = storage
        self._key = full_key
        self._what = f"reading {key!r}"
        self._offset = 0
        self._etag: str | None = None
        self._size = 0
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        args: dict[str, Any] = {"Key": self._key}
        if self._etag is not None:
            args["Range"] = f"bytes={self._offset}-"
            args["IfMatch"] = self._etag
        response = self._s3._call(self._what, "get_object", **args)
        if self._etag is None:
            self._etag = str(response["ETag"])
            self._size = int(response["ContentLength"])
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import (
            ConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        view = memoryview(buffer).cast("B")
        failures = 0
        while True:
            if self._offset >= self._size:
                return 0
            try:
                data = self._body.read(len(view))
                if not data:
                    # The body ended before ContentLength: treat like a cut connection.
                    raise IncompleteReadError(actual_bytes=self._offset, expected_bytes=self._size)
            except (
                ConnectionError,
                IncompleteReadError,
                ReadTimeoutError,
                ResponseStreamingError,
                OSError,
            ) as exc:
                failures += 1
                self._close_body()
                if failures >= self._s3.max_attempts:
                    raise TransientStorageError(
                        f"{self._what} from {self._s3.url}: the connection broke at byte "
                        f"{self._offset} of {self._size}, {failures} times (retry later)"
                    ) from exc
                time.sleep(min(0.1 * 2**failures, 5.0))
                self._open()
                continue
            view[: len(data)] = data
            self._offset += len(data)
            return len(data)

    def _close_body(self) -> None:
        if self._body is not None:
            # Closing an already broken stream: there is nothing left to save.
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()
