"""Pgkeeper's deployments on a test Prefect server: cleared before and after a test, or
registered from the default environment as `pgkeeper serve` registers them (with its record
of the environment's schedules)."""

from __future__ import annotations

from pgkeeper.prefect_api import PGKEEPER_FLOWS, PrefectLink
from pgkeeper.schedule import RECORD_VARIABLE, write_record
from pgkeeper.settings import Settings


def clear_pgkeeper(link: PrefectLink) -> None:
    """No pgkeeper deployment and no schedule record on the (session-wide) server."""
    for flow in PGKEEPER_FLOWS:
        for deployment in link.deployments_of(flow):
            link.request("DELETE", f"/deployments/{deployment['id']}")
    link.request("DELETE", f"/variables/name/{RECORD_VARIABLE}")


def register_all(link: PrefectLink, settings: Settings) -> None:
    """Every served deployment on ``link``'s server, and serve's record, as serve leaves them."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.schedule_edits import environment
    from deployments.serve import build_deployments

    with temporary_settings({PREFECT_API_URL: link.api_url}):
        for deployment in build_deployments(settings):
            deployment.apply()
    write_record(link, environment(settings))
