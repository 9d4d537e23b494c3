"""The parallel restore of a streamed custom-format backup (src/pgkeeper/loader.py).

Its rows are dealt over several COPY connections: these tests check that one big table really
loads over all of them, byte for byte, with the rest of the archive (sequences, indexes, large
objects) around it, and that a connection killed mid-COPY fails the restore cleanly.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
import zstandard

from pgkeeper import restore
from pgkeeper.backup import run_backup
from pgkeeper.errors import RestoreError
from pgkeeper.importing import import_file
from pgkeeper.settings import load_settings
from tests.servers.postgres import PgCluster

pytestmark = pytest.mark.integration

# Text COPY must escape all of these; a raw newline in the stream only ever ends a row.
TRICKY = "E'line\\nbreak\\ttab \\\\ back\\\\slash\\n\\\\.\\n' || 'ünïcode ☃ \"q\"'"


def _source(pg_cluster: PgCluster, rows: int) -> str:
    name = f"par_src_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(name)
    pg_cluster.execute(
        f"""
        CREATE TABLE big (id bigint PRIMARY KEY, body text, raw bytea, doc jsonb);
        CREATE INDEX big_body ON big (left(body, 20));
        CREATE SEQUENCE odd_seq START 7 INCREMENT 13;
        SELECT nextval('odd_seq'), nextval('odd_seq');
        INSERT INTO big
        SELECT g, {TRICKY} || md5(g::text) || repeat(md5((g * 7)::text), 3),
               decode(md5(g::text) || '00ff00', 'hex'),
               jsonb_build_object('g', g, 'tag', E'a\\nb')
        FROM generate_series(1, {rows}) g;
        CREATE TABLE small (id int PRIMARY KEY, note text);
        INSERT INTO small VALUES (1, E'\\\\.'), (2, NULL), (3, ''),
            (4, repeat(E'long row\\t', 400000));  -- one row longer than a read (1 MiB)
        CREATE TABLE "line
break" ("a
b" int);
        INSERT INTO "line
break" VALUES (42);
        SELECT lo_from_bytea(0, '\\x00010203'::bytea);
        """,  # noqa: S608 - constants of this test
        dbname=name,
    )
    return name


def _fingerprint(pg_cluster: PgCluster, dbname: str) -> tuple[object, ...]:
    return tuple(
        pg_cluster.query(
            """
            SELECT (SELECT count(*) FROM big),
                   (SELECT md5(string_agg(b::text, '|' ORDER BY id)) FROM big b),
                   (SELECT md5(string_agg(s::text, '|' ORDER BY id)) FROM small s),
                   (SELECT sum("a\nb") FROM "line\nbreak"),
                   (SELECT last_value FROM odd_seq),
                   (SELECT count(*) FROM pg_indexes WHERE indexname = 'big_body'),
                   (SELECT string_agg(lo_get(oid)::text, ',') FROM pg_largeobject_metadata)
            """,
            dbname=dbname,
        )[0]
    )


def test_one_big_table_loads_over_every_connection_exactly(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    source = _source(pg_cluster, rows=30_000)  # ~6 MiB of rows: several 1 MiB batches
    settings = load_settings(database_url=pg_cluster.url(source), backup_dir=str(tmp_path))
    manifest = run_backup(settings)
    target = f"par_dst_{uuid.uuid4().hex[:8]}"
    result = restore.restore_backup(settings, manifest.id, pg_cluster.url(target), jobs=3)
    assert result.database == target
    assert _fingerprint(pg_cluster, target) == _fingerprint(pg_cluster, source)
    # Each connection's COPY is its own transaction: three connections, three xmins.
    xmins = pg_cluster.query("SELECT count(DISTINCT xmin::text) FROM big", dbname=target)
    assert xmins[0][0] == 3


def test_a_copy_connection_killed_mid_load_fails_and_leaves_the_target(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    source = _source(pg_cluster, rows=150_000)
    settings = load_settings(database_url=pg_cluster.url(source), backup_dir=str(tmp_path))
    manifest = run_backup(settings)
    target = f"par_live_{uuid.uuid4().hex[:8]}"
    pg_cluster.create_database(target)
    pg_cluster.execute(
        "CREATE TABLE keep (v text); INSERT INTO keep VALUES ('mine')", dbname=target
    )

    killed: list[int] = []
    stop = threading.Event()

    def kill_a_copy() -> None:
        with psycopg.connect(pg_cluster.url("postgres"), autocommit=True) as admin:
            while not stop.is_set() and not killed:
                rows = admin.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname LIKE 'pgk_restore_%' "
                    "AND query LIKE 'COPY public.big %'"
                ).fetchall()
                if rows:
                    admin.execute("SELECT pg_terminate_backend(%s)", (rows[0][0],))
                    killed.append(rows[0][0])
                time.sleep(0.005)

    watcher = threading.Thread(target=kill_a_copy, daemon=True)
    watcher.start()
    try:
        with pytest.raises(RestoreError, match="loading table data failed"):
            restore.restore_backup(
                settings, manifest.id, pg_cluster.url(target), confirm=target, jobs=2,
                safety_backup=False,
            )  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert killed, "the watcher never saw a COPY to kill"
    assert pg_cluster.query("SELECT v FROM keep", dbname=target) == [("mine",)]
    leftovers = pg_cluster.query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'pgk_restore_%'"
    )
    assert leftovers == []


def test_an_imported_pg_dump_fc_file_wrapped_in_zstd_loads_in_parallel_too(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """`pg_dump -Fc | zstd` made by hand (pg_dump's own gzip inside the archive) imports as a
    zstd custom backup and restores through the parallel load: pg_restore itself unpacks the
    archive's compressed data blocks into the COPY rows that are dealt."""
    source = _source(pg_cluster, rows=20_000)
    dump = subprocess.run(
        [str(pg_cluster.bindir / "pg_dump"), "--no-password", "-Fc", "-d", source],
        env={**os.environ, **pg_cluster.libpq_env(source)}, check=True, capture_output=True,
    ).stdout  # fmt: skip
    wrapped = tmp_path / "by-hand.dump.zst"
    wrapped.write_bytes(zstandard.ZstdCompressor().compress(dump))
    settings = load_settings(database_url=pg_cluster.url(source), backup_dir=str(tmp_path / "b"))
    manifest = import_file(settings, wrapped, name="handmade")
    assert (manifest.format, manifest.compression) == ("custom", "zstd")
    target = f"par_imp_{uuid.uuid4().hex[:8]}"
    restore.restore_backup(settings, manifest.id, pg_cluster.url(target), jobs=2)
    assert _fingerprint(pg_cluster, target) == _fingerprint(pg_cluster, source)
    xmins = pg_cluster.query("SELECT count(DISTINCT xmin::text) FROM big", dbname=target)
    assert xmins[0][0] == 2
