"""Prometheus metrics built from the catalog: ``GET /metrics`` and ``pgkeeper metrics``.

Every value comes from the manifests and a listing of each target, read when the metrics are
asked for (a scrape every 15-60 s lists the targets; the manifests are small). Per database
(labels ``database`` and ``server``, as manifests record them: never credentials):

    pgkeeper_last_backup_timestamp_seconds           end of the newest complete backup
    pgkeeper_last_verified_backup_timestamp_seconds  end of the newest verified backup
    pgkeeper_last_backup_size_bytes                  its stored size
    pgkeeper_last_backup_duration_seconds            how long it took
    pgkeeper_last_restore_test_timestamp_seconds     the newest restore test of any backup
    pgkeeper_last_restore_test_success               1 when it passed, else 0
    pgkeeper_restore_test_rto_seconds                its restore duration (the measured RTO)
    pgkeeper_backups                                 complete backups on any target

Per storage target (label ``target``, its URL): ``pgkeeper_storage_used_bytes`` and
``pgkeeper_storage_up`` (0 when it could not be listed). ``docs/monitoring/`` has alert rules
and a Grafana dashboard built on these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest, write_to_textfile

from pgkeeper.manifest import Manifest
from pgkeeper.monitor import holdings
from pgkeeper.redaction import redact
from pgkeeper.retention import aware
from pgkeeper.rotate import usage_report
from pgkeeper.storage.base import Storage

__all__ = ["CONTENT_TYPE", "TEXTFILE_NAME", "build_registry", "render", "write_textfile"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXTFILE_NAME = "pgkeeper.prom"  # node_exporter reads *.prom from its textfile directory
DB_LABELS = ("database", "server")


def _seconds(manifest: Manifest) -> float:
    return aware(manifest.finished_at).timestamp()


def build_registry(storages: Sequence[Storage], secrets: tuple[str, ...] = ()) -> CollectorRegistry:
    """A registry holding every metric above, read from ``storages`` now."""
    registry = CollectorRegistry(auto_describe=True)

    def gauge(name: str, doc: str, labels: Sequence[str] = DB_LABELS) -> Gauge:
        return Gauge(name, doc, list(labels), registry=registry)

    last = gauge("pgkeeper_last_backup_timestamp_seconds", "End of the newest complete backup.")
    verified = gauge(
        "pgkeeper_last_verified_backup_timestamp_seconds", "End of the newest verified backup."
    )
    size = gauge("pgkeeper_last_backup_size_bytes", "Stored size of the newest backup.")
    duration = gauge("pgkeeper_last_backup_duration_seconds", "Duration of the newest backup.")
    tested = gauge(
        "pgkeeper_last_restore_test_timestamp_seconds", "Time of the newest restore test."
    )
    success = gauge("pgkeeper_last_restore_test_success", "1 when the newest restore test passed.")
    rto = gauge("pgkeeper_restore_test_rto_seconds", "Restore duration of the newest restore test.")
    count = gauge("pgkeeper_backups", "Complete backups on any target.")
    used = gauge("pgkeeper_storage_used_bytes", "Bytes stored on the target.", ["target"])
    up = gauge("pgkeeper_storage_up", "1 when the target could be listed.", ["target"])

    held = holdings(storages)
    groups: dict[tuple[str, str], list[Manifest]] = {}
    for manifest in held.backups:  # newest first
        groups.setdefault((manifest.database, manifest.server), []).append(manifest)
    for (database, server), backups in groups.items():
        labels = (redact(database, secrets), redact(server, secrets))
        newest = backups[0]
        last.labels(*labels).set(_seconds(newest))
        size.labels(*labels).set(newest.size)
        duration.labels(*labels).set((newest.finished_at - newest.started_at).total_seconds())
        count.labels(*labels).set(len(backups))
        good = [m for m in backups if m.verified]
        if good:
            verified.labels(*labels).set(_seconds(good[0]))
        tests = [(m, t) for m in backups for t in m.restore_tests]
        if tests:
            _, test = max(tests, key=lambda pair: aware(pair[1].at))
            tested.labels(*labels).set(aware(test.at).timestamp())
            success.labels(*labels).set(1 if test.ok else 0)
            rto.labels(*labels).set(test.duration_seconds)
    for url in held.errors:
        up.labels(redact(url, secrets)).set(0)
    for target in usage_report(storages).targets:
        used.labels(redact(target.url, secrets)).set(target.bytes)
        up.labels(redact(target.url, secrets)).set(1)
    return registry


def render(storages: Sequence[Storage], secrets: tuple[str, ...] = ()) -> bytes:
    """The metrics in Prometheus' text format."""
    return generate_latest(build_registry(storages, secrets))


def write_textfile(
    storages: Sequence[Storage], directory: Path, secrets: tuple[str, ...] = ()
) -> Path:
    """Write ``pgkeeper.prom`` into node_exporter's textfile directory, atomically (a temp
    file renamed over it, so the collector never reads half a file); returns its path."""
    path = directory / TEXTFILE_NAME
    write_to_textfile(str(path), build_registry(storages, secrets))
    return path
