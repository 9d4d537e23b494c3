"""Compare two PostgreSQL databases object by object, to prove a dump/restore round trip exact.

`snapshot(url)` reads one database in a single read-only REPEATABLE READ transaction (so every
section sees the same moment) and returns `{section: {key: value}}`, keyed by object *names*, never
OIDs, because a restore renumbers everything except large objects:

- ``tables``: every table, partition, partitioned table and populated materialized view in every
  user schema: row count and a content hash computed server-side, plus kind, persistence, owner,
  ACL, RLS flags, replica identity, storage options, partition key and bounds;
- ``columns``, ``constraints``, ``indexes``, ``inherits``: the shape of each table;
- ``sequences``: definition plus ``last_value``/``is_called`` (not ``log_cnt``: setval resets it);
- ``large_objects``: oid -> size, md5, owner, ACL;
- ``views``, ``functions``, ``triggers``, ``policies``, ``types``, ``extensions``, ``schemas``,
  ``default_acls``, ``event_triggers``, ``comments``;
- ``objects``: the identity of every user object in the main catalogs, a catch-all.

The content hash is ``md5`` over the sorted ``md5`` of each row's text form (``t::text``), so it
needs no ordering key, works for tables with no columns (each row is ``()``) and cannot be fooled
by a newline inside a value. Output settings (time zone, date/interval style, float digits, bytea
format) are pinned for the session so the text form depends on the stored values only.

`diff(a, b)` lists differences as readable lines; `assert_same(a, b)` raises AssertionError with
them. `load_schema(url)` loads `schema.sql` into an empty database.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

SCHEMA_SQL = Path(__file__).with_name("schema.sql")

Snapshot = dict[str, dict[str, Any]]

# Session settings that make `t::text` a function of the stored values alone.
_SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "search_path": "pg_catalog",
    "row_security": "off",
    "statement_timeout": "0",
}

# Fragments shared by the catalog queries below, which use them as {placeholders}.
_FRAGMENTS = {
    # Schemas that are not user data; pg_toast names embed OIDs, which a restore changes.
    "system_schemas": sql.SQL("('pg_catalog', 'information_schema', 'pg_toast')"),
    "user_ns": sql.SQL(
        "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        " AND n.nspname NOT LIKE 'pg_temp%'"
    ),
    # OIDs below this belong to initdb's objects (FirstNormalObjectId).
    "first_user_oid": sql.Literal(16384),
}


def load_schema(url: str) -> None:
    """Load `schema.sql` into the (empty) database at `url`; raise RuntimeError naming the line."""
    text = SCHEMA_SQL.read_text(encoding="utf-8")
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        try:
            # No parameters: psycopg sends the whole script as one simple query, so the script's
            # own BEGIN/COMMIT pairs decide the transactions.
            conn.execute(text.encode("utf-8"))
        except psycopg.Error as exc:
            line = "?"
            position = exc.diag.statement_position
            if position:
                line = str(text[: int(position)].count("\n") + 1)
            raise RuntimeError(f"{SCHEMA_SQL.name}:{line}: {exc}") from exc


def snapshot(url: str) -> Snapshot:
    """Everything about the database at `url` that a faithful restore must reproduce."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        for name, value in _SESSION_SETTINGS.items():
            conn.execute(sql.SQL("SELECT set_config({}, {}, false)").format(name, value))
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            snap: Snapshot = {
                "tables": _tables(conn),
                "columns": _keyed(conn, _COLUMNS_SQL),
                "constraints": _keyed(conn, _CONSTRAINTS_SQL),
                "indexes": _keyed(conn, _INDEXES_SQL),
                "inherits": _keyed(conn, _INHERITS_SQL),
                "sequences": _sequences(conn),
                "large_objects": _keyed(conn, _LARGE_OBJECTS_SQL),
                "views": _keyed(conn, _VIEWS_SQL),
                "functions": _keyed(conn, _FUNCTIONS_SQL),
                "triggers": _keyed(conn, _TRIGGERS_SQL),
                "policies": _keyed(conn, _POLICIES_SQL),
                "types": _keyed(conn, _TYPES_SQL),
                "extensions": _keyed(conn, _EXTENSIONS_SQL),
                "schemas": _keyed(conn, _SCHEMAS_SQL),
                "default_acls": _keyed(conn, _DEFAULT_ACLS_SQL),
                "event_triggers": _keyed(conn, _EVENT_TRIGGERS_SQL),
                "comments": _keyed(conn, _COMMENTS_SQL),
                "objects": _keyed(conn, _OBJECTS_SQL),
            }
        finally:
            conn.execute("ROLLBACK")
    return snap


