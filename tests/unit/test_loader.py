"""The pure parts of the parallel restore: which step restores which archive entry, and where
a COPY block ends."""

from __future__ import annotations

from pgkeeper import loader

LISTING = """;
; Archive created at 2026-11-26 13:14:00 UTC
;     dbname: app
;
215; 1259 16390 TABLE public orders app
216; 1259 16395 SEQUENCE public orders_id_seq app
3340; 0 16390 TABLE DATA public orders app
3341; 0 0 SEQUENCE SET public orders_id_seq app
3342; 0 0 BLOBS - BLOBS
3343; 2606 16400 CONSTRAINT public orders orders_pkey app
3344; 0 16410 MATERIALIZED VIEW DATA public totals app
3345; 0 0 ACL - SCHEMA public app
"""
DATA_LISTING = """;
3340; 0 16390 TABLE DATA public orders app
3341; 0 0 SEQUENCE SET public orders_id_seq app
3342; 0 0 BLOBS - BLOBS
"""


def test_plan_deals_table_data_streams_blobs_and_leaves_the_rest_to_pg_restore() -> None:
    plan = loader.plan(LISTING, DATA_LISTING)
    assert [line.split(";")[0] for line in plan.table_data] == ["3340"]
    assert [line.split(";")[0] for line in plan.streamed] == ["3342"]
    assert [line.split(";")[0] for line in plan.rest] == [
        "215", "216", "3341", "3343", "3344", "3345"
    ]  # fmt: skip


def test_a_table_data_entry_outside_the_data_section_is_not_dealt() -> None:
    """Only what pg_restore itself puts in the data section is loaded by the connections."""
    plan = loader.plan(LISTING, ";\n")
    assert plan.table_data == [] and plan.streamed == []
    assert len(plan.rest) == 8


def test_copy_end_finds_the_terminator_line_only() -> None:
    assert loader._copy_end(b"\\.\n") == 0
    assert loader._copy_end(b"1\tx\n2\ty\n\\.\n\nCOPY") == 8
    assert loader._copy_end(b"1\ta\\\\.\n") is None  # an escaped backslash-dot inside a row
    assert loader._copy_end(b"1\tx\n\\.") is None  # not complete yet
    assert loader._copy_end(b"1\tx\\.\n") is None  # not at the start of a line
