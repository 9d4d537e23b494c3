"""Build a benchmark dataset with realistic entropy in a PostgreSQL database, server-side.

Not pgbench's filler (almost all blank padding, compresses 100x): four tables of different widths
hold word-level random text of varied length (words drawn from a 30,000-word vocabulary with a
skewed, Zipf-like frequency, so text compresses about as well as prose does), numerics, jsonb
documents, timestamps, uuids and arrays, plus btree indexes. Everything is generated inside the
server with generate_series() and random() (seeded, so a size always builds the same data), in
batches, on `--jobs` connections at once, until the tables reach their share of `--size-gb`.

    python bench/dataset.py --database-url postgresql://... --size-gb 1.0

`build(url, size_gb)` does the same from Python and returns what it built (bytes per table and
the database size). The target counts the whole database (tables, TOAST and indexes); the
resulting `pg_database_size` is measured and reported, not assumed.
"""

# Every SQL string here is assembled from this module's own constants; no input reaches it.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

SCHEMA = "bench"
VOCABULARY = 30_000
GIB = 1024**3
# Indexes take about this share of the database; the tables get the rest of the target.
INDEX_SHARE = 0.18

# A skewed pick from the vocabulary: the product of two uniforms favours low indexes, a cheap
# stand-in for Zipf's law. `0 * i` ties the expression to the inner row so it is re-evaluated.
_WORD = f"v.w[1 + ({VOCABULARY - 1} * random() * random())::int + 0 * i]"


def words(count_sql: str) -> str:
    """SQL for a string of `count_sql` random words (needs `v.w`, the vocabulary array)."""
    return f"(SELECT string_agg({_WORD}, ' ') FROM generate_series(1, {count_sql}) AS i)"


@dataclass(frozen=True)
class Table:
    """One dataset table: its DDL, how to insert rows [lo, hi], its share of the bytes."""

    name: str
    share: float
    batch_rows: int
    ddl: str
    insert: str  # uses {lo} and {hi}; `g` is the row number
    indexes: tuple[str, ...]


_VOCAB_FROM = f"(SELECT array_agg(word::name ORDER BY id) AS w FROM {SCHEMA}.vocab) AS v"

