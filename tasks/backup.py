"""Task: make one backup of the database onto the primary target (``pgkeeper.backup``)."""

from __future__ import annotations

from prefect import get_run_logger, runtime, task

from pgkeeper.backup import BackupOptions, run_backup
from pgkeeper.manifest import Manifest
from pgkeeper.settings import load_settings
from pgkeeper.storage import targets
from tasks.progress import ProgressArtifact, expected_dump_size, human_size
from tasks.retry import TRANSIENT_RETRIES


@task(name="backup", **TRANSIENT_RETRIES)
def backup_database(
    name: str | None, format: str | None, compression: str | None, trigger: str
) -> Manifest:
    """Dump the database to the primary target, streamed and under the backup lock."""
    settings = load_settings()
    storages = targets(settings)
    total = expected_dump_size(storages, settings.require_database_url())
    options = BackupOptions(
        name=name, format=format, compression=compression, trigger=trigger,
        flow_run_id=runtime.flow_run.id,
    )  # fmt: skip
    with ProgressArtifact("backup-progress", "dumped", total) as progress:
        manifest = run_backup(settings, options, storage=storages[0], progress=progress)
        raw = f"{human_size(manifest.raw_size)} dumped, " if manifest.raw_size else ""
        progress.finish(f"{manifest.id}: {raw}{human_size(manifest.size)} stored, done")
    get_run_logger().info(
        "backup %s of %s: %d bytes in %s", manifest.id, manifest.database, manifest.size,
        storages[0].url,
    )  # fmt: skip
    return manifest
