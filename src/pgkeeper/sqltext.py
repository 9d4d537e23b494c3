"""SQL text into statements, for the few places pgkeeper executes SQL it read (a server's
globals, a database's own properties) through psycopg, one statement at a time, never psql.

``split_statements`` follows the server's lexer: a ``;`` ends a statement outside '' strings
(with ``standard_conforming_strings`` tracked), E'' strings, "names", $tag$ bodies and -- or
nested /* */ comments. It refuses what only psql would understand (a backslash outside a
string: a meta-command) and quotes that never end. Each ``Statement`` keeps its tokens (keywords
upper-cased, names as the server spells them) so that callers can tell what it does by its
words, never by a regex over the text. This is not the safety boundary: callers execute one
statement per call in the extended protocol, which refuses a second one.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

import psycopg

from pgkeeper.errors import VerificationError


class SqlTextError(VerificationError):
    """SQL text pgkeeper will not execute: a psql meta-command, a quote that never ends."""

    def __init__(self, message: str) -> None:
        super().__init__(message, check="structure")


@dataclass(frozen=True)
class Statement:
    """One SQL statement: its first line, its text (``;`` included) and its tokens."""

    line: int
    text: str
    words: tuple[str, ...]  # its tokens but the final ;, keywords upper-cased, names as spelled
    quoted: tuple[bool, ...]  # per token: a quoted name or a string (never a keyword)
    starts: tuple[int, ...]  # per token: its offset in ``text``
    raw: tuple[str, ...]  # per token: as written

    def name(self, i: int) -> str:
        """Token ``i`` as a name: a quoted name as written, an unquoted one folded to lower
        case (as the server folds it)."""
        word = self.words[i]
        return word if self.quoted[i] else word.lower()

    def is_(self, i: int, *keywords: str) -> bool:
        """Whether token ``i`` is one of the (upper-case) ``keywords``, unquoted."""
        return i < len(self.words) and not self.quoted[i] and self.words[i] in keywords

    def names(self, i: int, stop: tuple[str, ...]) -> tuple[list[str], int]:
        """A comma list of names from token ``i`` up to one of the ``stop`` keywords or the
        end, and where it stopped (PUBLIC, everyone, is no role and left out)."""
        found: list[str] = []
        while i < len(self.words) and not self.is_(i, *stop):
            if self.words[i] != "," and not self.is_(i, "PUBLIC"):
                found.append(self.name(i))
            i += 1
        return found, i

    def replace_token(self, i: int, text: str) -> str:
        """The statement's text with token ``i`` replaced by ``text``."""
        start = self.starts[i]
        return self.text[:start] + text + self.text[start + len(self.raw[i]) :]

    def summary(self, limit: int = 6) -> str:
        """The first words, for a report line: strings shown as '…', so a password hash or a
        comment's text never reaches a report or a log."""
        shown: list[str] = []
        for i in range(min(limit, len(self.words))):
            string = self.quoted[i] and not self.raw[i].startswith('"')
            shown.append("'…'" if string else self.raw[i][:40])
        more = " …" if len(self.words) > limit else ""
        return " ".join(shown) + more


_IDENT_START = r"A-Za-z_\x80-\U0010ffff"
_IDENT_REST = r"A-Za-z0-9_$\x80-\U0010ffff"
_STRING_STD = r"'(?:[^']|'')*'"  # standard_conforming_strings on: backslash is a letter
_STRING_ESC = r"'(?:[^'\\]|\\.|'')*'"  # E'' strings, and '' with the setting off


def _lexer(standard_strings: bool) -> re.Pattern[str]:
    string = _STRING_STD if standard_strings else _STRING_ESC
    return re.compile(
        r"(?P<space>\s+)"
        r"|(?P<comment>--[^\n]*)"
        r"|(?P<block>/\*)"
        rf"|(?P<estring>[Ee]{_STRING_ESC})"  # before <word>: E'...' is a string, not a name
        rf"|(?P<string>{string})"
        r'|(?P<ident>"(?:[^"]|"")*")'
        rf"|(?P<dollar>\$(?:[{_IDENT_START}][A-Za-z0-9_\x80-\U0010ffff]*)?\$)"
        rf"|(?P<word>[{_IDENT_START}][{_IDENT_REST}]*)"
        r"|(?P<number>[0-9][0-9A-Za-z_.]*)"
        r"|(?P<semi>;)"
        r"|(?P<other>.)",
        re.DOTALL,
    )


