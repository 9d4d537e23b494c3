"""Round-trip fidelity: a backup restored into a new database is the database it came from.

The source is `tests/fidelity/schema.sql` (a schema built to break dump/restore round trips),
loaded once per session into `fidelity_src`. `tests.fidelity.compare.snapshot` reads a database
object by object (rows and content hash of every table, sequences, large objects, definitions,
grants, comments). First the comparer itself is proven: a plain `pg_dump -Fc | pg_restore` copy
compares equal, and a copy with one changed row, sequence or large object does not. Then every
format x compression goes through the `pgkeeper` command (backup, verify, restore into a
new database) and the restored database is compared with the source.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fidelity import compare
from tests.servers.postgres import PgCluster

pytestmark = pytest.mark.integration

SOURCE_DB = "fidelity_src"
PG_DUMP_COPY_DB = "fidelity_pg_dump_copy"
FORMATS = ("custom", "plain", "directory")
COMPRESSIONS = ("zstd", "gzip", "none")
PGKEEPER = Path(sys.executable).with_name("pgkeeper")


def _client_env(cluster: PgCluster, dbname: str) -> dict[str, str]:
    return {**os.environ, **cluster.libpq_env(dbname)}


def _pg_dump_major(cluster: PgCluster) -> int:
    out = subprocess.run(
        [str(cluster.bindir / "pg_dump"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1].split(".")[0])


@pytest.fixture(scope="session")
def fidelity_source(pg_cluster: PgCluster) -> str:
    """URL of `fidelity_src`, holding `schema.sql` (loaded once per session)."""
    pg_cluster.drop_database(SOURCE_DB)
    pg_cluster.create_database(SOURCE_DB)
    url = pg_cluster.url(SOURCE_DB)
    compare.load_schema(url)
    return url


@pytest.fixture(scope="session")
def source_snapshot(fidelity_source: str) -> compare.Snapshot:
    return compare.snapshot(fidelity_source)


@pytest.fixture(scope="module")
def pg_dump_copy(
    pg_cluster: PgCluster, fidelity_source: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A copy of the source made by hand: `pg_dump -Fc` then `pg_restore` into a new database."""
    dump = tmp_path_factory.mktemp("pg_dump") / "source.dump"
    subprocess.run(
        [str(pg_cluster.bindir / "pg_dump"), "--no-password", "-Fc", "-f", str(dump)],
        env=_client_env(pg_cluster, SOURCE_DB), check=True, capture_output=True,
    )  # fmt: skip
    pg_cluster.drop_database(PG_DUMP_COPY_DB)
    pg_cluster.create_database(PG_DUMP_COPY_DB)
    subprocess.run(
        [str(pg_cluster.bindir / "pg_restore"), "--no-password", "--exit-on-error",
         "-d", PG_DUMP_COPY_DB, str(dump)],
        env=_client_env(pg_cluster, PG_DUMP_COPY_DB), check=True, capture_output=True,
    )  # fmt: skip
    yield pg_cluster.url(PG_DUMP_COPY_DB)
    pg_cluster.drop_database(PG_DUMP_COPY_DB)


@pytest.fixture
def scratch_copy(pg_cluster: PgCluster, pg_dump_copy: str) -> Iterator[str]:
    """A throwaway clone of the pg_dump copy (CREATE DATABASE ... TEMPLATE), free to change."""
    name = f"fidelity_scratch_{uuid.uuid4().hex[:8]}"
    pg_cluster.execute(f'CREATE DATABASE "{name}" TEMPLATE "{PG_DUMP_COPY_DB}"')
    yield pg_cluster.url(name)
    pg_cluster.drop_database(name)


# --- the comparer itself ------------------------------------------------------------------------


