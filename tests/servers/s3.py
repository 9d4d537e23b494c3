"""An S3-compatible server for integration tests: moto in server mode, as a subprocess.

`S3Server().start()` runs `python -m moto.server -H 127.0.0.1 -p PORT` from the test
interpreter's environment (exiting by itself if the test process dies) and waits until it
answers. Everything lives in that process's
memory; `reset()` (`POST /moto-api/reset`) forgets all buckets at once.

Known moto limits (see FIELD-NOTES): it stores but does not verify checksums, reports fake
upload dates, and a killed uploader leaves an orphan multipart upload (as real S3 does).
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import free_port, guarded_module_argv

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Poll `url` until it answers any HTTP status; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - our own http URL
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"server at {url} not ready after {timeout}s:\n{_tail(log)}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """Terminate `proc`, killing it if it does not exit within 5 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class S3Server:
    """moto_server on 127.0.0.1; credentials "testing"/"testing", region us-east-1."""

    host = "127.0.0.1"
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY
    region = REGION

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None
        self._session: Any = None  # boto3.session.Session, imported lazily
        self._lock = threading.Lock()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        """Start moto and wait until it answers; returns self."""
        if self._proc is not None:
            return self
        atexit.register(self.stop)
        self._log_dir = Path(tempfile.mkdtemp(prefix="pgkeeper-moto-"))
        log = self._log_dir / "moto.log"
        last_error: RuntimeError | None = None
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port(self.host)
            with log.open("ab") as out:
                self._proc = subprocess.Popen(
                    guarded_module_argv("moto.server", "-H", self.host, "-p", str(self.port)),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_http(f"{self.endpoint_url}/moto-api/", self._proc, log)
                return self
            except RuntimeError as exc:
                last_error = exc
                stop_process(self._proc)
                self._proc = None
        self.stop()
        raise RuntimeError(f"moto server did not start: {last_error}")

    def stop(self) -> None:
        """Stop the server and drop its log folder. Idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
