"""A server's globals without a server: splitting SQL into statements (sqltext), telling what
each pg_dumpall statement does (server_globals.classify), and how the rest of pgkeeper sees a
globals backup (its file name, 'latest', listings' restore-test check, import detection)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pgkeeper import catalog, naming
from pgkeeper.errors import BackupNotFoundError, NotADumpError
from pgkeeper.importing import detect
from pgkeeper.manifest import Manifest, StoredObject, Verification
from pgkeeper.monitor import Expectations, check_restore_test
from pgkeeper.server_globals import classify, read_statements
from pgkeeper.sqltext import SqlTextError, split_statements

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def texts(sql: str) -> list[str]:
    return [s.text for s in split_statements(sql)]


# --- splitting ---------------------------------------------------------------------------------


def test_semicolons_inside_quotes_comments_and_dollar_bodies_do_not_split() -> None:
    """A ; ends a statement only outside '' strings, "names", $tag$ bodies and comments."""
    sql = (
        "COMMENT ON ROLE a IS 'one; two''s';\n"
        'CREATE ROLE "we;ird""name";\n'
        "COMMENT ON ROLE b IS $body$ x; $notend$ y; $body$;\n"
        "-- a comment; with a semicolon\n"
        "/* outer /* nested; */ still; */ CREATE ROLE c;\n"
        "COMMENT ON ROLE d IS E'it\\'s; escaped';\n"
        "CREATE ROLE e"  # the last statement needs no ;
    )
    assert texts(sql) == [
        "COMMENT ON ROLE a IS 'one; two''s';",
        'CREATE ROLE "we;ird""name";',
        "COMMENT ON ROLE b IS $body$ x; $notend$ y; $body$;",
        "CREATE ROLE c;",
        "COMMENT ON ROLE d IS E'it\\'s; escaped';",
        "CREATE ROLE e",
    ]
    quoted = split_statements(sql)[1]
    assert quoted.name(2) == 'we;ird"name'
    assert split_statements(sql)[3].line == 5


def test_standard_conforming_strings_off_makes_backslash_escape_in_strings() -> None:
    """After SET standard_conforming_strings = off, \\' inside '' is a quote, not the end."""
    sql = (
        "SET standard_conforming_strings = off;\n"
        "COMMENT ON ROLE a IS 'it\\'s; one';\n"
        "SET standard_conforming_strings = on;\n"
        "COMMENT ON ROLE b IS 'c:\\';"
    )
    assert texts(sql)[1] == "COMMENT ON ROLE a IS 'it\\'s; one';"
    assert texts(sql)[3] == "COMMENT ON ROLE b IS 'c:\\';"


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("CREATE ROLE a;\n\\! touch /tmp/x\n", "backslash outside a string at line 2"),
        ("CREATE ROLE a; \\o /tmp/out\n", "backslash outside a string at line 1"),
        ("COMMENT ON ROLE a IS 'never ends;\n", "quote at line 1 never ends"),
        ('CREATE ROLE "never ends;\n', "quote at line 1 never ends"),
        ("COMMENT ON ROLE a IS $x$ never ends;\n", "$x$ quote at line 1 never ends"),
        ("CREATE ROLE a; /* never ends\n", "comment at line 1 never ends"),
    ],
)
def test_what_only_psql_would_read_is_refused(sql: str, words: str) -> None:
    """A backslash outside a string (a psql meta-command) or an unterminated quote or
    comment makes the whole text refused, with the line."""
    with pytest.raises(SqlTextError, match=words.replace("$", r"\$")):
        split_statements(sql)


def test_a_globals_file_keeps_pg_dumpall_key_lines_out_and_refuses_other_commands() -> None:
    """pg_dumpall's own \\restrict/\\unrestrict lines are dropped; any other meta-command is
    refused before a statement is split."""
    own = (
        b"--\n-- PostgreSQL database cluster dump\n--\n\n\\restrict abc123\n\n"
        b"SET client_encoding = 'UTF8';\nCREATE ROLE a;\n\n\\unrestrict abc123\n"
    )
    statements, codec = read_statements(own)
    assert [s.text for s in statements] == ["SET client_encoding = 'UTF8';", "CREATE ROLE a;"]
    assert codec == "utf-8"
    with pytest.raises(SqlTextError, match=r"meta-command \\!"):
        read_statements(own.replace(b"CREATE ROLE a;", b"\\! id\nCREATE ROLE a;"))


