"""Regenerate the small real pg_dump outputs the import detection tests read.

Run from the project root: ``.venv/bin/python -m tests.unit.data.generate``. It starts a
throwaway cluster (``tests.servers.postgres.PgCluster``), dumps a two-table database in the
custom, plain, tar and directory formats (the directory dump is stored as a tar, the way
``pgkeeper import`` takes it) and stops the cluster. Compressed variants are made by the tests.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.servers.postgres import PgCluster

HERE = Path(__file__).resolve().parent
SCHEMA = """
CREATE TABLE item (id int PRIMARY KEY, label text);
INSERT INTO item SELECT g, 'item ' || g FROM generate_series(1, 20) g;
CREATE TABLE note (body text);
INSERT INTO note VALUES (E'line\\nbreak'), ('\\.');
"""


def main() -> None:
    with PgCluster() as cluster:
        cluster.create_database("sample")
        cluster.execute(SCHEMA, dbname="sample")
        env = {"PATH": "/usr/bin:/bin", **cluster.libpq_env("sample")}
        pg_dump = str(cluster.bindir / "pg_dump")

        def dump(*args: str) -> bytes:
            return subprocess.run(
                [pg_dump, "--no-password", "--no-owner", *args],
                env=env, check=True, capture_output=True,
            ).stdout  # fmt: skip

        (HERE / "sample.custom.dump").write_bytes(dump("-Fc", "-Z0"))
        (HERE / "sample.plain.sql").write_bytes(dump("-Fp"))
        (HERE / "sample.tar").write_bytes(dump("-Ft"))
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "sample.dir"
            dump("-Fd", "-Z0", "-f", str(folder))
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                archive.add(folder, arcname="sample.dir")
            (HERE / "sample.dir.tar").write_bytes(buffer.getvalue())


if __name__ == "__main__":
    main()