def test_source_snapshot_covers_the_hard_schema(source_snapshot: compare.Snapshot) -> None:
    """The snapshot sees every kind of object the schema creates, with their rows."""
    tables = source_snapshot["tables"]
    assert tables["fid.events"]["rows"] == 20000
    assert tables["fid.no_columns"]["rows"] == 3
    assert tables["fid.empty"]["rows"] == 0
    assert tables["fid.measurements"]["kind"] == "p"
    assert tables["fid.measurements_default"]["rows"] > 0
    assert tables["fid.cache"]["persistence"] == "u"
    assert tables["fid.never_populated"]["populated"] is False
    assert tables["fid.daily_events"]["rows"] > 0
    assert tables["fid.secrets"]["force_row_security"] is True
    assert '"Ünï Schema"."ünïcødé"' in tables
    assert 'public."Weird Table"' in tables
    seqs = source_snapshot["sequences"]
    assert seqs["fid.seq_not_called"]["is_called"] is False
    assert seqs["fid.seq_huge"]["last_value"] == 9223372036854775000
    assert seqs["fid.seq_negative"]["last_value"] == -999999
    assert {"424242", "424243", "424244"} <= source_snapshot["large_objects"].keys()
    assert source_snapshot["comments"]["large object 424242"] == "a multi-page large object"
    assert source_snapshot["triggers"]["fid.orders/orders_disabled"]["enabled"] == "D"
    assert len(source_snapshot["policies"]) == 3
    assert source_snapshot["event_triggers"]["fid_ddl_noop"]["enabled"] == "D"


def test_snapshot_is_deterministic(fidelity_source: str, source_snapshot: compare.Snapshot) -> None:
    """Two snapshots of an unchanged database are equal (no OIDs, no clocks, no ordering luck)."""
    compare.assert_same(source_snapshot, compare.snapshot(fidelity_source))


def test_pg_dump_copy_compares_equal(source_snapshot: compare.Snapshot, pg_dump_copy: str) -> None:
    """A copy made with plain `pg_dump -Fc | pg_restore` is the same as the source."""
    compare.assert_same(source_snapshot, compare.snapshot(pg_dump_copy))


# Each change is one a broken backup or restore could make; the comparer must name it.
CHANGES = {
    "row": (
        "UPDATE fid.events SET body = body || ' ' WHERE id = 12345",
        "tables: fid.events: hash",
    ),
    "negative zero": (
        "UPDATE fid.type_zoo SET c_float8 = 0 WHERE id = 2",
        "tables: fid.type_zoo: hash",
    ),
    "copy terminator": (
        "UPDATE fid.copy_edge SET v = '\\' WHERE v = '\\.'",
        "tables: fid.copy_edge: hash",
    ),
    "row of a table with no columns": (
        "DELETE FROM fid.no_columns WHERE ctid = '(0,1)'",
        "tables: fid.no_columns: rows: source 3 != copy 2",
    ),
    "row of a default partition": (
        "DELETE FROM fid.measurements_default"
        " WHERE id = (SELECT min(id) FROM fid.measurements_default)",
        "tables: fid.measurements_default: rows",
    ),
    "sequence value": (
        "SELECT nextval('fid.seq_huge')",
        "sequences: fid.seq_huge: last_value",
    ),
    "sequence is_called": (
        "SELECT setval('fid.seq_not_called', 42, true)",
        "sequences: fid.seq_not_called: is_called: source False != copy True",
    ),
    "large object byte": (
        "SELECT lo_put(424242, 100, '\\x00')",
        "large_objects: 424242: md5",
    ),
    "large object gone": (
        "SELECT lo_unlink(424243)",
        "large_objects: 424243: missing from the copy",
    ),
    "large object comment": (
        "COMMENT ON LARGE OBJECT 424242 IS 'changed'",
        "comments: large object 424242",
    ),
    "trigger state": (
        "ALTER TABLE fid.orders DISABLE TRIGGER orders_before",
        "triggers: fid.orders/orders_before: enabled",
    ),
    "forced row-level security": (
        "ALTER TABLE fid.secrets NO FORCE ROW LEVEL SECURITY",
        "tables: fid.secrets: force_row_security",
    ),
    "unlogged table": (
        "ALTER TABLE fid.cache SET LOGGED",
        "tables: fid.cache: persistence",
    ),
    "materialized view populated": (
        "REFRESH MATERIALIZED VIEW fid.never_populated",
        "tables: fid.never_populated: populated",
    ),
    "function body": (
        "CREATE OR REPLACE FUNCTION fid.full_name(first text, last text) RETURNS text"
        " LANGUAGE sql IMMUTABLE STRICT AS $$ SELECT $1 || ' ' || $2 $$",
        "functions: fid.full_name(text,text): definition",
    ),
    "grant": (
        "REVOKE SELECT ON fid.secrets FROM pgk_fid_reader",
        "tables: fid.secrets: acl",
    ),
    "generated expression": (
        "ALTER TABLE fid.orders ALTER COLUMN label DROP EXPRESSION",
        "columns: fid.orders.label: ",
    ),
}