def test_a_latin1_globals_file_is_read_in_its_encoding() -> None:
    """Names are read in the client_encoding the file declares, and re-encode to its bytes."""
    data = "SET client_encoding = 'LATIN1';\nCREATE ROLE \"José\";\n".encode("latin-1")
    statements, codec = read_statements(data)
    assert statements[1].name(2) == "José"
    assert statements[1].text.encode(codec, "surrogateescape") == 'CREATE ROLE "José";'.encode(
        "latin-1"
    )


# --- what each statement is --------------------------------------------------------------------


def kind_of(sql: str) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    kind = classify(split_statements(sql)[0])
    return kind.what, kind.subject, kind.roles, kind.grantees


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ('CREATE ROLE "Team; X";', ("create_role", "Team; X", (), ())),
        (
            "ALTER ROLE alice WITH NOSUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$x';",
            ("role_attributes", "alice", (), ()),
        ),
        ("ALTER ROLE alice SET work_mem TO '8MB';", ("role_setting", "alice", (), ())),
        (
            "ALTER ROLE alice IN DATABASE shop SET work_mem TO '8MB';",
            ("role_setting", "alice", (), ()),
        ),
        ("COMMENT ON ROLE alice IS 'x';", ("role_comment", "alice", (), ())),
        ("SECURITY LABEL FOR dummy ON ROLE alice IS 'x';", ("role_comment", "alice", (), ())),
        (
            'GRANT "Team; X" TO alice WITH ADMIN OPTION GRANTED BY postgres;',
            ("membership", "", ("Team; X",), ("alice",)),
        ),
        (  # pg_dumpall 16+
            "GRANT team TO alice WITH ADMIN OPTION, INHERIT TRUE, SET FALSE GRANTED BY postgres;",
            ("membership", "", ("team",), ("alice",)),
        ),
        ("GRANT a, b TO c, d;", ("membership", "", ("a", "b"), ("c", "d"))),
        ("GRANT SET ON PARAMETER work_mem TO bob;", ("parameter_grant", "", (), ("bob",))),
        (
            "CREATE TABLESPACE ts OWNER alice LOCATION '/srv/ts';",
            ("create_tablespace", "ts", ("alice",), ()),
        ),
        ("ALTER TABLESPACE ts SET (random_page_cost=1.1);", ("tablespace", "ts", (), ())),
        ('GRANT ALL ON TABLESPACE ts TO "Team; X";', ("tablespace", "ts", (), ("Team; X",))),
        ("GRANT CREATE ON TABLESPACE ts TO PUBLIC;", ("tablespace", "ts", (), ())),
        ("COMMENT ON TABLESPACE ts IS 'fast';", ("tablespace", "ts", (), ())),
        ("SET standard_conforming_strings = on;", ("set", "standard_conforming_strings", (), ())),
    ],
)
def test_pg_dumpall_statements_are_told_apart(
    sql: str, expected: tuple[str, str, tuple[str, ...], tuple[str, ...]]
) -> None:
    """Each kind of pg_dumpall --globals-only statement is recognised with the roles it names."""
    assert kind_of(sql) == expected


@pytest.mark.parametrize(
    "sql",
    [
        "DROP DATABASE shop;",
        "COPY (SELECT 1) TO PROGRAM 'touch /tmp/x';",
        "ALTER ROLE ALL SET work_mem = '1GB';",
        "ALTER ROLE alice RENAME TO mallory;",
        "SET session_authorization = alice;",
        "REVOKE team FROM alice;",
        "GRANT SELECT ON TABLE t TO alice;",
        "CREATE DATABASE x;",
        "DO $$ BEGIN PERFORM 1; END $$;",
        "'CREATE' ROLE x;",
        "CREATE ROLE x ROLE postgres;",
        "CREATE ROLE x SUPERUSER IN ROLE pg_read_all_data;",
    ],
)
def test_anything_else_is_unsupported(sql: str) -> None:
    """What is not about roles or tablespaces (or would change every role) is never run."""
    assert kind_of(sql)[0] == "unsupported"