def diff(a: Snapshot, b: Snapshot, limit: int = 60) -> list[str]:
    """Differences between two snapshots as readable lines (`a` is the source, `b` the copy)."""
    lines: list[str] = []
    for section in sorted(a.keys() | b.keys()):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(sa.keys() | sb.keys()):
            if key not in sb:
                lines.append(f"{section}: {key}: missing from the copy ({_short(sa[key])})")
            elif key not in sa:
                lines.append(f"{section}: {key}: only in the copy ({_short(sb[key])})")
            elif sa[key] != sb[key]:
                va, vb = sa[key], sb[key]
                if isinstance(va, dict) and isinstance(vb, dict):
                    for field in sorted(va.keys() | vb.keys()):
                        if va.get(field) != vb.get(field):
                            lines.append(
                                f"{section}: {key}: {field}: source {_short(va.get(field))}"
                                f" != copy {_short(vb.get(field))}"
                            )
                else:
                    lines.append(f"{section}: {key}: source {_short(va)} != copy {_short(vb)}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more differences"]
    return lines


def assert_same(a: Snapshot, b: Snapshot) -> None:
    """Raise AssertionError listing every difference between source `a` and copy `b`."""
    lines = diff(a, b)
    if lines:
        raise AssertionError(
            f"the copy differs from the source in {len(lines)} place(s):\n  " + "\n  ".join(lines)
        )


