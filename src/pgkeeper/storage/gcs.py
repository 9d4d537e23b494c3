"""Google Cloud Storage backend: ``gs://bucket/prefix``.

Writes stream through one resumable upload session (``blob.open("wb")``), sent in chunks of
``chunk_size`` bytes, so memory is bounded by a few chunks. The session is finalised only when
the ``with`` block exits cleanly; on any exception the session is cancelled (``terminate``, a
DELETE of the session URI) and never closed, because closing a writer sends the last chunk and
*finalises* the object. An unfinalised session is invisible and expires after a week.

Checksums: GCS computes a crc32c (and an md5 for non-composite objects) of every object; the
upload asks the client to verify the crc32c the server reports at finalisation, and an object
whose crc32c disagrees is deleted again. When the caller passes ``metadata={"sha256": hex}`` the
writer also hashes the stream and refuses to finalise unless the bytes sent hash to that value;
the value is stored in the object's custom metadata.
``remote_checksums`` returns what the provider holds (hex): ``crc32c``, ``md5``, ``sha256``.

Errors are translated at this boundary (``pgkeeper.errors``)::

    StorageError                  404 bucket or object, other 4xx, checksum mismatch
    ├── StoragePermissionError    401, 403, credentials that cannot be refreshed
    └── TransientStorageError     429, 5xx, resets, timeouts, truncated bodies, retries exhausted

The client library already retries transient failures with exponential backoff for up to
``retry_timeout`` seconds (google-api-core ``Retry``); what reaches the caller has exhausted it.
Credentials: ``GCS_KEYFILE`` (a service account JSON), else Google's application default
credentials; with ``STORAGE_EMULATOR_HOST`` set, anonymous credentials and a fixed project.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlparse

from pgkeeper.errors import (
    ConfigError,
    StorageError,
    StoragePermissionError,
    TransientStorageError,
)
from pgkeeper.storage.base import ObjectInfo, claim_by_readback, with_prefix, without_prefix

if TYPE_CHECKING:
    from pgkeeper.settings import Settings

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
# Resumable upload chunks must be a multiple of 256 KiB, except the last one; Google recommends
# at least 8 MiB for throughput. https://cloud.google.com/storage/docs/performing-resumable-uploads
CHUNK_MULTIPLE = 256 * KIB
DEFAULT_CHUNK_SIZE = 16 * MIB
READ_CHUNK = 8 * MIB  # bytes fetched per ranged GET when streaming a read
DEFAULT_PAGE_SIZE = 1_000  # objects.list returns at most 1,000 items a page anyway
DEFAULT_RETRY_TIMEOUT = 120.0  # seconds of retrying one request (google-api-core's default)
TIMEOUT = (10.0, 60.0)  # connect, read seconds for each HTTP request
EMULATOR_PROJECT = "pgkeeper-emulator"
SHA256_METADATA = "sha256"


def _hex_from_b64(value: str | None) -> str | None:
    return base64.b64decode(value).hex() if value else None


def make_client(settings: Settings | None) -> Any:
    """A google-cloud-storage client: emulator, GCS_KEYFILE, or application default creds.

    Raises ConfigError for a missing key file, StoragePermissionError when no credentials exist.
    """
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage  # lazy: only GCS users pay for importing it

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]  # untyped in google-auth
        return storage.Client(project=EMULATOR_PROJECT, credentials=anonymous)
    keyfile = settings.gcs_keyfile if settings else None
    try:
        if keyfile is not None:
            if not Path(keyfile).is_file():
                raise ConfigError(
                    f"GCS_KEYFILE {str(keyfile)!r} does not exist (set it to a service account "
                    "JSON key file, or unset it to use application default credentials)"
                )
            return storage.Client.from_service_account_json(str(keyfile))
        return storage.Client()
    except DefaultCredentialsError as exc:
        raise StoragePermissionError(
            "no Google credentials found (set GCS_KEYFILE to a service account key file, or "
            "GOOGLE_APPLICATION_CREDENTIALS, or run 'gcloud auth application-default login')"
        ) from exc
    except ValueError as exc:  # a key file that is not a service account key
        raise ConfigError(
            f"GCS_KEYFILE {str(keyfile)!r} is not a service account JSON key file "
            "(download one from the Google Cloud console)"
        ) from exc


class GCSStorage:
    """One bucket and object-name prefix in Google Cloud Storage."""

    kind = "gcs"
    # GCS has ifGenerationMatch=0, but the emulators here ignore preconditions, so it could
    # not be tested: write and read back, as on S3.
    atomic_create = False
    stored_checksums = True  # the sha256 metadata the writer stores after checking its bytes
    orphan_uploads = False  # an unfinished resumable session expires on its own (one week)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        page_size: int = DEFAULT_PAGE_SIZE,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        retry_delay: float = 1.0,
    ) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        if not bucket:
            raise ConfigError("GCS URL has no bucket (use gs://bucket/prefix)")
        if chunk_size <= 0 or chunk_size % CHUNK_MULTIPLE:
            raise ValueError(f"chunk_size must be a positive multiple of {CHUNK_MULTIPLE}")
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = client
        self.bucket = client.bucket(bucket)
        self.chunk_size = chunk_size
        self.page_size = page_size
        # Exponential backoff from retry_delay seconds (doubling, at most 60 s between tries)
        # until retry_timeout seconds have passed; the predicate stays the library's own.
        self.retry = DEFAULT_RETRY.with_timeout(retry_timeout).with_delay(
            initial=retry_delay, maximum=60.0, multiplier=2.0
        )
        self._bucket_seen = False

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, **options: Any) -> GCSStorage:
        """Open ``gs://bucket/prefix``; credentials as ``make_client`` finds them."""
        parsed = urlparse(url)
        if parsed.scheme not in ("gs", "gcs") or not parsed.netloc:
            raise ConfigError(f"storage URL {url!r} is not gs://bucket/prefix")
        client = options.pop("client", None) or make_client(settings)
        return cls(parsed.netloc, parsed.path, client=client, **options)

    # --- keys and errors -----------------------------------------------------------------

    def _full_key(self, key: str) -> str:
        return with_prefix(self.prefix, key)

    def _relative(self, full_key: str) -> str:
        return without_prefix(self.prefix, full_key)

    def _bucket_exists(self) -> bool:
        if not self._bucket_seen:
            try:
                self._bucket_seen = bool(self.bucket.exists(retry=self.retry, timeout=TIMEOUT))
            except Exception as exc:
                raise self.translate(exc, "checking the bucket", check_bucket=False) from exc
        return self._bucket_seen

    def translate(self, exc: BaseException, what: str, check_bucket: bool = True) -> StorageError:
        """Turn a google-cloud-storage / transport error into the project's error."""
        import requests
        import urllib3
        from google.api_core import exceptions as api
        from google.auth import exceptions as auth
        from google.cloud.storage.exceptions import InvalidResponse

        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, api.RetryError):  # the retry deadline passed: the last error decides
            last = self.translate(exc.cause, what, check_bucket) if exc.cause else None
            if isinstance(last, TransientStorageError):
                return last
            return TransientStorageError(f"{self.url} kept failing {what} (retry later)")
        status: int | None = None
        if isinstance(exc, api.GoogleAPICallError):
            status = exc.code
        elif isinstance(exc, InvalidResponse) and exc.response is not None:
            status = exc.response.status_code
        if status == 404:
            if check_bucket and not self._bucket_exists():
                return StorageError(
                    f"bucket '{self.bucket_name}' does not exist ({what}; create it or fix "
                    "GCS_BUCKET / the gs:// URL)"
                )
            return StorageError(f"{what}: not found in {self.url}")
        if status in (401, 403) or isinstance(exc, auth.RefreshError):
            return StoragePermissionError(
                f"access to bucket '{self.bucket_name}' denied ({status or 'credentials'}) "
                f"{what} (check GCS_KEYFILE or the application default credentials, and that "
                "the account has roles/storage.objectAdmin on the bucket)"
            )
        if status is not None and (status >= 500 or status in (408, 429)):
            return TransientStorageError(
                f"{self.url} is unavailable ({status}) {what} (retry later)"
            )
        if status is not None:
            return StorageError(f"{self.url} refused the request ({status}) {what}")
        transient_types = (
            ConnectionError,
            TimeoutError,
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.HTTPError,
            auth.TransportError,
        )
        if isinstance(exc, transient_types):
            return TransientStorageError(
                f"connection to {self.url} failed ({type(exc).__name__}) {what} (check the "
                "network, then retry)"
            )
        if isinstance(exc, OSError):
            return TransientStorageError(f"connection to {self.url} failed ({exc}) {what}")
        return StorageError(f"{self.url}: {type(exc).__name__} {what}")

    # --- the protocol --------------------------------------------------------------------

    def local_path(self, key: str) -> Path | None:
        return None

    @contextmanager
    def open_write(
        self, key: str, size_hint: int | None = None, metadata: dict[str, str] | None = None
    ) -> Iterator[_GCSWriter]:
        """Stream an object to ``key``; it becomes visible only when the block exits cleanly.

        ``metadata["sha256"]``, when given, must equal the sha256 of the bytes written or the
        upload is cancelled. Raises StorageError subclasses; the block's own exceptions pass
        through unchanged after the session is cancelled.
        """
        writer = _GCSWriter(self, self._full_key(key), key, dict(metadata or {}))
        try:
            yield writer
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """Stream ``key``; raise StorageError naming the key when it does not exist."""
        what = f"reading {key!r}"
        blob = self._get_blob(self._full_key(key), what)
        if blob is None:
            raise StorageError(f"{key!r} not found in {self.url}")
        raw = _GCSReader(self, blob, what)
        with io.BufferedReader(raw, buffer_size=READ_CHUNK) as reader:
            yield reader

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        try:
            blobs = self.client.list_blobs(
                self.bucket_name,
                prefix=full_prefix,
                page_size=self.page_size,
                retry=self.retry,
                timeout=TIMEOUT,
            )
            for blob in blobs:
                self._bucket_seen = True
                yield ObjectInfo(self._relative(blob.name), int(blob.size or 0), blob.updated)
        except StorageError:
            raise
        except Exception as exc:
            raise self.translate(exc, f"listing '{full_prefix}'") from exc

    def stat(self, key: str) -> ObjectInfo | None:
        blob = self._get_blob(self._full_key(key), f"reading {key!r}")
        if blob is None:
            return None
        return ObjectInfo(key, int(blob.size or 0), blob.updated)

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is a no-op (a missing bucket is an error)."""
        from google.api_core.exceptions import NotFound

        what = f"deleting {key!r}"
        try:
            self.bucket.blob(self._full_key(key)).delete(retry=self.retry, timeout=TIMEOUT)
        except NotFound as exc:
            if not self._bucket_exists():
                raise self.translate(exc, what) from exc
        except Exception as exc:
            raise self.translate(exc, what) from exc

    def close(self) -> None:
        """Release the client's pooled HTTP connections (the target stays usable: a later
        call opens new ones)."""
        self.client.close()

    # --- GCS extras ----------------------------------------------------------------------

    def remote_checksums(self, key: str) -> dict[str, str]:
        """What GCS holds for ``key``, as hex: ``crc32c`` always, ``md5`` unless the object is
        composite, ``sha256`` when the writer stored it. Raises StorageError if missing."""
        blob = self._get_blob(self._full_key(key), f"reading {key!r}")
        if blob is None:
            raise StorageError(f"{key!r} not found in {self.url}")
        sums = {
            "crc32c": _hex_from_b64(blob.crc32c),
            "md5": _hex_from_b64(blob.md5_hash),
            "sha256": (blob.metadata or {}).get(SHA256_METADATA),
        }
        return {name: value.lower() for name, value in sums.items() if value}

    def remote_sha256(self, key: str) -> str | None:
        """The object's sha256 (hex) from its metadata, or None when it was stored without."""
        return self.remote_checksums(key).get("sha256")

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return claim_by_readback(self, key, data)

    def abort_orphan_uploads(self, prefix: str = "") -> builtins.list[str]:
        return []

    def _get_blob(self, full_key: str, what: str) -> Any:
        """The blob with its metadata loaded, or None when missing (a missing bucket raises)."""
        try:
            blob = self.bucket.get_blob(full_key, retry=self.retry, timeout=TIMEOUT)
        except Exception as exc:
            raise self.translate(exc, what) from exc
        if blob is None:
            # get_blob answers None for a missing bucket too.
            if not self._bucket_exists():
                raise StorageError(
                    f"bucket '{self.bucket_name}' does not exist ({what}; create it or fix "
                    "GCS_BUCKET / the gs:// URL)"
                )
            return None
        self._bucket_seen = True
        return blob


