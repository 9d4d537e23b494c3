"""Session-wide test setup: a clean environment and the real servers integration tests use.

At import (before any test module imports Prefect, boto3 or google-cloud-storage):
- variables from the developer's shell that would change what the code under test talks to
  are removed: pgkeeper's own (`DATABASE_URL`, `STAGING_DATABASE_URL`, `BACKUP_*`, `AWS_*`,
  `GCS_*`), libpq's `PG*`, Google's credential/emulator variables and every `PREFECT_*`;
- Prefect gets a temporary `PREFECT_HOME`, telemetry off, no API logging outside flows;
- boto3 and google-auth are fenced off from the developer's credential files and from
  cloud metadata servers (slow timeouts when a test builds a client without credentials).

Fixtures (servers start on first use, once per session, and stop at session end):
- `pg_cluster` -> `tests.servers.postgres.PgCluster`
- `s3_server` -> `tests.servers.s3.S3Server`; `s3_bucket` -> a fresh bucket name per test
- `gcs_server` -> `tests.servers.gcs.GcsServer`; `gcs_bucket` -> a fresh bucket name per test
- `smtp_server` / `webhook_receiver` -> `tests.servers.receivers` (alert deliveries land
  there); `inboxes` empties both before a test
Per-suite fixtures belong in `tests/unit/conftest.py` / `tests/integration/conftest.py`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # `tests.servers` is importable however pytest was started
    sys.path.insert(0, str(_ROOT))

from tests.servers.gcs import GcsServer  # noqa: E402 - needs the sys.path line above
from tests.servers.postgres import PgCluster  # noqa: E402
from tests.servers.receivers import SmtpServer, WebhookReceiver  # noqa: E402
from tests.servers.s3 import S3Server  # noqa: E402

_LEAKY_NAMES = {
    "DATABASE_URL",
    "STAGING_DATABASE_URL",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "CLOUDSDK_CONFIG",
}
_LEAKY_PREFIXES = ("BACKUP_", "AWS_", "GCS_", "PG", "PREFECT_", "PGKEEPER_")
_KEPT = {"PG_BIN_DIR"}  # where the PostgreSQL binaries are: a machine fact, not a target


def _isolate_environment() -> None:
    for name in list(os.environ):
        if name not in _KEPT and (name in _LEAKY_NAMES or name.startswith(_LEAKY_PREFIXES)):
            del os.environ[name]
    scratch = Path(tempfile.mkdtemp(prefix="pgkeeper-tests-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.environ.update(
        {
            "PREFECT_HOME": str(scratch / "prefect"),
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            # Credential files that do not exist, and no metadata-server probing.
            "AWS_CONFIG_FILE": str(scratch / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "CLOUDSDK_CONFIG": str(scratch / "gcloud"),
            "NO_GCE_CHECK": "true",
        }
    )


_isolate_environment()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL 15 cluster for the whole session (superuser `postgres`, TCP password)."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the whole session."""
    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsServer]:
    """A gcp-storage-emulator for the whole session."""
    with GcsServer() as server:
        yield server


def _bucket_name() -> str:
    return f"pgk-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """The name of a new, empty S3 bucket, removed with its contents after the test."""
    name = s3_server.make_bucket(_bucket_name())
    yield name
    s3_server.remove_bucket(name)


@pytest.fixture
def gcs_bucket(gcs_server: GcsServer) -> Iterator[str]:
    """The name of a new, empty GCS bucket, removed with its contents after the test."""
    name = gcs_server.make_bucket(_bucket_name())
    yield name
    gcs_server.remove_bucket(name)


# =============================================================================================
# Shared fixtures used by both tests/unit and tests/integration may be appended below.
# Keep them small; suite-specific fixtures go in that suite's own conftest.py.
# =============================================================================================


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpServer]:
    """A real SMTP server (aiosmtpd) recording every mail, for the whole session."""
    with SmtpServer() as server:
        yield server


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """An HTTP server recording every webhook call (and heartbeat ping), for the session."""
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def inboxes(smtp_server: SmtpServer, webhook_receiver: WebhookReceiver) -> Iterator[None]:
    """Both receivers emptied before the test (and answering 200 again)."""
    smtp_server.clear()
    webhook_receiver.clear()
    webhook_receiver.status = 200
    yield
