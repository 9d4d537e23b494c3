"""plainsql: the psql meta-commands of a plain dump are found where psql would run them, and
nowhere else; pg_dump's own \\restrict key lines are the only ones let through (blanked in the
replay). Integration tests (test_dump_safety.py) prove psql itself refuses the rest.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pgkeeper.plainsql import Replay, Scanner, psql_can_restrict
from tests.support.plain_cases import CLEAN, FOUND, HEAD, KEY

SAMPLE = (Path(__file__).parent / "data" / "sample.plain.sql").read_bytes()
assert KEY in SAMPLE  # the cases' key is the sample's own


def scan(data: bytes, chunk: int | None = None) -> tuple[Scanner, bytes]:
    """Feed ``data`` whole, or in chunks of ``chunk`` bytes; return the scanner and its output."""
    scanner = Scanner()
    size = chunk or max(len(data), 1)
    out = [scanner.feed(data[i : i + size]) for i in range(0, len(data), size)]
    out.append(scanner.finish())
    return scanner, b"".join(out)


def blank_own_lines(data: bytes, key: bytes) -> bytes:
    for line in (b"\\restrict " + key, b"\\unrestrict " + key):
        data = data.replace(b"\n" + line + b"\n", b"\n\n")
    return data


def test_a_real_pg_dump_holds_no_foreign_meta_command() -> None:
    """pg_dump's output (COPY rows with backslashes, a `\\.` row) passes; its key is read and
    its own key lines are blanked, keeping every other byte and the line count."""
    scanner, out = scan(SAMPLE)
    assert scanner.found is None
    assert scanner.key == KEY
    assert out == blank_own_lines(SAMPLE, KEY)
    assert out.count(b"\n") == SAMPLE.count(b"\n")
    assert b"restrict" not in out


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1000])
def test_chunk_boundaries_change_nothing(chunk: int) -> None:
    """Whatever the chunk boundaries, the result and the output are the same as in one piece."""
    tricky = HEAD + (
        b"SELECT E'a\\'b', 'c''d', \"e\"\"f\", $t$ \\! x $t$, $$\\o$$ /* \\! /* nested */ */;\n"
        b"-- \\! in a comment\nCOPY t (a) FROM stdin;\n\\N\n\\r\\n\n\\\\.\n\\.x\n\\.\n"
        b"SELECT 1 \\; SELECT 2;\n"
    )
    whole, whole_out = scan(tricky)
    assert whole.found is None
    cut, cut_out = scan(tricky, chunk)
    assert cut.found is None
    assert cut_out == whole_out == blank_own_lines(tricky, KEY)
    hostile = tricky + b"SELECT 3; \\! touch /tmp/x\n"
    assert scan(hostile, chunk)[0].found == scan(hostile)[0].found
    assert str(scan(hostile, chunk)[0].found).startswith("psql meta-command \\! at line 17")


@pytest.mark.parametrize(("body", "name", "line"), FOUND)
def test_meta_commands_are_found_where_psql_would_run_them(
    body: bytes, name: str, line: int
) -> None:
    """A backslash outside strings, identifiers, dollar quotes, comments and COPY data is a
    meta-command: found with its name (printable) and line, whatever else is on the line."""
    scanner, out = scan(HEAD + body + b"SELECT 2;\n")
    assert scanner.found is not None
    assert (scanner.found.name, scanner.found.line) == (name, line)
    assert b"\\" + name.encode()[:1] not in out[len(HEAD) - 10 :]  # nothing from it passed


@pytest.mark.parametrize("body", CLEAN)
def test_backslashes_psql_does_not_run_are_not_found(body: bytes) -> None:
    """Backslashes in comments, strings, identifiers, dollar quotes, COPY data (to a `\\.` line,
    LF or CRLF; binary COPY to the end), and `\\;` are no meta-commands."""
    scanner, out = scan(HEAD + body)
    assert scanner.found is None
    assert out == blank_own_lines(HEAD + body, KEY)


def test_the_key_is_only_declared_before_the_first_statement() -> None:
    """A \\restrict line after SQL has started declares nothing: it is a foreign command."""
    late = b"--\n-- PostgreSQL database dump\n--\n\nSET x = 1;\n\\restrict " + KEY + b"\n"
    scanner, _ = scan(late)
    assert scanner.key is None
    assert scanner.found is not None and scanner.found.name == "restrict"


def test_connect_says_to_dump_without_create() -> None:
    """\\connect (pg_dump --create output) is refused with what to do instead."""
    scanner, _ = scan(HEAD + b"\\connect app\n")
    assert "without pg_dump --create" in str(scanner.found)


def test_replay_opens_with_a_random_restrict_key_of_its_own() -> None:
    """Replay starts psql's input with `\\restrict <random>` (never the dump's key, new each
    time), then the dump with its own key lines blanked."""
    first, second = Replay(), Replay()
    out = first.feed(SAMPLE[:100]) + first.feed(SAMPLE[100:]) + first.finish()
    line = first.opening.rstrip(b"\n")
    assert out == first.opening + blank_own_lines(SAMPLE, KEY)
    assert line.startswith(b"\\restrict ") and len(line.split()[1]) == 64
    assert KEY not in first.opening and first.opening != second.opening
    assert first.found is None


def test_replay_passes_nothing_from_a_foreign_meta_command_on() -> None:
    """The replay stops at the command: psql never receives it or anything after it."""
    replay = Replay()
    out = replay.feed(HEAD + b"SELECT 1; \\! touch /tmp/x\nSELECT 2;\n") + replay.finish()
    assert replay.found is not None and replay.found.line == 8
    assert out.endswith(b"SELECT 1; ")
    assert b"touch" not in out


def test_random_garbage_never_breaks_the_scanner() -> None:
    """Any bytes, cut anywhere: the scanner ends, and chunking does not change its verdict."""
    rng = random.Random(7)
    alphabet = b"\\'\"$-/*;\nEe xCOPYFROMstdin.\r"
    for _ in range(300):
        data = HEAD + bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        whole = scan(data)[0].found
        assert scan(data, rng.randint(1, 9))[0].found == whole


@pytest.mark.parametrize(
    ("version", "ok"),
    [("15.18", True), ("15.14", True), ("15.13", False), ("16.10", True), ("16.9", False),
     ("17.6", True), ("13.22", True), ("14.18", False), ("12.22", False), ("18.1", True),
     ("19devel", True), ("unknown", False)],
)  # fmt: skip
def test_which_psql_versions_have_restrict(version: str, ok: bool) -> None:
    """\\restrict came with 13.22, 14.19, 15.14, 16.10, 17.6 and every 18."""
    assert psql_can_restrict(version) is ok


def test_copy_data_ends_where_psql_ends_it_whatever_the_cut() -> None:
    """COPY data passed uncopied chunk by chunk still ends at its `\\.` line, wherever two
    chunks meet around it: the command after it is found on the same line every time."""
    rows = b"".join(b"%d\t\\N\t\\r%d\n" % (i, i) for i in range(2000))
    data = HEAD + b"COPY t (a, b, c) FROM stdin;\n" + rows + b"\\.\n\\! after\n"
    line = data.count(b"\n")
    edge = data.index(b"\n\\.\n")
    for cut in [100, 5000, *range(edge - 4, edge + 6)]:
        scanner = Scanner()
        out = scanner.feed(data[:cut]) + scanner.feed(data[cut:]) + scanner.finish()
        assert scanner.found is not None and scanner.found.line == line, cut
        blanked = blank_own_lines(data, KEY)
        assert out == blanked[: blanked.index(b"\\! after")]
