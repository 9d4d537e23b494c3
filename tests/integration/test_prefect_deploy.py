"""`prefect deploy --all` with the project's prefect.yaml registers every deployment with its
schedules on a process work pool, under names that never collide with `serve`'s."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from deployments import prefect_yaml
from deployments.schedules import plan
from pgkeeper.settings import load_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def test_the_committed_prefect_yaml_is_the_rendered_default_plan() -> None:
    """prefect.yaml is generated from deployments/schedules.py: the committed copy matches
    the defaults, so serve and workers register the same schedules."""
    assert (ROOT / "prefect.yaml").read_text() == prefect_yaml.render(load_settings(_env_file=None))


def test_served_and_pool_deployment_names_never_collide() -> None:
    """Every served deployment has a `-pool` twin in prefect.yaml and no name is shared."""
    served = {s.name for s in plan(load_settings(_env_file=None))}
    import yaml

    pooled = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert pooled == {f"{name}-pool" for name in served}
    assert not served & pooled


def _cli(*args: str, api_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.timeout(240)
def test_prefect_deploy_all_registers_every_deployment_with_its_schedules(
    prefect_server: str,
) -> None:
    """Against a Prefect server, `prefect deploy --all --no-prompt` creates all fourteen pool
    deployments: crons, timezone, active flags, missed-run parameters, CANCEL_NEW limits."""
    pool = _cli("work-pool", "create", "pgkeeper", "--type", "process", api_url=prefect_server)
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stderr

    deployed = _cli("deploy", "--all", "--no-prompt", api_url=prefect_server)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    expected = {f"{s.flow}/{s.name}-pool": s for s in plan(load_settings(_env_file=None))}
    assert {"upload/upload-pool", "rotate/rotate-pool", "monitor/monitor-pool"} <= set(expected)
    assert len(expected) == 14
    with get_client(sync_client=True) as client:
        for full_name, spec in expected.items():
            deployment = client.read_deployment_by_name(full_name)
            assert deployment.work_pool_name == "pgkeeper"
            schedules = [
                (
                    s.schedule.cron,  # type: ignore[union-attr]
                    s.schedule.timezone,  # type: ignore[union-attr]
                    s.active,
                    s.parameters,
                )
                for s in deployment.schedules
            ]
            if spec.schedule is None:
                assert schedules == [], full_name
            else:
                sched = spec.schedule
                assert schedules == [
                    (sched.cron, sched.timezone, sched.active, sched.parameters)
                ], full_name
            if spec.cancel_new_when_busy:
                assert deployment.global_concurrency_limit is not None
                assert deployment.global_concurrency_limit.limit == 1
                assert deployment.concurrency_options is not None
                assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
            assert deployment.pull_steps == [
                {
                    "prefect.deployments.steps.set_working_directory": {
                        "directory": "{{ $PGKEEPER_HOME }}"
                    }
                }
            ]
    active = {n for n, s in expected.items() if s.schedule and s.schedule.active}
    assert active == {
        "backup/backup-daily-pool", "verify/verify-pool", "restore-test/restore-test-pool",
        "rotate/rotate-pool", "monitor/monitor-pool",
    }  # fmt: skip
