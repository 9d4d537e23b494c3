"""Plain-dump lines with and without psql meta-commands, shared by the scanner's unit tests
(tests/unit/test_plainsql.py) and the check that psql itself agrees with every verdict
(tests/integration/test_dump_safety.py).

Each case goes after ``HEAD`` (7 lines: a pg_dump header declaring ``KEY``).
"""

from __future__ import annotations

KEY = b"hqAIH8cmSSuUoVhCCCfIJjEryua6WNcko7KdaHkTdJb59ZnVJh33Fahb1cGeXbI"
HEAD = b"--\n-- PostgreSQL database dump\n--\n\n\\restrict " + KEY + b"\n\nSET x = 1;\n"

# (lines, the command psql would run, its line)
FOUND: list[tuple[bytes, str, int]] = [
    (b"\\! touch /tmp/marker\n", "!", 8),
    (b"SELECT 1; \\! touch /tmp/marker\n", "!", 8),
    (b"\\o /tmp/out\nSELECT 1;\n", "o", 8),
    (b"\\copy t to program 'touch /tmp/marker'\n", "copy", 8),
    (b"\\i /tmp/other.sql\n", "i", 8),
    (b"\\connect other\n", "connect", 8),
    (b"\\c other\n", "c", 8),
    (b"\\unrestrict " + KEY + b"\n\\! id\n", "!", 9),
    (b"\\restrict another\n", "restrict", 8),
    (b"\\unrestrict another\n", "unrestrict", 8),
    (b"SELECT 'it''s';\n\\gexec\n", "gexec", 9),
    (b"SELECT E'\\\\'; \\! id\n", "!", 8),
    (b"SELECT E'a\\'b'; \\! id\n", "!", 8),
    (b"SELECT 'a\\'; \\! id';\n", "!", 8),  # standard strings: the string ends at \'
    (b"SELECT $$ \\! no $$, $a$ $b$ $a$; \\! yes\n", "!", 8),
    (b"/* \\! no /* nested */ still no */ \\w /tmp/f\n", "w", 8),
    (b"COPY t (a) FROM stdin;\n\\! data, not a command\n\\.\n\\! after the data\n", "!", 11),
    (b"COPY t FROM stdin; \\! on the COPY's own line\n\\.\n", "!", 8),
    (b'CREATE TABLE "a\\" (x int); \\! id\n', "!", 8),
    (b"\\!\x1b[31m\n", "!?[31m", 8),
]

# Backslashes psql does not run: comments, strings, identifiers, dollar quotes, \; , COPY data
# (to a \. line, LF or CRLF; binary COPY to the end), strings with standard strings off.
CLEAN: list[bytes] = [
    b"-- \\! only a comment\n",
    b"SELECT '\\! a string';\n",
    b"SELECT E'\\\\! escaped';\n",
    b'SELECT "\\! an identifier";\n',
    b"SELECT $fn$\n\\! a function body\n$fn$;\n",
    b"SELECT 1 \\; SELECT 2;\n",
    b"SELECT $1, a$b$c FROM t;\n",
    b"COPY t (a) FROM stdin;\n\\N\n\\r starts with CR\n\\\\.\n\\.\n",
    b"copy t from STDIN ;\n\\! data\n\\.\r\nSELECT 1;\n",
    b"COPY t FROM stdin WITH (FORMAT binary);\n\\! binary data to the end\n",
    b"SET standard_conforming_strings = off;\nSELECT 'a\\'; \\! still the string';\n",
]
