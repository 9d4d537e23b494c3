"""A GCS emulator for integration tests: `gcp-storage-emulator` (PyPI) as a subprocess.

`GcsServer().start()` runs `python -m gcp_storage_emulator start --in-memory` on a free port
of 127.0.0.1. Point google-cloud-storage at it with `client()` (anonymous credentials,
`api_endpoint`), or give a child process `STORAGE_EMULATOR_HOST=<endpoint>`.

What this emulator does NOT check (verified against gcp-storage-emulator 2026.7.19 with
google-cloud-storage 3.17), so tests of those behaviours pass here for the wrong reason:
- page size: `list_blobs(page_size=2)` returns every object in one page; pagination code is
  never exercised past the first page.
- generation preconditions: `if_generation_match=0` on an existing object, a wrong
  `if_generation_match` on upload, and a wrong one on delete are all accepted (no 412).
  "create only if absent" and optimistic-concurrency logic cannot be tested here.
- It is a single-threaded HTTP/1.0 server: one request at a time, a new connection per
  request, so parallel uploads are serialised and keep-alive is never used.
What it does check: a wrong MD5 on a simple upload is rejected (400); missing objects and
buckets give 404; `blob.open("wb", chunk_size=...)` resumable streaming uploads, ranged reads
and `blob.open("rb")` work.
"""

from __future__ import annotations

import contextlib
import urllib.request
from typing import Any

from . import guarded_module_argv
from .process import ServerProcess

PROJECT = "pgkeeper-test"


class GcsServer(ServerProcess):
    """gcp-storage-emulator on 127.0.0.1, data in memory."""

    name = "gcs"
    project = PROJECT

    @property
    def endpoint(self) -> str:
        """`http://127.0.0.1:PORT`: the value for STORAGE_EMULATOR_HOST or api_endpoint."""
        return self.base_url

    def argv(self, port: int) -> list[str]:
        return guarded_module_argv(
            "gcp_storage_emulator", "start",
            "--host", self.host, "--port", str(port), "--in-memory", "--quiet",
        )  # fmt: skip

    def reset(self) -> None:
        """Forget every bucket and object (the emulator's `GET /wipe`)."""
        with urllib.request.urlopen(f"{self.endpoint}/wipe", timeout=10):  # noqa: S310
            pass

    def client(self, endpoint: str | None = None) -> Any:
        """A `google.cloud.storage.Client` with anonymous credentials against the emulator
        (or against `endpoint`, e.g. a FaultProxy in front of it)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": endpoint or self.endpoint},
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` and return the name."""
        self.client().create_bucket(name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Delete every object in the bucket, then the bucket; a missing bucket is fine."""
        from google.api_core.exceptions import NotFound

        client = self.client()
        with contextlib.suppress(NotFound):
            for blob in list(client.list_blobs(name)):
                with contextlib.suppress(NotFound):
                    blob.delete()
            client.bucket(name).delete()

    def env(self, bucket: str | None = None) -> dict[str, str]:
        """Environment a pgkeeper process needs to reach this emulator."""
        env = {"STORAGE_EMULATOR_HOST": self.endpoint}
        if bucket is not None:
            env["GCS_BUCKET"] = bucket
        return env
