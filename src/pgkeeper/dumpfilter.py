"""Table filters (``-t``/``-T``) that still give a backup that restores.

``pg_dump -t`` dumps the matching tables and nothing they depend on (pg_dump's manual: "there
is no guarantee that the results of a specific-table dump can be successfully restored by
themselves into a clean database"). A table whose default is ``nextval('invoice_seq')`` on a
standalone sequence, that references another table by a foreign key, uses a type or sits in a
schema other than ``public`` would be stored, verified as bytes, and fail on restore.

pgkeeper restores into a new database, so before a filtered backup it asks pg_dump which
objects the filters select (a schema-only archive's table of contents, which names each
object's catalog and oid) and the server what those objects depend on (``pg_depend``):
  - a sequence the chosen tables use but that is not dumped is added to the dump (``-t seq``);
  - anything else that would be missing (a schema, a type, a function, a table referenced by a
    foreign key, an extension) fails the backup before it starts, naming the objects.
Runs inside the backup's exported snapshot, so it judges the very catalog pg_dump dumps.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgkeeper import postgres
from pgkeeper.errors import DumpError, UsageError
from pgkeeper.pipeline import ClientProcess

# pg_catalog oids of the catalogs pg_restore --list names (stable across versions).
PG_CLASS = 1259
PG_TYPE = 1247
PG_EXTENSION = 3079
FIRST_NORMAL_OID = 16384  # below: objects of initdb (pg_catalog, the public schema, ...)
_TOC_LINE = re.compile(r"^\s*\d+;\s+(\d+)\s+(\d+)\s+(.*)$")
_NO_MATCH = re.compile(r'no matching (?:tables|schemas) were found(?: for pattern "(.*)")?')
_BAD_PATTERN = re.compile(r"invalid regular expression: (.*)")

# Everything the dumped relations (and their defaults, constraints, indexes, triggers, rules and
# policies) depend on, normalised: an index to its table, an array type to its element, a row
# type to its relation, an extension's member to the extension.
_DEPENDENCIES_SQL = """
WITH rel AS (SELECT unnest(%(rels)s::oid[]) AS oid),
part AS (
    SELECT 'pg_class'::regclass::oid AS classid, oid AS objid FROM rel
    UNION ALL SELECT 'pg_attrdef'::regclass, ad.oid
        FROM pg_attrdef ad JOIN rel ON ad.adrelid = rel.oid
    UNION ALL SELECT 'pg_constraint'::regclass, co.oid
        FROM pg_constraint co JOIN rel ON co.conrelid = rel.oid
    UNION ALL SELECT 'pg_class'::regclass, i.indexrelid
        FROM pg_index i JOIN rel ON i.indrelid = rel.oid
    UNION ALL SELECT 'pg_trigger'::regclass, t.oid
        FROM pg_trigger t JOIN rel ON t.tgrelid = rel.oid WHERE NOT t.tgisinternal
    UNION ALL SELECT 'pg_rewrite'::regclass, r.oid
        FROM pg_rewrite r JOIN rel ON r.ev_class = rel.oid
    UNION ALL SELECT 'pg_policy'::regclass, p.oid
        FROM pg_policy p JOIN rel ON p.polrelid = rel.oid
),
ref AS (
    SELECT DISTINCT d.refclassid AS classid, d.refobjid AS objid
    FROM pg_depend d JOIN part ON d.classid = part.classid AND d.objid = part.objid
    WHERE d.deptype = 'n' AND d.refobjid >= %(first)s
),
norm AS (
    SELECT CASE
             WHEN ref.classid = 'pg_class'::regclass AND c.relkind IN ('i', 'I')
               THEN 'pg_class'::regclass::oid
             WHEN ref.classid = 'pg_type'::regclass AND et.oid IS NOT NULL
               THEN 'pg_type'::regclass::oid
             ELSE ref.classid END AS classid,
           CASE
             WHEN ref.classid = 'pg_class'::regclass AND c.relkind IN ('i', 'I') THEN i.indrelid
             WHEN ref.classid = 'pg_type'::regclass AND et.oid IS NOT NULL THEN et.oid
             ELSE ref.objid END AS objid
    FROM ref
    LEFT JOIN pg_class c ON ref.classid = 'pg_class'::regclass AND c.oid = ref.objid
    LEFT JOIN pg_index i ON i.indexrelid = c.oid
    LEFT JOIN pg_type t ON ref.classid = 'pg_type'::regclass AND t.oid = ref.objid
    LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typlen = -1 AND t.typelem <> 0
)
SELECT DISTINCT
    COALESCE(ext.oid, n.objid) AS objid,
    CASE WHEN ext.oid IS NOT NULL THEN 'pg_extension'::regclass::oid
         WHEN tr.relkind IS NOT NULL AND tr.relkind <> 'c' THEN 'pg_class'::regclass::oid
         ELSE n.classid END AS classid,
    CASE WHEN ext.oid IS NOT NULL THEN 'extension ' || quote_ident(ext.extname)
         WHEN tr.relkind IS NOT NULL AND tr.relkind <> 'c'
           THEN pg_describe_object('pg_class'::regclass, tr.oid, 0)
         ELSE pg_describe_object(n.classid, n.objid, 0) END AS what,
    CASE WHEN ext.oid IS NOT NULL THEN NULL
         WHEN tr.relkind IS NOT NULL AND tr.relkind <> 'c' THEN tr.relkind
         ELSE rc.relkind END AS relkind,
    CASE WHEN tr.relkind IS NOT NULL AND tr.relkind <> 'c' THEN tr.oid END AS rowtype_of