@pytest.mark.parametrize("change", CHANGES.keys())
def test_comparer_detects_change(
    change: str, source_snapshot: compare.Snapshot, scratch_copy: str
) -> None:
    """A copy with one change differs from the source, and the diff names what changed."""
    statement, expected = CHANGES[change]
    with psycopg.connect(scratch_copy, autocommit=True) as conn:
        conn.execute(statement.encode())
    lines = compare.diff(source_snapshot, compare.snapshot(scratch_copy))
    assert any(line.startswith(expected) for line in lines), lines
    with pytest.raises(AssertionError, match="differs from the source"):
        compare.assert_same(source_snapshot, compare.snapshot(scratch_copy))


# --- pgkeeper round trips -----------------------------------------------------------------------


def _pgkeeper(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the installed `pgkeeper` command (the venv's, next to this Python) as a user would."""
    return subprocess.run(
        [str(PGKEEPER), *args], env=env, capture_output=True, text=True, timeout=120
    )


def _env(pg_cluster: PgCluster, source_url: str, backup_dir: Path) -> dict[str, str]:
    # Secrets travel in the environment only: DATABASE_URL for the source, PGPASSWORD for the
    # target, whose URL on the command line carries no password.
    return {
        **os.environ,
        "DATABASE_URL": source_url,
        "BACKUP_DIR": str(backup_dir),
        "PGPASSWORD": pg_cluster.password,
    }


def _restore_and_compare(
    pg_cluster: PgCluster,
    env: dict[str, str],
    backup_id: str,
    target: str,
    source_snapshot: compare.Snapshot,
    extra_args: tuple[str, ...] = (),
) -> None:
    pg_cluster.drop_database(target)
    try:
        restore = _pgkeeper(
            ["restore", backup_id, "--target-url", pg_cluster.url(target, password=""),
             *extra_args],
            env,
        )  # fmt: skip
        assert restore.returncode == 0, restore.stderr
        compare.assert_same(source_snapshot, compare.snapshot(pg_cluster.url(target)))
    finally:
        pg_cluster.drop_database(target)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(
    fmt: str,
    compression: str,
    pg_cluster: PgCluster,
    fidelity_source: str,
    source_snapshot: compare.Snapshot,
    tmp_path: Path,
) -> None:
    """`pgkeeper backup`, then `pgkeeper restore` into a new database, reproduces the source."""
    env = _env(pg_cluster, fidelity_source, tmp_path / "backups")
    backup = _pgkeeper(["backup", "--format", fmt, "--compression", compression, "--json"], env)
    if fmt == "directory" and compression == "zstd" and _pg_dump_major(pg_cluster) < 16:
        # pg_dump 15 cannot write zstd into a directory dump: a clear usage error, not a crash.
        assert backup.returncode == 2, backup
        assert "zstd compression needs pg_dump 16" in backup.stderr
        assert len(backup.stderr.strip().splitlines()) == 1, backup.stderr
        return
    assert backup.returncode == 0, backup.stderr
    manifest = json.loads(backup.stdout)
    assert (manifest["format"], manifest["compression"]) == (fmt, compression)
    # The manifest's row counts were taken in the dump's own snapshot.
    assert manifest["table_counts"] == {
        name: info["rows"]
        for name, info in source_snapshot["tables"].items()
        if info["kind"] == "r"
    }
    verify = _pgkeeper(["verify", manifest["id"]], env)
    assert verify.returncode == 0, verify.stderr
    _restore_and_compare(
        pg_cluster, env, manifest["id"], f"fidelity_{fmt}_{compression}", source_snapshot
    )


def test_round_trip_streamed_into_pg_restore_is_exact(
    pg_cluster: PgCluster,
    fidelity_source: str,
    source_snapshot: compare.Snapshot,
    tmp_path: Path,
) -> None:
    """A restore with `--jobs 1` (the dump piped into pg_restore, no staged file) is exact too."""
    env = _env(pg_cluster, fidelity_source, tmp_path / "backups")
    backup = _pgkeeper(["backup", "--no-verify", "--json"], env)
    assert backup.returncode == 0, backup.stderr
    manifest = json.loads(backup.stdout)
    assert (manifest["format"], manifest["compression"]) == ("custom", "zstd")
    _restore_and_compare(
        pg_cluster, env, manifest["id"], "fidelity_streamed", source_snapshot, ("--jobs", "1")
    )
