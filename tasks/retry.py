"""The retry policy every task shares: transient errors only, exponential backoff with jitter.

A task is retried only when the core raised a transient error (``pgkeeper.errors.is_transient``:
the server was unreachable, the storage answered 5xx or throttled); a wrong password, a
missing backup or a failed check fails at once, since retrying cannot fix it.
"""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from pgkeeper.errors import is_transient

RETRIES = 3
BACKOFF_SECONDS = 10.0  # 10 s, 20 s, 40 s ...
JITTER = 0.5  # each delay varies by up to +-50% so retrying runs do not stampede together


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure is a transient error."""
    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc)
    return False


# Keyword arguments for @task: retried on transient errors, never cached (every task has side
# effects: a dump, a manifest update, a restore), so a retry or a rerun always does the work.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_SECONDS),
    "retry_jitter_factor": JITTER,
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
}