def _short(value: Any, width: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _keyed(conn: psycopg.Connection[Any], query: str) -> dict[str, Any]:
    """Run a query whose first column is the key; the rest become a dict (or the single value)."""
    cur = conn.execute(sql.SQL(query).format(**_FRAGMENTS))
    names = [d.name for d in cur.description or []][1:]
    out: dict[str, Any] = {}
    for row in cur.fetchall():
        key, values = row[0], row[1:]
        if key in out:
            raise RuntimeError(f"snapshot key {key!r} is not unique in query:\n{query}")
        out[key] = values[0] if len(values) == 1 else dict(zip(names, values, strict=True))
    return out


def _tables(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    tables = _keyed(conn, _TABLES_SQL)
    for name, info in tables.items():
        if info["kind"] == "m" and not info["populated"]:
            # Reading an unpopulated materialized view is an error; that it stayed empty is
            # the fact to compare.
            info["rows"], info["hash"] = None, None
            continue
        # Partitioned tables hold no rows themselves: read them whole (all partitions). Plain
        # tables are read ONLY, so an inheritance parent is compared without its children.
        only = sql.SQL("") if info["kind"] == "p" else sql.SQL("ONLY ")
        query = sql.SQL(
            "SELECT count(*), md5(coalesce(string_agg(h, '' ORDER BY h), ''))"
            " FROM (SELECT md5(t::text) AS h FROM {only}{table} AS t) AS rows"
        ).format(only=only, table=sql.SQL(name))
        row = conn.execute(query).fetchone()
        assert row is not None
        info["rows"], info["hash"] = row
    return tables


def _sequences(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    seqs = _keyed(conn, _SEQUENCES_SQL)
    for name, info in seqs.items():
        row = conn.execute(
            sql.SQL("SELECT last_value, is_called FROM {}").format(sql.SQL(name))
        ).fetchone()
        assert row is not None
        info["last_value"], info["is_called"] = row
    return seqs


# Every query below returns names, not OIDs; format('%I.%I') quotes like pg_dump does.

_TABLES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) AS key,
       c.relkind::text AS kind,
       c.relpersistence::text AS persistence,
       pg_get_userbyid(c.relowner) AS owner,
       c.relacl::text AS acl,
       c.relrowsecurity AS row_security,
       c.relforcerowsecurity AS force_row_security,
       c.relreplident::text AS replica_identity,
       c.reloptions::text AS options,
       c.relispopulated AS populated,
       c.relispartition AS is_partition,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
       pg_get_expr(c.relpartbound, c.oid) AS partition_bound
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm') AND {user_ns}
"""

_COLUMNS_SQL = """
SELECT format('%I.%I.%I', n.nspname, c.relname, a.attname) AS key,
       row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum) AS position,
       format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null,
       pg_get_expr(d.adbin, d.adrelid) AS default_or_generated,
       a.attgenerated::text AS generated,
       a.attidentity::text AS identity,
       co.collname AS collation,
       a.attstorage::text AS storage,
       a.attoptions::text AS options,
       a.attacl::text AS acl,
       a.attislocal AS local,
       a.attinhcount AS inherited_count
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 100
WHERE a.attnum > 0 AND NOT a.attisdropped
  AND c.relkind IN ('r', 'p', 'm', 'v', 'f', 'c') AND {user_ns}
"""

_CONSTRAINTS_SQL = """
SELECT format('%I.%I/%I', n.nspname, coalesce(c.relname, t.typname), con.conname) AS key,
       pg_get_constraintdef(con.oid, true) AS definition,
       con.contype::text AS type,
       con.condeferrable AS deferrable,
       con.condeferred AS deferred,
       con.convalidated AS validated,
       con.conislocal AS local
FROM pg_constraint con
JOIN pg_namespace n ON n.oid = con.connamespace
LEFT JOIN pg_class c ON c.oid = con.conrelid
LEFT JOIN pg_type t ON t.oid = con.contypid
WHERE {user_ns}
"""

_INDEXES_SQL = """
SELECT format('%I.%I', n.nspname, ic.relname) AS key,
       pg_get_indexdef(i.indexrelid) AS definition,
       i.indisclustered AS clustered,
       i.indisvalid AS valid,
       ic.reloptions::text AS options
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
WHERE {user_ns}
"""

_INHERITS_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) AS key,
       string_agg(i.inhparent::regclass::text, ', ' ORDER BY i.inhseqno) AS parents
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {user_ns}
GROUP BY 1
"""

_SEQUENCES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) AS key,
       format_type(s.seqtypid, NULL) AS type,
       s.seqstart AS start,
       s.seqincrement AS increment,
       s.seqmin AS min,
       s.seqmax AS max,
       s.seqcache AS cache,
       s.seqcycle AS cycle,
       pg_get_userbyid(c.relowner) AS owner,
       c.relacl::text AS acl,
       (SELECT format('%s.%I', d.refobjid::regclass, a.attname) || ' (' || d.deptype::text || ')'
          FROM pg_depend d
          JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
         WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
           AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')) AS owned_by
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE {user_ns}
"""

_LARGE_OBJECTS_SQL = """
SELECT m.oid::text AS key,
       octet_length(lo_get(m.oid)) AS size,
       md5(lo_get(m.oid)) AS md5,
       pg_get_userbyid(m.lomowner) AS owner,
       m.lomacl::text AS acl
FROM pg_largeobject_metadata m
"""

_VIEWS_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) AS key,
       c.relkind::text AS kind,
       pg_get_viewdef(c.oid, true) AS definition,
       c.reloptions::text AS options,
       pg_get_userbyid(c.relowner) AS owner,
       c.relacl::text AS acl
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND {user_ns}
"""

_FUNCTIONS_SQL = """
SELECT p.oid::regprocedure::text AS key,
       p.prokind::text AS kind,
       CASE WHEN p.prokind IN ('f', 'p', 'w') THEN pg_get_functiondef(p.oid)
            ELSE (SELECT format('sfunc=%s stype=%s initcond=%s', a.aggtransfn,
                                format_type(a.aggtranstype, NULL), a.agginitval)
                    FROM pg_aggregate a WHERE a.aggfnoid = p.oid)
       END AS definition,
       pg_get_userbyid(p.proowner) AS owner,
       p.proacl::text AS acl
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE {user_ns}
"""

_TRIGGERS_SQL = """
SELECT format('%I.%I/%I', n.nspname, c.relname, t.tgname) AS key,
       pg_get_triggerdef(t.oid, true) AS definition,
       t.tgenabled::text AS enabled
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal AND {user_ns}
"""

_POLICIES_SQL = """
SELECT format('%I.%I/%I', schemaname, tablename, policyname) AS key,
       permissive, roles::text AS roles, cmd, qual, with_check
FROM pg_policies
"""

_TYPES_SQL = """
SELECT format_type(t.oid, NULL) AS key,
       t.typtype::text AS type,
       pg_get_userbyid(t.typowner) AS owner,
       t.typacl::text AS acl,
       CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END AS base_type,
       t.typnotnull AS not_null,
       t.typdefault AS default,
       (SELECT string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder)
          FROM pg_enum e WHERE e.enumtypid = t.oid) AS enum_labels,
       (SELECT format_type(r.rngsubtype, NULL) || ' diff=' || r.rngsubdiff::text
          FROM pg_range r WHERE r.rngtypid = t.oid) AS range_subtype
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE {user_ns}
  AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
  AND NOT (t.typcategory = 'A' AND t.typelem <> 0)
"""

_EXTENSIONS_SQL = """
SELECT e.extname AS key, e.extversion AS version, n.nspname AS schema
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
"""

_SCHEMAS_SQL = """
SELECT format('%I', n.nspname) AS key,
       pg_get_userbyid(n.nspowner) AS owner,
       n.nspacl::text AS acl
FROM pg_namespace n
WHERE {user_ns}
"""

_DEFAULT_ACLS_SQL = """
SELECT format('%s/%s/%s', pg_get_userbyid(d.defaclrole), coalesce(n.nspname, '*'),
              d.defaclobjtype) AS key,
       d.defaclacl::text AS acl
FROM pg_default_acl d LEFT JOIN pg_namespace n ON n.oid = d.defaclnamespace
"""

_EVENT_TRIGGERS_SQL = """
SELECT evtname AS key, evtevent AS event, evtfoid::regproc::text AS function,
       evtenabled::text AS enabled, evttags::text AS tags
FROM pg_event_trigger
"""

_COMMENTS_SQL = """
SELECT format('%s %s', o.type, o.identity) AS key, d.description
FROM pg_description d
CROSS JOIN LATERAL pg_identify_object(d.classoid, d.objoid, d.objsubid) AS o
WHERE d.objoid >= {first_user_oid}
"""

# Catch-all: every user object of the main catalogs, by identity (schema-qualified name).
_OBJECTS_SQL = """
SELECT format('%s %s', o.type, o.identity) AS key, true AS present
FROM (
    SELECT 'pg_class'::regclass AS classid, oid FROM pg_class
    UNION ALL SELECT 'pg_proc'::regclass, oid FROM pg_proc
    UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type
    UNION ALL SELECT 'pg_namespace'::regclass, oid FROM pg_namespace
    UNION ALL SELECT 'pg_constraint'::regclass, oid FROM pg_constraint
    UNION ALL SELECT 'pg_trigger'::regclass, oid FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL SELECT 'pg_policy'::regclass, oid FROM pg_policy
    UNION ALL SELECT 'pg_rewrite'::regclass, oid FROM pg_rewrite
    UNION ALL SELECT 'pg_extension'::regclass, oid FROM pg_extension
    UNION ALL SELECT 'pg_event_trigger'::regclass, oid FROM pg_event_trigger
    UNION ALL SELECT 'pg_collation'::regclass, oid FROM pg_collation
    UNION ALL SELECT 'pg_ts_config'::regclass, oid FROM pg_ts_config
    UNION ALL SELECT 'pg_ts_dict'::regclass, oid FROM pg_ts_dict
    UNION ALL SELECT 'pg_statistic_ext'::regclass, oid FROM pg_statistic_ext
    UNION ALL SELECT 'pg_operator'::regclass, oid FROM pg_operator
    UNION ALL SELECT 'pg_opclass'::regclass, oid FROM pg_opclass
    UNION ALL SELECT 'pg_cast'::regclass, oid FROM pg_cast
    UNION ALL SELECT 'pg_largeobject'::regclass, oid FROM pg_largeobject_metadata
) AS u
CROSS JOIN LATERAL pg_identify_object(u.classid, u.oid, 0) AS o
WHERE u.oid >= {first_user_oid}
  AND coalesce(o.schema, '') NOT IN {system_schemas}
  AND coalesce(o.schema, '') NOT LIKE 'pg_temp%'
"""


def main(argv: list[str]) -> int:
    """`python -m tests.fidelity.compare SOURCE_URL COPY_URL`: print differences, exit 1 if any."""
    if len(argv) != 2:
        print("usage: python -m tests.fidelity.compare SOURCE_URL COPY_URL", file=sys.stderr)
        return 2
    lines = diff(snapshot(argv[0]), snapshot(argv[1]), limit=10_000)
    print("\n".join(lines) if lines else "same")
    return 1 if lines else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
