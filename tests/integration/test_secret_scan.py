"""Safety invariant 6 with encryption on (issue 14): no planted secret in anything pgkeeper writes.

One database password, API token, alert-channel token, heartbeat URL token and age private key
are planted in the settings; then every door runs the whole cycle (backup, verify with the
identity, restore, restore-test, rekey, list, show, errors) and everything pgkeeper wrote is
scanned: every file on the target (manifests, pending and alert state, the data), the CLI's
output with --debug logs, the Prefect flow runs' parameters, logs and artifacts, and the HTTP
API's answers. None may hold any planted secret.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from pgkeeper.api import PrefectLink, create_app
from tests.servers.postgres import PgCluster
from tests.support.api import TestClient, settings_for
from tests.support.cli import cli_env, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]

API_TOKEN = f"api-token-{uuid.uuid4().hex}"
NOTIFY_TOKEN = f"notifytoken{uuid.uuid4().hex}"
HEARTBEAT_TOKEN = uuid.uuid4().hex


def _age_key(folder: Path) -> tuple[Path, str, str]:
    """(identity file, public key, the secret key line), made by age-keygen."""
    identity = folder / "key.txt"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    public = subprocess.run(["age-keygen", "-y", str(identity)], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    secret = next(
        line for line in identity.read_text().splitlines() if line.startswith("AGE-SECRET-KEY")
    )
    return identity, public, secret


def _scan(where: str, text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"a planted secret ({secret[:6]}...) is in {where}"


def test_no_planted_secret_in_anything_pgkeeper_writes(
    sample_db: str,
    pg_cluster: PgCluster,
    prefect_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """See the module docstring."""
    identity, public, secret_key = _age_key(tmp_path)
    backups = tmp_path / "backups"
    secrets = [pg_cluster.password, API_TOKEN, NOTIFY_TOKEN, HEARTBEAT_TOKEN, secret_key]
    settings_env = {
        "BACKUP_ENCRYPTION_RECIPIENTS": public,
        "BACKUP_ENCRYPTION_IDENTITY_FILE": str(identity),
        "BACKUP_API_TOKEN": API_TOKEN,
        "BACKUP_NOTIFY_URLS": f"json://127.0.0.1:9/hooks/{NOTIFY_TOKEN}",
        "BACKUP_HEARTBEAT_URL": f"http://127.0.0.1:9/ping/{HEARTBEAT_TOKEN}",
        "BACKUP_RESTORE_TEST_ON_SOURCE": "true",
    }
    written: list[tuple[str, str]] = []

    # 1. The CLI, with debug logs.
    env = cli_env(sample_db, backups, **settings_env)
    made = run_cli("--debug", "backup", "--json", env=env, cwd=tmp_path, timeout=300)
    assert made.returncode == 0, made.stderr
    backup_id = json.loads(made.stdout)["id"]
    target = f"scan_{uuid.uuid4().hex[:6]}"
    commands = [
        ["verify", backup_id],
        ["list", "--json"],
        ["show", backup_id, "--json"],
        ["restore", backup_id, "--target-url", pg_cluster.url(target, password="")],
        ["restore-test", backup_id],
        ["download", backup_id, "--decompress", "-o", str(tmp_path / "plain.dump")],
        ["rekey", backup_id, "--json"],
        ["restore", "auto_backup_2020-01-01T00-00-00Z"],  # an error
    ]
    env_target = {**env, "PGPASSWORD": pg_cluster.password}
    for args in commands:
        proc = run_cli("--debug", *args, env=env_target, cwd=tmp_path, timeout=300)
        failing = args is commands[-1]  # --debug shows its traceback: exit 1
        assert proc.returncode == (1 if failing else 0), (args, proc.stderr[-2000:])
        written.append((f"pgkeeper {args[0]}", proc.stdout + proc.stderr))
    written.append(("pgkeeper backup", made.stdout + made.stderr))
    pg_cluster.drop_database(target)

    # 2. The Prefect flows: parameters, logs and artifacts.
    for name, value in {**settings_env, "DATABASE_URL": sample_db,
                        "BACKUP_DIR": str(backups)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.client.schemas.filters import LogFilterFlowRunId as LogRun

    from flows.backup import backup
    from flows.restore import restore
    from flows.restore_test import restore_test
    from tests.support.flows import artifacts

    states = [
        backup(return_state=True),
        restore_test(return_state=True),
        restore(target=f"scan_flow_{uuid.uuid4().hex[:6]}", return_state=True),
    ]
    with get_client(sync_client=True) as client:
        for state in states:
            run_id = state.state_details.flow_run_id
            run = client.read_flow_run(run_id)
            written.append((f"flow {run.name} parameters", json.dumps(run.parameters)))
            written.append((f"flow {run.name} state", str(state.message)))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogRun(any_=[run_id])))
            written.append((f"flow {run.name} logs", "\n".join(log.message for log in logs)))
            for key, artifact in artifacts(state).items():
                written.append((f"artifact {key}", f"{artifact.description} {artifact.data}"))
    for state in states:
        assert state.is_completed(), state.message
    restored_name = states[2].result().database
    pg_cluster.drop_database(restored_name)

    # 3. The HTTP API's answers.
    settings = settings_for(
        sample_db, backups, backup_api_token=API_TOKEN, backup_api_read_token=None,
        backup_encryption_recipients=public, backup_encryption_identity_file=identity,
        backup_notify_urls=settings_env["BACKUP_NOTIFY_URLS"],
        backup_heartbeat_url=settings_env["BACKUP_HEARTBEAT_URL"],
    )  # fmt: skip
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    app = create_app(settings, prefect=PrefectLink(api_url=None, ui_url=None))
    with TestClient(app, base_url="http://127.0.0.1:8080") as api:
        created = api.post("/api/backups", json={}, headers=auth)
        answers: list[Any] = [created]
        made_id = created.json()["backup"]["id"]
        answers += [
            api.get("/api/backups", headers=auth),
            api.get(f"/api/backups/{made_id}", headers=auth),
            api.post("/api/backups/restore", json={"backupId": made_id}, headers=auth),
            api.post(  # a 409: the error text
                "/api/backups/restore",
                json={"backupId": made_id, "target": sample_db.rsplit("/", 1)[1]},
                headers=auth,
            ),
            api.get("/api/backups", headers={"Authorization": "Bearer wrong"}),
        ]
        for answer in answers:
            written.append((f"API {answer.request.method} {answer.request.url.path}",
                            answer.text + json.dumps(dict(answer.headers))))  # fmt: skip
        restored = answers[3].json()["restore"]["database"]
        pg_cluster.drop_database(restored)

    # 4. Everything on the target.
    for path in sorted(p for p in backups.rglob("*") if p.is_file()):
        written.append((str(path.relative_to(backups)), path.read_bytes().decode("latin-1")))
    for where, text in written:
        _scan(where, text, secrets)
    # The scan can fail: the identity file itself (which pgkeeper never writes) would.
    with pytest.raises(AssertionError, match="planted secret"):
        _scan("the identity file", identity.read_text(), secrets)
    assert len(written) > 30  # the scan saw every door's output, not nothing