TABLES = (
    Table(
        name="customers",
        share=0.12,
        batch_rows=50_000,
        ddl=f"""
        CREATE TABLE {SCHEMA}.customers (
            id bigint PRIMARY KEY,
            name text NOT NULL,
            email text NOT NULL,
            country char(2) NOT NULL,
            city text,
            created timestamptz NOT NULL,
            balance numeric(14, 2) NOT NULL,
            score double precision,
            active boolean NOT NULL,
            tags text[]
        )""",
        insert=f"""
        INSERT INTO {SCHEMA}.customers
        SELECT g,
               initcap({words("2 + (random() * 2)::int")}),
               {words("1")} || '.' || g || '@' || {words("1")} || '.example',
               (ARRAY['us','de','fr','jp','br','in','gb','ca','au','mx'])[1 + (random() * 9)::int],
               CASE WHEN random() < 0.9 THEN initcap({words("1 + (random() * 2)::int")}) END,
               timestamptz '2015-01-01' + random() * interval '3650 days',
               round((random() * random() * 100000 - 2000)::numeric, 2),
               random() * 100,
               random() < 0.8,
               CASE WHEN random() < 0.6
                    THEN string_to_array({words("1 + (random() * 4)::int")}, ' ') END
        FROM generate_series({{lo}}, {{hi}}) AS g, {_VOCAB_FROM}""",
        indexes=(
            "CREATE INDEX ON {s}.customers (email)",
            "CREATE INDEX ON {s}.customers (created)",
        ),
    ),
    Table(
        name="orders",
        share=0.22,
        batch_rows=100_000,
        ddl=f"""
        CREATE TABLE {SCHEMA}.orders (
            id bigint PRIMARY KEY,
            customer_id bigint NOT NULL,
            created timestamptz NOT NULL,
            shipped timestamptz,
            status text NOT NULL,
            amount numeric(12, 2) NOT NULL,
            quantity integer NOT NULL,
            discount real,
            reference uuid NOT NULL,
            note text
        )""",
        insert=f"""
        INSERT INTO {SCHEMA}.orders
        SELECT g,
               1 + (random() * 1000000)::bigint,
               c,
               CASE WHEN random() < 0.85 THEN c + random() * interval '20 days' END,
               (ARRAY['new','paid','shipped','delivered','returned','cancelled'])
                   [1 + (random() * random() * 5)::int],
               round((random() * random() * 2000)::numeric, 2),
               1 + (random() * random() * 20)::int,
               CASE WHEN random() < 0.3 THEN (random() * 0.5)::real END,
               gen_random_uuid(),
               CASE WHEN random() < 0.35 THEN {words("1 + (random() * random() * 40)::int")} END
        FROM (SELECT g, timestamptz '2018-01-01' + random() * interval '2500 days' AS c
              FROM generate_series({{lo}}, {{hi}}) AS g) AS o, {_VOCAB_FROM}""",
        indexes=(
            "CREATE INDEX ON {s}.orders (customer_id)",
            "CREATE INDEX ON {s}.orders (created)",
        ),
    ),
    Table(
        name="events",
        share=0.30,
        batch_rows=40_000,
        ddl=f"""
        CREATE TABLE {SCHEMA}.events (
            id bigint PRIMARY KEY,
            occurred timestamptz NOT NULL,
            customer_id bigint,
            kind text NOT NULL,
            payload jsonb NOT NULL
        )""",
        insert=f"""
        INSERT INTO {SCHEMA}.events
        SELECT g,
               timestamptz '2023-01-01' + g * interval '1 second' + random() * interval '1 hour',
               CASE WHEN random() < 0.95 THEN 1 + (random() * 1000000)::bigint END,
               (ARRAY['page_view','click','search','add_to_cart','checkout','login','error'])
                   [1 + (random() * random() * 6)::int],
               jsonb_build_object(
                   'session', gen_random_uuid(),
                   'ip', ((random() * 4294967295)::bigint - 2147483648)::int,
                   'path', '/' || replace({words("1 + (random() * 3)::int")}, ' ', '/'),
                   'duration_ms', (random() * random() * 30000)::int,
                   'amount', round((random() * 500)::numeric, 2),
                   'items', jsonb_build_array(
                       jsonb_build_object('sku', 'SKU-' || (random() * 99999)::int,
                                          'qty', 1 + (random() * 4)::int,
                                          'price', round((random() * 300)::numeric, 2)),
                       jsonb_build_object('sku', 'SKU-' || (random() * 99999)::int,
                                          'qty', 1 + (random() * 4)::int,
                                          'price', round((random() * 300)::numeric, 2))),
                   'agent', {words("3 + (random() * 6)::int")},
                   'flags', jsonb_build_object('mobile', random() < 0.6, 'beta', random() < 0.1),
                   'search', CASE WHEN random() < 0.3 THEN {words("1 + (random() * 5)::int")} END)
        FROM generate_series({{lo}}, {{hi}}) AS g, {_VOCAB_FROM}""",
        indexes=(
            "CREATE INDEX ON {s}.events (occurred)",
            "CREATE INDEX ON {s}.events (customer_id)",
        ),
    ),
    Table(
        name="documents",
        share=0.36,
        batch_rows=8_000,
        ddl=f"""
        CREATE TABLE {SCHEMA}.documents (
            id bigint PRIMARY KEY,
            customer_id bigint NOT NULL,
            title text NOT NULL,
            body text NOT NULL,
            created timestamptz NOT NULL,
            version integer NOT NULL,
            rating numeric(3, 2)
        )""",
        insert=f"""
        INSERT INTO {SCHEMA}.documents
        SELECT g,
               1 + (random() * 1000000)::bigint,
               initcap({words("3 + (random() * 6)::int")}),
               {words("10 + (random() * random() * 1200)::int")},
               timestamptz '2016-01-01' + random() * interval '3000 days',
               1 + (random() * random() * 30)::int,
               CASE WHEN random() < 0.7 THEN round((random() * 5)::numeric, 2) END
        FROM generate_series({{lo}}, {{hi}}) AS g, {_VOCAB_FROM}""",
        indexes=("CREATE INDEX ON {s}.documents (customer_id, created)",),
    ),
)

