"""Reading what a flow run left in the Prefect server: its task runs and its artifacts."""

from __future__ import annotations

import json
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import TaskRun
from prefect.states import State


def task_runs(state: State) -> dict[str, TaskRun]:
    """The run's task runs by task name (without Prefect's ``-<n>`` suffix)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    return {r.name.rsplit("-", 1)[0]: r for r in runs}


def artifacts(state: State) -> dict[str, Any]:
    """The run's artifacts by key."""
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return {a.key: a for a in found if a.key}


def artifact_data(state: State) -> dict[str, Any]:
    """The run's artifacts' data by key; table data decoded to a list of rows."""
    data = {key: a.data for key, a in artifacts(state).items()}
    return {k: json.loads(v) if isinstance(v, str) and v[:1] == "[" else v for k, v in data.items()}