FROM norm n
LEFT JOIN pg_depend e ON e.classid = n.classid AND e.objid = n.objid AND e.deptype = 'e'
LEFT JOIN pg_extension ext ON ext.oid = e.refobjid
LEFT JOIN pg_type nt ON n.classid = 'pg_type'::regclass AND nt.oid = n.objid
LEFT JOIN pg_class tr ON tr.oid = nt.typrelid AND nt.typrelid <> 0
LEFT JOIN pg_class rc ON n.classid = 'pg_class'::regclass AND rc.oid = n.objid
WHERE n.objid >= %(first)s
  -- a new database always has a public schema, even if this one's was dropped and re-created
  AND NOT (n.classid = 'pg_namespace'::regclass
           AND n.objid IN (SELECT oid FROM pg_namespace WHERE nspname = 'public'))
"""

_SEQUENCE_NAME_SQL = (
    "SELECT n.nspname, c.relname FROM pg_class c"
    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s"
)


@dataclass(frozen=True)
class FilterPlan:
    """What to add to a filtered dump so that it restores."""

    added_tables: tuple[str, ...]  # exact -t patterns for the sequences added ("schema"."seq")
    added_names: tuple[str, ...]  # the same, as schema.name for the manifest and messages


def _exact_pattern(schema: str, name: str) -> str:
    """A pg_dump -t pattern matching exactly one relation: double quotes make every character
    literal (psql's pattern rules), and a double quote inside is doubled."""
    return '"{}"."{}"'.format(schema.replace('"', '""'), name.replace('"', '""'))


def _toc(pg_dump: postgres.Client, pg_restore: postgres.Client, argv: list[str],
         env: dict[str, str]) -> set[tuple[int, int]]:  # fmt: skip
    """(catalog oid, object oid) of every object a schema-only dump with ``argv``'s filters
    holds. Raises UsageError when a -t pattern matches nothing."""
    with tempfile.NamedTemporaryFile(prefix="pgkeeper-filter-", suffix=".dump") as archive:
        full = [*argv, "--schema-only", "--format=custom", f"--file={archive.name}"]
        with ClientProcess(full, env, stdout=subprocess.DEVNULL) as proc:
            if proc.wait() != 0:
                raise (
                    no_match_error(proc.stderr_lines)
                    or pattern_error(proc.stderr_lines)
                    or DumpError(f"pg_dump failed listing the filtered tables: {proc.last_error()}")
                )
        listing = subprocess.run(
            [pg_restore.argv0, "--list", archive.name],
            capture_output=True, text=True, timeout=600, env=env, check=False,
        )  # fmt: skip
    if listing.returncode != 0:
        raise DumpError(f"pg_restore --list failed: {listing.stderr.strip()[:200]}")
    found: set[tuple[int, int]] = set()
    for line in listing.stdout.splitlines():
        match = _TOC_LINE.match(line)
        if match:
            found.add((int(match.group(1)), int(match.group(2))))
    return found


def no_match_error(stderr_lines: Sequence[str]) -> UsageError | None:
    """pg_dump's "no matching tables were found" as a user error (exit 2), or None."""
    for line in stderr_lines:
        match = _NO_MATCH.search(line)
        if match:
            pattern = match.group(1)
            what = f"-t {pattern!r}" if pattern else "the table filters"
            return UsageError(
                f"no table matches {what} (names are schema.table, patterns as in psql, e.g. "
                "'public.orders' or 'shop.*'; see 'pgkeeper list' for the database)"
            )
    return None


def pattern_error(stderr_lines: Sequence[str]) -> UsageError | None:
    """pg_dump refusing a -t/-T pattern as a regular expression, as a user error, or None."""
    for line in stderr_lines:
        match = _BAD_PATTERN.search(line)
        if match:
            return UsageError(
                f"a table pattern is not valid ({match.group(1).strip()[:80]}): patterns are as "
                "in psql, e.g. 'public.orders' or 'shop.*'; double-quote a name with special "
                "characters"
            )
    return None


def plan_filters(
    connection: psycopg.Connection[Any],
    pg_dump: postgres.Client,
    pg_restore: postgres.Client,
    argv: list[str],
    env: dict[str, str],
    can_add: bool,
) -> FilterPlan:
    """Check that a dump with ``argv``'s -t/-T filters restores into a new database; return the
    sequences to add. ``argv`` is the pg_dump command line without format/output options,
    ``connection`` a session in the same snapshot. ``can_add``: sequences may be added with
    ``-t`` (only when the filters already use -t: with -T alone, one -t would narrow the
    whole dump to it).

    Raises UsageError naming every missing object (or an unmatched or malformed pattern).
    """
    added: dict[int, tuple[str, str]] = {}
    for _ in range(3):  # added sequences may need their own schema: look again
        extra = [f"--table={_exact_pattern(*names)}" for names in added.values()]
        dumped = _toc(pg_dump, pg_restore, [*argv, *extra], env)
        relations = sorted(oid for cat, oid in dumped if cat == PG_CLASS)
        rows = connection.execute(
            _DEPENDENCIES_SQL, {"rels": relations, "first": FIRST_NORMAL_OID}
        ).fetchall()
        missing: list[str] = []
        more = False
        for objid, classid, what, relkind, _rowtype_of in rows:
            if (int(classid), int(objid)) in dumped:
                continue
            if can_add and int(classid) == PG_CLASS and relkind == "S" and int(objid) not in added:
                row = connection.execute(_SEQUENCE_NAME_SQL, (objid,)).fetchone()
                if row is not None:
                    added[int(objid)] = (str(row[0]), str(row[1]))
                    more = True
                    continue
            missing.append(str(what))
        if missing:
            shown = ", ".join(sorted(set(missing))[:8])
            extra_count = len(set(missing)) - 8
            tail = f" and {extra_count} more" if extra_count > 0 else ""
            raise UsageError(
                f"the tables chosen with -t/-T need objects the backup would not hold ({shown}"
                f"{tail}), so it could not be restored: add those tables with -t, drop the "
                "filters, or back up the whole database and restore what you need"
            )
        if not more:
            break
    names = tuple(f"{schema}.{name}" for schema, name in added.values())
    patterns = tuple(_exact_pattern(schema, name) for schema, name in added.values())
    return FilterPlan(added_tables=patterns, added_names=names)
