"""The tests' PostgreSQL: the product's throwaway cluster (`pgkeeper.sandbox`, which the demo
uses too) with one fixed superuser password, so tests can look for it in outputs."""

from __future__ import annotations

from typing import Any

from pgkeeper import sandbox
from pgkeeper.sandbox import pg_bindir, stop_data_dir, sweep_stale_clusters

DEFAULT_PASSWORD = "pgk-secret-pw"


class PgCluster(sandbox.PgCluster):
    """`pgkeeper.sandbox.PgCluster` whose password defaults to DEFAULT_PASSWORD."""

    def __init__(self, password: str = DEFAULT_PASSWORD, **kwargs: Any) -> None:
        super().__init__(password=password, **kwargs)


__all__ = ["DEFAULT_PASSWORD", "PgCluster", "pg_bindir", "stop_data_dir", "sweep_stale_clusters"]