class _GCSWriter:
    """Hashes what passes through to a BlobWriter; finalises or cancels the session."""

    def __init__(
        self, storage: GCSStorage, full_key: str, key: str, metadata: dict[str, str]
    ) -> None:
        self._gcs = storage
        self._key = full_key
        self._what = f"writing {key!r}"
        self._metadata = metadata
        # The whole-stream hash only when there is a declared value to check it against.
        self._digest = hashlib.sha256() if metadata.get(SHA256_METADATA) else None
        self.size = 0
        self._blob = storage.bucket.blob(full_key, chunk_size=storage.chunk_size)
        if metadata:
            self._blob.metadata = metadata
        # Nothing is sent until the first chunk fills, so opening cannot fail on the network.
        self._out: Any = self._blob.open(
            "wb",
            chunk_size=storage.chunk_size,
            checksum="crc32c",
            retry=storage.retry,
            timeout=TIMEOUT,
            content_type="application/octet-stream",
        )

    def write(self, data: bytes, /) -> int:
        if self._digest is not None:
            self._digest.update(data)
        self.size += len(data)
        try:
            self._out.write(data)
        except Exception as exc:
            raise self._gcs.translate(exc, self._what) from exc
        return len(data)

    def commit(self) -> None:
        from google.cloud.storage.exceptions import DataCorruption

        expected = self._metadata.get(SHA256_METADATA)
        actual = self._digest.hexdigest() if self._digest is not None else None
        if expected and actual != expected.lower():
            raise StorageError(
                f"the bytes written to '{self._key}' in {self._gcs.url} have sha256 {actual}, "
                f"not the expected {expected.lower()} (the source changed or is corrupt; "
                "nothing was stored)"
            )
        try:
            self._out.close()  # sends the last chunk and finalises the object
        except DataCorruption as exc:
            # Finalised, but the crc32c GCS computed is not ours: never leave it visible.
            self._delete_corrupt()
            raise StorageError(
                f"{self._what} to {self._gcs.url}: the stored crc32c does not match the bytes "
                "sent; the object was deleted (retry the upload)"
            ) from exc
        except Exception as exc:
            raise self._gcs.translate(exc, self._what) from exc

    def _delete_corrupt(self) -> None:
        try:
            self._blob.delete(retry=self._gcs.retry, timeout=TIMEOUT)
        except Exception as exc:
            log.error(
                "could not delete the corrupt upload '%s' in %s (%s): delete it by hand",
                self._key,
                self._gcs.url,
                type(exc).__name__,
            )

    def abort(self) -> None:
        """Cancel the resumable session; never ``close()``, which would finalise it."""
        out = self._out
        if out.closed:
            return
        session = getattr(out, "_upload_and_transport", None)
        try:
            if session is not None:
                upload, transport = session
                # Google cancels a session with a DELETE on the *session* URI (answer: 499),
                # https://cloud.google.com/storage/docs/performing-resumable-uploads ;
                # BlobWriter.terminate() sends it to the initiation URL, which cancels nothing.
                transport.delete(upload.resumable_url, timeout=TIMEOUT)
        except Exception as exc:
            # The session stays unfinalised (invisible) and GCS expires it after a week.
            log.warning(
                "could not cancel the upload session of '%s' in %s (%s); it expires unseen",
                self._key,
                self._gcs.url,
                type(exc).__name__,
            )
        finally:
            # With no session left, terminate() only closes the buffer: nothing is sent, and
            # a later close() (even from garbage collection) finds the writer closed.
            out._upload_and_transport = None
            out.terminate()


class _GCSReader(io.RawIOBase):
    """Ranged GETs of one object generation; each request is retried by the client library,
    so a body cut short is fetched again rather than returned short."""

    def __init__(self, storage: GCSStorage, blob: Any, what: str) -> None:
        super().__init__()
        self._gcs = storage
        # Pin the generation seen at open, so a concurrent overwrite cannot splice two objects.
        self._blob = storage.bucket.blob(blob.name, generation=blob.generation)
        self._size = int(blob.size or 0)
        self._offset = 0
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._offset >= self._size or not len(view):
            return 0
        end = min(self._size, self._offset + len(view)) - 1  # inclusive
        try:
            data = self._blob.download_as_bytes(
                start=self._offset,
                end=end,
                checksum=None,  # a range has no checksum of its own; the length is checked
                retry=self._gcs.retry,
                timeout=TIMEOUT,
            )
        except Exception as exc:
            raise self._gcs.translate(exc, self._what) from exc
        if len(data) != end - self._offset + 1:
            raise TransientStorageError(
                f"{self._what} from {self._gcs.url}: got {len(data)} bytes at offset "
                f"{self._offset}, expected {end - self._offset + 1} (retry later)"
            )
        view[: len(data)] = data
        self._offset += len(data)
        return len(data)
