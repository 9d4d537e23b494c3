"""An S3-compatible server for integration tests: moto in server mode, as a subprocess.

`S3Server().start()` runs `python -m moto.server -H 127.0.0.1 -p PORT` from the test
interpreter's environment (exiting by itself if the test process dies) and waits until it
answers. Everything lives in that process's
memory; `reset()` (`POST /moto-api/reset`) forgets all buckets at once.

Known moto limits (see FIELD-NOTES): it stores but does not verify checksums, reports fake
upload dates, and a killed uploader leaves an orphan multipart upload (as real S3 does).
"""

from __future__ import annotations

import contextlib
import threading
import urllib.error
import urllib.request
from typing import Any

from . import guarded_module_argv
from .process import ServerProcess

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


class S3Server(ServerProcess):
    """moto_server on 127.0.0.1; credentials "testing"/"testing", region us-east-1."""

    name = "moto"
    ready_path = "/moto-api/"
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None  # boto3.session.Session, imported lazily
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return self.base_url

    def argv(self, port: int) -> list[str]:
        return guarded_module_argv("moto.server", "-H", self.host, "-p", str(port))

    def reset(self) -> None:
        """Forget every bucket and object (moto's `POST /moto-api/reset`)."""
        url = f"{self.endpoint_url}/moto-api/reset"
        req = urllib.request.Request(url, method="POST")  # noqa: S310 - our own http URL
        with urllib.request.urlopen(req, timeout=10):  # noqa: S310 - our own http URL
            pass

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this server (or for `endpoint_url`, e.g. a FaultProxy).

        Keyword arguments go to `botocore.config.Config`; retries default to
        `{"total_max_attempts": 5, "mode": "standard"}` so tests do not depend on the
        installed botocore's default retry mode.
        """
        import boto3
        from botocore.config import Config

        config.setdefault("retries", {"total_max_attempts": 5, "mode": "standard"})
        with self._lock:  # one session: its model cache makes new clients ~10x cheaper
            if self._session is None:
                self._session = boto3.session.Session()
            return self._session.client(
                "s3",
                endpoint_url=endpoint_url or self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=Config(**config),
            )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` and return the name."""
        self.client().create_bucket(Bucket=name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Abort multipart uploads, delete every object version, then the bucket itself."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.NoSuchBucket):
            for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
                for up in page.get("Uploads", []):
                    s3.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
            for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
                for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
                    s3.delete_object(
                        Bucket=name,
                        Key=item["Key"],
                        VersionId=item["VersionId"],
                        BypassGovernanceRetention=True,
                    )
            s3.delete_bucket(Bucket=name)

    def env(self, bucket: str | None = None) -> dict[str, str]:
        """Environment a pgkeeper process needs to reach this server (AWS_* and endpoint)."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "BACKUP_S3_ENDPOINT_URL": self.endpoint_url,
        }
        if bucket is not None:
            env["AWS_S3_BUCKET"] = bucket
        return env