def test_membership_grantor_can_be_cut() -> None:
    """GRANTED BY's offset lets the restore grant as itself when the grantor is gone."""
    stmt = split_statements("GRANT team TO alice WITH ADMIN OPTION GRANTED BY gone;")[0]
    kind = classify(stmt)
    assert kind.grantor == "gone"
    assert kind.cut is not None
    assert stmt.text[: kind.cut].rstrip() == "GRANT team TO alice WITH ADMIN OPTION"


def test_summaries_never_show_a_string() -> None:
    """Report lines show a statement's first words; strings (password hashes, comments,
    program names) are '…'."""
    sql = "ALTER ROLE alice WITH PASSWORD 'SCRAM-SHA-256$4096:secret';"
    assert split_statements(sql)[0].summary() == "ALTER ROLE alice WITH PASSWORD '…'"
    hostile = split_statements("COPY (SELECT 1) TO PROGRAM $$rm -rf /$$;")[0]
    assert "rm" not in hostile.summary(20)


# --- how pgkeeper sees a globals backup ------------------------------------------------------


def make(database: str, kind: str, age: int, verified: bool = True) -> Manifest:
    started = NOW - timedelta(hours=age)
    name = "globals" if kind == "globals" else "auto_backup"
    backup_id = naming.make_id(name, started)
    fmt = "plain" if kind == "globals" else "custom"
    return Manifest(
        id=backup_id,
        name=name,
        kind=kind,  # type: ignore[arg-type]
        database=database,
        server="db:5432",
        format=fmt,  # type: ignore[arg-type]
        compression="zstd",
        objects=[
            StoredObject(
                name=naming.data_name(backup_id, fmt, "zstd", kind), size=1, sha256="0" * 64
            )
        ],
        size=1,
        started_at=started,
        finished_at=started,
        verification=Verification(ok=verified, at=started) if verified else None,
    )


def test_a_globals_file_is_named_apart_from_a_plain_dump() -> None:
    """<id>.globals.sql.zst (gz, or none): never taken for a database's plain dump."""
    backup_id = naming.make_id("globals", NOW)
    assert naming.data_name(backup_id, "plain", "zstd", "globals").endswith(".globals.sql.zst")
    assert naming.data_name(backup_id, "plain", "gzip", "globals").endswith(".globals.sql.gz")
    assert naming.data_name(backup_id, "plain", "none", "globals").endswith(".globals.sql")
    assert naming.data_name(backup_id, "plain", "zstd").endswith(f"{NOW:%S}Z.sql.zst")
    assert make("*", "globals", 1).filename.endswith(".globals.sql.zst")


def test_latest_is_never_the_globals_unless_named() -> None:
    """'latest' of a database, or of the only database, is a dump even when the server's
    globals are newer; --database '*' means the newest verified globals."""
    globals_new = make("*", "globals", 1)
    globals_old = make("*", "globals", 5)
    shop = make("shop", "dump", 3)
    entries = [catalog.Entry(m) for m in (globals_new, shop, globals_old)]
    assert catalog.latest(entries, None).id == shop.id
    assert catalog.latest(entries, "shop").id == shop.id
    assert catalog.latest(entries, "*").id == globals_new.id
    with pytest.raises(BackupNotFoundError):
        catalog.latest([catalog.Entry(globals_new)], None)


def test_the_restore_test_check_skips_a_servers_globals() -> None:
    """The monitor does not ask for restore tests of globals (they are never restore-tested)."""
    expect = Expectations(backup_interval=timedelta(days=1))
    month = 24 * 30  # older than BACKUP_RESTORE_TEST_MAX_AGE's 14 days, never restore-tested
    check = check_restore_test([make("*", "globals", month)], expect, NOW)
    assert check.status == "skipped"
    assert "not restore-tested" in check.detail
    assert check_restore_test([make("shop", "dump", month)], expect, NOW).status == "failed"


def test_import_takes_globals_only_and_refuses_a_whole_cluster() -> None:
    """pg_dumpall --globals-only output is detected as a globals backup; with databases
    (\\connect, its Databases section) it is refused."""
    head = b"--\n-- PostgreSQL database cluster dump\n--\n\nCREATE ROLE a;\n"
    kind = detect(head)
    assert (kind.kind, kind.database, kind.format) == ("globals", "*", "plain")
    for more in (b"\\connect template1\n", b"--\n-- Databases\n--\n"):
        with pytest.raises(NotADumpError, match="cluster dump with databases"):
            detect(head + more)
