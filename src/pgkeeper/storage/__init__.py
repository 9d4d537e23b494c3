"""Storage targets behind one protocol; ``open_storage`` builds a backend from a URL.

``file:///path`` or a plain path -> LocalStorage; ``s3://bucket/prefix`` -> S3Storage;
``gs://bucket/prefix`` -> GCSStorage. Cloud SDKs are imported only when such a URL is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pgkeeper.errors import ConfigError
from pgkeeper.storage.base import ObjectInfo, ReadOnlyStorage, Storage
from pgkeeper.storage.local import LocalStorage

if TYPE_CHECKING:
    from pgkeeper.settings import Settings

__all__ = ["LocalStorage", "ObjectInfo", "ReadOnlyStorage", "Storage", "open_storage", "targets"]


def open_storage(url: str, settings: Settings | None = None) -> Storage:
    """Build the backend for a storage URL; raise ConfigError for an unknown scheme."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise ConfigError(
                f"storage URL {url!r} names the host {parsed.netloc!r}: file:// URLs are folders "
                f"on this machine (use file://{parsed.path or '/path'} or mount the share)"
            )
        path = parsed.path if parsed.scheme == "file" else url
        if not path:
            raise ConfigError(f"storage URL {url!r} has no path (use file:///var/backups)")
        return LocalStorage(path)
    if parsed.scheme == "s3":
        from pgkeeper.storage.s3 import S3Storage  # lazy: boto3 only for S3 users

        return S3Storage.from_url(url, settings)
    if parsed.scheme in ("gs", "gcs"):
        from pgkeeper.storage.gcs import GCSStorage  # lazy: google-cloud-storage only for GCS

        return GCSStorage.from_url(url, settings)
    raise ConfigError(
        f"storage URL {url!r} has an unknown scheme (use a path, file://, s3:// or gs://)"
    )


def target_urls(settings: Settings) -> list[str]:
    """Every configured target URL, primary first: BACKUP_DIR, BACKUP_TARGETS, then the seed's
    AWS_S3_BUCKET and GCS_BUCKET when they are not already listed."""
    urls: list[str] = [str(settings.backup_dir)]
    urls.extend(settings.backup_targets)
    if settings.aws_s3_bucket:
        prefix = settings.backup_s3_prefix.strip("/")
        s3 = f"s3://{settings.aws_s3_bucket}" + (f"/{prefix}" if prefix else "")
        if not any(u.rstrip("/") == s3 for u in urls):
            urls.append(s3)
    if settings.gcs_bucket:
        prefix = settings.backup_gcs_prefix.strip("/")
        gs = f"gs://{settings.gcs_bucket}" + (f"/{prefix}" if prefix else "")
        if not any(u.rstrip("/") == gs for u in urls):
            urls.append(gs)
    return urls


def targets(settings: Settings) -> list[Storage]:
    """Every configured target, opened; the first is the primary."""
    return [open_storage(url, settings) for url in target_urls(settings)]