_LEX_STD = _lexer(True)
_LEX_ESC = _lexer(False)
_BLOCK_MARK = re.compile(r"/\*|\*/")
_STD_STRINGS = re.compile(
    r"SET\s+(?:SESSION\s+)?standard_conforming_strings\s*(?:=|TO)\s*'?(\w+)'?\s*;?$",
    re.IGNORECASE,
)
_ENCODING = re.compile(rb"^SET client_encoding = '([A-Za-z0-9_]+)';", re.MULTILINE)


def decode(data: bytes) -> tuple[str, str]:
    """The text of SQL bytes and the Python codec of the client_encoding they declare (as
    pg_dump and pg_dumpall do near the top; UTF-8 when none).

    Undecodable bytes are kept as surrogates, so ``text.encode(codec, 'surrogateescape')``
    gives back the file's own bytes for the server. Raises SqlTextError for an encoding
    Python cannot read.
    """
    from psycopg._encodings import pg2pyenc  # psycopg's own PostgreSQL -> Python names

    match = _ENCODING.search(data[:8192])
    codec = "utf-8"
    if match is not None:
        try:
            codec = pg2pyenc(match.group(1))
            codecs.lookup(codec)
        except (psycopg.NotSupportedError, LookupError):
            raise SqlTextError(
                f"the SQL declares client_encoding {match.group(1).decode()!r}, which pgkeeper "
                "cannot read"
            ) from None
    return data.decode(codec, "surrogateescape"), codec


def split_statements(text: str) -> list[Statement]:
    """Split SQL text into statements (see the module docstring). Raises SqlTextError at a
    backslash outside a string (a psql meta-command) or a quote or comment that never ends."""
    statements: list[Statement] = []
    lexer = _LEX_STD
    pos, size = 0, len(text)
    start: int | None = None  # offset of the statement's first token
    words: list[str] = []
    quoted: list[bool] = []
    starts: list[int] = []
    raw: list[str] = []

    def line_of(offset: int) -> int:
        return text.count("\n", 0, offset) + 1

    def finish(end: int) -> None:
        nonlocal start, lexer
        if start is not None:
            body = text[start:end]
            offsets = tuple(s - start for s in starts)
            statements.append(
                Statement(line_of(start), body, tuple(words), tuple(quoted), offsets, tuple(raw))
            )
            setting = _STD_STRINGS.match(body.strip())
            if setting is not None:  # the session's string syntax from here on
                off = setting.group(1).lower() in ("off", "false", "no", "0")
                lexer = _LEX_ESC if off else _LEX_STD
        start = None
        words.clear()
        quoted.clear()
        starts.clear()
        raw.clear()

    while pos < size:
        match = lexer.match(text, pos)
        assert match is not None  # noqa: S101 - <other> matches any character
        kind, end = match.lastgroup, match.end()
        if kind in ("space", "comment"):
            pos = end
            continue
        if kind == "block":
            depth, scan = 1, end
            while depth:
                mark = _BLOCK_MARK.search(text, scan)
                if mark is None:
                    raise SqlTextError(f"a /* comment at line {line_of(pos)} never ends")
                depth += 1 if mark.group() == "/*" else -1
                scan = mark.end()
            pos = scan
            continue
        if kind == "semi":
            finish(end)
            pos = end
            continue
        if kind == "other":
            char = match.group()
            if char == "\\":
                raise SqlTextError(
                    f"a backslash outside a string at line {line_of(pos)} (a psql "
                    "meta-command?): pgkeeper executes SQL only"
                )
            if char in "'\"":
                raise SqlTextError(f"a quote at line {line_of(pos)} never ends")
        if kind == "dollar":
            close = text.find(match.group(), end)
            if close < 0:
                raise SqlTextError(f"a {match.group()} quote at line {line_of(pos)} never ends")
            end = close + len(match.group())
        if start is None:
            start = pos
        token = text[pos:end]
        if kind == "word":
            words.append(token.upper())
            quoted.append(False)
        elif kind == "ident":
            words.append(token[1:-1].replace('""', '"'))
            quoted.append(True)
        else:
            words.append(token)
            quoted.append(kind in ("string", "estring", "dollar"))
        starts.append(pos)
        raw.append(token)
        pos = end
    finish(size)
    return statements