# Letters weighted roughly like English (frequent first; the power skews picks to the front).
_VOCAB_SQL = f"""
CREATE TABLE {SCHEMA}.vocab AS
SELECT g AS id,
       (SELECT string_agg(substr('etaoinshrdlcumwfgypbvkjxqz',
                                 1 + (25.99 * power(random(), 1.6))::int, 1), '')
          FROM generate_series(1, 1 + (g % 5) + (random() * 7)::int + 0 * g) AS i) AS word
FROM generate_series(1, {VOCABULARY}) AS g;
ALTER TABLE {SCHEMA}.vocab ADD PRIMARY KEY (id);
"""


def _connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def _table_bytes(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute(f"SELECT pg_table_size('{SCHEMA}.{name}')").fetchone()
    return int(row[0]) if row else 0


def _fill(
    url: str, table: Table, target_bytes: int, seed: float, log: Callable[[str], None]
) -> int:
    """Insert batches into `table` until its heap+TOAST reaches `target_bytes`; return rows."""
    with _connect(url) as conn:
        conn.execute("SELECT setseed(%s)", (seed,))
        conn.execute("SET synchronous_commit = off")
        rows = 0
        # A small first batch measures the bytes per row; later batches aim at the target.
        batch = max(100, table.batch_rows // 10)
        while (current := _table_bytes(conn, table.name)) < target_bytes * 0.995:
            if rows:
                per_row = max(1.0, current / rows)
                batch = max(100, min(table.batch_rows, int((target_bytes - current) / per_row)))
            conn.execute(table.insert.format(lo=rows + 1, hi=rows + batch).encode())
            rows += batch
        log(f"  {table.name}: {rows} rows, {_table_bytes(conn, table.name) / 2**20:.0f} MiB")
        for index in table.indexes:
            conn.execute(index.format(s=SCHEMA).encode())
        # Freeze and analyze now, so the first dump does not pay for hint bits and the
        # visibility map (which would make the first measured run slower than the rest).
        conn.execute(f"VACUUM (FREEZE, ANALYZE) {SCHEMA}.{table.name}".encode())
        return rows


def build(
    url: str,
    size_gb: float = 1.0,
    jobs: int = 2,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict[str, Any]:
    """(Re)create schema `bench` in the database at `url` holding about `size_gb` GiB of data.

    Returns `{"size_gb": ..., "database_bytes": ..., "tables": {name: {"rows", "bytes"}}, ...}`.
    """
    started = time.monotonic()
    table_bytes = size_gb * GIB * (1 - INDEX_SHARE)
    with _connect(url) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE".encode())
        conn.execute(f"CREATE SCHEMA {SCHEMA}".encode())
        conn.execute("SELECT setseed(0.42)")
        conn.execute(_VOCAB_SQL.encode())
        for table in TABLES:
            conn.execute(table.ddl.encode())

    # Biggest tables first, so the parallel workers finish at about the same time.
    pending = sorted(TABLES, key=lambda t: t.share, reverse=True)
    results: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not pending or errors:
                    return
                table = pending.pop(0)
            try:
                seed = (TABLES.index(table) + 1) / 10
                results[table.name] = _fill(url, table, int(table_bytes * table.share), seed, log)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(max(1, jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]

    with _connect(url) as conn:
        conn.execute(f"VACUUM (FREEZE, ANALYZE) {SCHEMA}.vocab".encode())
        conn.execute("CHECKPOINT")
        tables = {
            t.name: {
                "rows": results[t.name],
                "bytes": int(
                    conn.execute(
                        f"SELECT pg_total_relation_size('{SCHEMA}.{t.name}')".encode()
                    ).fetchone()[0]  # type: ignore[index]
                ),
            }
            for t in TABLES
        }
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        database_bytes = int(row[0]) if row else 0
    info = {
        "size_gb": size_gb,
        "database_bytes": database_bytes,
        "tables": tables,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    log(
        f"dataset: {database_bytes / GIB:.2f} GiB database "
        f"(target {size_gb:g}) built in {info['build_seconds']} s"
    )
    return info


def main(argv: list[str] | None = None) -> int:
    """Command line: build the dataset and print what was built as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="database to fill (default: DATABASE_URL); a password is better kept in PGPASSWORD",
    )
    parser.add_argument("--size-gb", type=float, default=1.0, help="target database size, GiB")
    parser.add_argument("--jobs", type=int, default=2, help="tables filled at once")
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("--database-url (or DATABASE_URL) is required")
    print(json.dumps(build(args.database_url, args.size_gb, args.jobs), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
