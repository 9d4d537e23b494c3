"""pgkeeper's Prefect notification block: every Apprise URL of BACKUP_NOTIFY_URLS in one block.

Prefect core has no block for plain SMTP (``mailto://``) nor for an arbitrary list of Apprise
URLs, so pgkeeper ships one. The Prefect *server* delivers automation notifications itself, so
it must be able to import this class: pgkeeper registers this module as a Prefect collection
(the ``prefect.collections`` entry point in pyproject.toml), which every Prefect process of
the environment pgkeeper is installed in loads; the server registers the block type at start.
A Prefect server running elsewhere (another venv, a container, Prefect Cloud) does not know
it: ``pgkeeper alerts install`` then says so, and alerts go out from pgkeeper's own processes.

Keep this module small: every Prefect process of the environment imports it.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.notifications import AbstractAppriseNotificationBlock
from pydantic import Field, SecretStr

BLOCK_TYPE_SLUG = "pgkeeper-notification"


class PgkeeperNotification(AbstractAppriseNotificationBlock):
    """Send a notification to every Apprise URL of BACKUP_NOTIFY_URLS (e-mail over SMTP,
    Slack, Teams, Discord, ntfy, PagerDuty, Opsgenie, JSON webhooks...)."""

    _block_type_name = "pgkeeper notification"
    _block_type_slug = BLOCK_TYPE_SLUG
    _description = "Every Apprise URL of pgkeeper's BACKUP_NOTIFY_URLS, comma separated."
    _documentation_url = "https://github.com/caronc/apprise/wiki"  # type: ignore[assignment]

    urls: SecretStr = Field(
        default=...,
        title="Apprise URLs",
        description="Comma-separated Apprise URLs, e.g. mailtos://user:pass@smtp.example.com",
    )

    def block_initialization(self) -> None:
        from pgkeeper.notify import load_apprise

        apprise = load_apprise()
        Apprise, AppriseAsset = apprise.Apprise, apprise.AppriseAsset
        asset = AppriseAsset(app_id="pgkeeper", app_desc="pgkeeper backups", app_url="")
        self._apprise_client = Apprise(asset=asset)
        for url in self.urls.get_secret_value().split(","):
            if url.strip():
                self._apprise_client.add(url.strip())

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
